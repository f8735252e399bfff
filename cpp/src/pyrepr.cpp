#include "pyrepr.hpp"

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>

namespace tstitch {
namespace {

std::string float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  // Python's repr: the shortest digits that round-trip, fixed notation for exponents in [-4, 16).
  char buf[40];
  int prec = 1;
  for (; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*e", prec - 1, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  std::string s(buf);
  const size_t e = s.find('e');
  const int exp = std::atoi(s.c_str() + e + 1);
  std::string mant = s.substr(0, e);
  const bool neg = mant[0] == '-';
  if (neg) mant.erase(0, 1);
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out = "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
    } else if (static_cast<size_t>(exp) + 1 >= digits.size()) {
      out = digits + std::string(static_cast<size_t>(exp) + 1 - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, static_cast<size_t>(exp) + 1) + "." + digits.substr(static_cast<size_t>(exp) + 1);
    }
  }
  if (out.empty()) {
    out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += eb;
  }
  return (neg ? "-" : "") + out;
}

std::string str_repr(const std::string& s) {
  const bool single = s.find('\'') != std::string::npos, dbl = s.find('"') != std::string::npos;
  const char q = single && !dbl ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == '\\') out += "\\\\";
    else if (c == static_cast<unsigned char>(q)) out += std::string("\\") + q;
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", c);
      out += b;
    } else {
      out += static_cast<char>(c);  // UTF-8 passes through: Python prints printable text as is
    }
  }
  return out + q;
}

}  // namespace

namespace {

// repr() into `out`, giving up once `out` is longer than `limit` (a hostile, deeply nested or huge
// value is cut, never walked to the end).
void repr_into(const nlohmann::ordered_json& v, std::string& out, size_t limit) {
  if (out.size() > limit) return;
  switch (v.type()) {
    case nlohmann::ordered_json::value_t::null: out += "None"; return;
    case nlohmann::ordered_json::value_t::boolean: out += v.get<bool>() ? "True" : "False"; return;
    case nlohmann::ordered_json::value_t::number_integer:
    case nlohmann::ordered_json::value_t::number_unsigned: out += v.dump(); return;
    case nlohmann::ordered_json::value_t::number_float: out += float_repr(v.get<double>()); return;
    case nlohmann::ordered_json::value_t::string: out += str_repr(v.get<std::string>()); return;
    case nlohmann::ordered_json::value_t::array: {
      out += "[";
      for (size_t i = 0; i < v.size() && out.size() <= limit; ++i) {
        if (i) out += ", ";
        repr_into(v[i], out, limit);
      }
      out += "]";
      return;
    }
    case nlohmann::ordered_json::value_t::object: {
      out += "{";
      bool first = true;
      for (auto it = v.begin(); it != v.end() && out.size() <= limit; ++it, first = false) {
        out += (first ? "" : ", ") + str_repr(it.key()) + ": ";
        repr_into(it.value(), out, limit);
      }
      out += "}";
      return;
    }
    default: out += v.dump(); return;
  }
}

}  // namespace

std::string py_repr(const nlohmann::ordered_json& v) {
  std::string out;
  repr_into(v, out, SIZE_MAX - 1);
  return out;
}

std::string py_short(const nlohmann::ordered_json& v, size_t limit) {
  std::string text;
  repr_into(v, text, limit + 8);
  return text.size() <= limit ? text : text.substr(0, limit - 3) + "...";
}

std::string py_type_name(const nlohmann::ordered_json& v) {
  switch (v.type()) {
    case nlohmann::ordered_json::value_t::null: return "NoneType";
    case nlohmann::ordered_json::value_t::boolean: return "bool";
    case nlohmann::ordered_json::value_t::number_integer:
    case nlohmann::ordered_json::value_t::number_unsigned: return "int";
    case nlohmann::ordered_json::value_t::number_float: return "float";
    case nlohmann::ordered_json::value_t::string: return "str";
    case nlohmann::ordered_json::value_t::array: return "list";
    default: return "dict";
  }
}

}  // namespace tstitch
