// manifest.json against python/tstitch_trt/bundle/manifest.schema.json, the one description of the
// bundle format (embedded at build time, so both readers follow the same file). Implements the
// JSON Schema 2020-12 keywords that file uses, and picks and words the reported violation as
// bundle/schema.py does (jsonschema's best_match + describe), so both name the same field.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace tstitch {

// The embedded schema text (generated from manifest.schema.json by CMake).
extern const char* const kManifestSchema;

// format / format_version first (schema.py's check_header); fails with TSTITCH_ERR_BUNDLE.
void check_manifest_header(const nlohmann::ordered_json& raw, const std::string& where);
// The schema's verdict: "" when valid, else schema.py's describe() of the best-matching violation.
std::string schema_violation(const nlohmann::ordered_json& raw);
// Both, failing with "<where>: <violation>; rebuild the bundle with `tstitch-trt build`".
void validate_manifest_schema(const nlohmann::ordered_json& raw, const std::string& where);

}  // namespace tstitch
