// JSON values written the way Python's repr() writes the parsed value ('text', True, None, 1.0,
// [1, 2], {'k': 1}): the C++ reader's messages quote the manifest exactly as bundle/schema.py does.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace tstitch {

std::string py_repr(const nlohmann::ordered_json& v);
// repr() cut to `limit` characters ("..." at the end), as schema.py's _short.
std::string py_short(const nlohmann::ordered_json& v, size_t limit = 60);
// Python's type name of the parsed value (dict, list, str, int, float, bool, NoneType).
std::string py_type_name(const nlohmann::ordered_json& v);

}  // namespace tstitch
