#include "schema.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <regex>
#include <vector>

#include "errors.hpp"
#include "pyrepr.hpp"

using ojson = nlohmann::ordered_json;

namespace tstitch {
namespace {

using Path = std::vector<ojson>;  // object keys (strings) and array indices (integers)

// One violation, as jsonschema's ValidationError: where, which keyword, and (oneOf) the branches' own.
struct Violation {
  Path path;       // absolute
  size_t rel = 0;  // path length below the enclosing oneOf (jsonschema's error.path)
  std::string keyword;
  const ojson* instance = nullptr;     // into the manifest (never copied: it may be huge or deeply nested)
  std::shared_ptr<const ojson> owned;  // a property name (propertyNames) the instance points at
  const ojson* schema = nullptr;       // the schema object holding the keyword
  bool property_name = false;     // raised by propertyNames' own keyword
  std::vector<Violation> context;
};

bool is_integer(const ojson& v) {
  if (v.is_number_integer()) return true;
  return v.is_number_float() && std::isfinite(v.get<double>()) && std::floor(v.get<double>()) == v.get<double>();
}

bool is_type(const ojson& v, const std::string& t) {
  if (t == "object") return v.is_object();
  if (t == "array") return v.is_array();
  if (t == "string") return v.is_string();
  if (t == "boolean") return v.is_boolean();
  if (t == "null") return v.is_null();
  if (t == "number") return v.is_number();
  if (t == "integer") return is_integer(v);
  return false;
}

bool matches_type(const Violation& v) {
  if (v.schema == nullptr || !v.schema->is_object() || !v.schema->contains("type")) return false;
  const ojson& t = v.schema->at("type");
  if (t.is_string()) return is_type(*v.instance, t.get<std::string>());
  return std::any_of(t.begin(), t.end(), [&](const ojson& x) { return x.is_string() && is_type(*v.instance, x.get<std::string>()); });
}

// jsonschema's relevance (exceptions.by_relevance): shallow first, then the later sibling path,
// anyOf/oneOf last, type-mismatched branches last. max() over it picks the reported violation.
struct Relevance {
  long depth;
  std::vector<ojson> path;  // the path below the enclosing oneOf (error.path)
  bool strong_keyword, type_mismatch;
};

bool path_less(const std::vector<ojson>& a, const std::vector<ojson>& b) {
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    if (a[i] == b[i]) continue;
    if (a[i].is_number() != b[i].is_number()) return a[i].is_number();
    return a[i] < b[i];
  }
  return a.size() < b.size();
}

bool operator<(const Relevance& a, const Relevance& b) {
  if (a.depth != b.depth) return a.depth < b.depth;
  if (a.path != b.path) return path_less(a.path, b.path);
  if (a.strong_keyword != b.strong_keyword) return b.strong_keyword;
  return !a.type_mismatch && b.type_mismatch;
}
bool operator==(const Relevance& a, const Relevance& b) { return !(a < b) && !(b < a); }
bool operator>(const Relevance& a, const Relevance& b) { return b < a; }

Relevance relevance(const Violation& v) {
  return {-static_cast<long>(v.rel), std::vector<ojson>(v.path.end() - static_cast<long>(v.rel), v.path.end()),
          v.keyword != "oneOf" && v.keyword != "anyOf", !matches_type(v)};
}

// -1, 0, 1 comparing two JSON numbers (integers exactly).
int compare_numbers(const ojson& a, const ojson& b) {
  if (a.is_number_integer() && b.is_number_integer()) {
    if (a.is_number_unsigned() || b.is_number_unsigned()) {
      if (a.is_number_unsigned() && b.is_number_unsigned()) {
        const auto x = a.get<uint64_t>(), y = b.get<uint64_t>();
        return x < y ? -1 : x > y;
      }
      return a.is_number_unsigned() ? 1 : -1;  // an unsigned JSON integer is above every negative one
    }
    const auto x = a.get<int64_t>(), y = b.get<int64_t>();
    return x < y ? -1 : x > y;
  }
  const double x = a.get<double>(), y = b.get<double>();
  return x < y ? -1 : x > y;
}

size_t code_points(const std::string& s) {
  return static_cast<size_t>(std::count_if(s.begin(), s.end(), [](char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; }));
}

bool pattern_matches(const std::string& pattern, const std::string& text) {
  thread_local std::map<std::string, std::regex> compiled;
  auto it = compiled.find(pattern);
  if (it == compiled.end()) it = compiled.emplace(pattern, std::regex(pattern, std::regex::ECMAScript)).first;
  return std::regex_search(text, it->second);
}

class Validator {
 public:
  explicit Validator(const ojson& root) : root_(root) {}

  void validate(const ojson& inst, const ojson& schema, Path& path, size_t base, std::vector<Violation>& out,
                bool property_names = false) const {
    if (schema.is_boolean()) {
      if (!schema.get<bool>()) add(out, "false", inst, schema, path, base, property_names);
      return;
    }
    for (auto it = schema.begin(); it != schema.end(); ++it) {
      const std::string& k = it.key();
      const ojson& v = it.value();
      auto bad = [&] { add(out, k, inst, schema, path, base, property_names); };
      if (k == "$ref") {
        validate(inst, root_.at(ojson::json_pointer(v.get<std::string>().substr(1))), path, base, out);
      } else if (k == "type") {
        const bool ok = v.is_string() ? is_type(inst, v.get<std::string>())
                                      : std::any_of(v.begin(), v.end(), [&](const ojson& t) { return is_type(inst, t.get<std::string>()); });
        if (!ok) bad();
      } else if (k == "enum") {
        if (std::none_of(v.begin(), v.end(), [&](const ojson& e) { return e == inst; })) bad();
      } else if (k == "const") {
        if (!(v == inst)) bad();
      } else if (k == "required") {
        if (inst.is_object())
          for (const ojson& r : v)
            if (!inst.contains(r.get<std::string>())) bad();
      } else if (k == "properties") {
        if (!inst.is_object()) continue;
        for (auto p = v.begin(); p != v.end(); ++p)
          if (inst.contains(p.key())) descend(inst.at(p.key()), p.value(), ojson(p.key()), path, base, out);
      } else if (k == "additionalProperties") {
        if (!inst.is_object()) continue;
        const ojson none = ojson::object();
        const ojson& props = schema.contains("properties") ? schema.at("properties") : none;
        for (auto p = inst.begin(); p != inst.end(); ++p) {
          if (props.contains(p.key())) continue;
          if (v.is_boolean() && !v.get<bool>()) {
            bad();
            break;
          }
          descend(p.value(), v, ojson(p.key()), path, base, out);
        }
      } else if (k == "propertyNames") {
        if (!inst.is_object()) continue;
        for (auto p = inst.begin(); p != inst.end(); ++p) {
          auto key = std::make_shared<const ojson>(p.key());
          const size_t before = out.size();
          validate(*key, v, path, base, out, true);
          for (size_t i = before; i < out.size(); ++i) out[i].owned = key;  // keeps the name alive
        }
      } else if (k == "minProperties") {
        if (inst.is_object() && inst.size() < v.get<size_t>()) bad();
      } else if (k == "minimum" || k == "maximum" || k == "exclusiveMinimum" || k == "exclusiveMaximum") {
        if (!inst.is_number()) continue;
        const int c = compare_numbers(inst, v);
        if ((k == "minimum" && c < 0) || (k == "maximum" && c > 0) || (k == "exclusiveMinimum" && c <= 0) ||
            (k == "exclusiveMaximum" && c >= 0))
          bad();
      } else if (k == "minLength" || k == "maxLength") {
        if (!inst.is_string()) continue;
        const size_t n = code_points(inst.get<std::string>());
        if (k == "minLength" ? n < v.get<size_t>() : n > v.get<size_t>()) bad();
      } else if (k == "pattern") {
        // A string over the schema's maxLength is already refused (maxLength comes first, so it is the
        // reported violation, as in Python); the regex never runs on it (std::regex recurses per character).
        if (!inst.is_string()) continue;
        const std::string& str = inst.get<std::string>();
        if (schema.contains("maxLength") && code_points(str) > schema.at("maxLength").get<size_t>()) continue;
        if (str.size() > 65536 || !pattern_matches(v.get<std::string>(), str)) bad();
      } else if (k == "minItems" || k == "maxItems") {
        if (inst.is_array() && (k == "minItems" ? inst.size() < v.get<size_t>() : inst.size() > v.get<size_t>())) bad();
      } else if (k == "prefixItems") {
        if (inst.is_array())
          for (size_t i = 0; i < std::min(inst.size(), v.size()); ++i) descend(inst[i], v[i], ojson(i), path, base, out);
      } else if (k == "items") {
        if (!inst.is_array()) continue;
        const size_t start = schema.contains("prefixItems") ? schema.at("prefixItems").size() : 0;
        for (size_t i = start; i < inst.size(); ++i) descend(inst[i], v, ojson(i), path, base, out);
      } else if (k == "allOf") {
        for (const ojson& sub : v) validate(inst, sub, path, base, out);
      } else if (k == "oneOf") {
        std::vector<Violation> context;
        size_t valid = 0;
        for (const ojson& sub : v) {
          const size_t before = context.size();
          validate(inst, sub, path, path.size(), context);
          valid += context.size() == before;
        }
        if (valid == 1) continue;
        add(out, k, inst, schema, path, base, property_names);
        if (valid == 0) out.back().context = std::move(context);
      } else if (k == "if") {
        std::vector<Violation> probe;
        validate(inst, v, path, base, probe);
        const char* branch = probe.empty() ? "then" : "else";
        if (schema.contains(branch)) validate(inst, schema.at(branch), path, base, out);
      }
      // then / else (with if), $defs, $schema, title, description: not assertions
    }
  }

 private:
  void descend(const ojson& inst, const ojson& schema, const ojson& key, Path& path, size_t base,
               std::vector<Violation>& out) const {
    path.push_back(key);
    validate(inst, schema, path, base, out);
    path.pop_back();
  }
  static void add(std::vector<Violation>& out, const std::string& keyword, const ojson& inst, const ojson& schema,
                  const Path& path, size_t base, bool property_name) {
    Violation v;
    v.path = path, v.rel = path.size() - base, v.keyword = keyword, v.instance = &inst, v.schema = &schema;
    v.property_name = property_name;
    out.push_back(std::move(v));
  }
  const ojson& root_;
};

const Violation* best_match(const std::vector<Violation>& errors) {
  if (errors.empty()) return nullptr;
  const Violation* best = &errors.front();
  for (const Violation& e : errors)
    if (relevance(e) > relevance(*best)) best = &e;
  while (!best->context.empty()) {  // descend into oneOf branches, unless the two best tie
    std::vector<const Violation*> order;
    for (const Violation& e : best->context) order.push_back(&e);
    std::stable_sort(order.begin(), order.end(), [](const Violation* a, const Violation* b) { return relevance(*a) < relevance(*b); });
    if (order.size() >= 2 && relevance(*order[0]) == relevance(*order[1])) return best;
    best = order[0];
  }
  return best;
}

std::string field_path(const Path& parts) {
  std::string out;
  for (const ojson& p : parts)
    out += p.is_number() ? "[" + p.dump() + "]" : (out.empty() ? "" : ".") + p.get<std::string>();
  return out.empty() ? "the manifest" : out;
}

std::string json_type(const ojson& v) {
  if (v.is_object()) return "object";
  if (v.is_array()) return "array";
  if (v.is_string()) return "string";
  if (v.is_boolean()) return "boolean";
  if (v.is_null()) return "null";
  return v.is_number_float() ? "number" : "integer";
}

std::string known(const ojson& values) {
  std::string out;
  for (const ojson& x : values) out += (out.empty() ? "" : ", ") + py_repr(x);
  return out;
}

// bundle/schema.py's describe(), clause for clause.
std::string describe(const Violation& e) {
  const std::string where = field_path(e.path);
  const std::string& v = e.keyword;
  if (v == "false") return where + ": " + py_short(*e.instance) + " is not allowed here";
  const ojson& expected = e.schema->at(v);
  const ojson& instance = *e.instance;
  const std::string inst = py_short(instance);
  if (v == "required") {
    for (const ojson& k : expected)
      if (instance.is_object() && !instance.contains(k.get<std::string>()))
        return where + " lacks the required field " + py_repr(k);
    return where + " lacks the required field " + py_repr(expected);
  }
  if (v == "additionalProperties") {
    std::vector<std::string> extra;
    const ojson none = ojson::object();
    const ojson& props = e.schema->contains("properties") ? e.schema->at("properties") : none;
    for (auto it = instance.begin(); it != instance.end(); ++it)
      if (!props.contains(it.key())) extra.push_back(it.key());
    std::sort(extra.begin(), extra.end());
    Path name = e.path;
    if (!extra.empty()) name.push_back(extra.front());
    return field_path(name) + " is a field this tstitch-trt does not understand (it would be ignored, so it is refused)";
  }
  if (v == "enum" && e.property_name) return where + " has the key " + inst + "; this tstitch-trt knows only " + known(expected);
  if (v == "type")
    return where + " must be of type " + (expected.is_string() ? expected.get<std::string>() : py_repr(expected)) + ", got " +
           json_type(instance) + " " + inst;
  if (v == "enum") return where + " is " + inst + "; this tstitch-trt knows only " + known(expected);
  if (v == "const") return where + " is " + inst + ", expected " + py_repr(expected);
  if (v == "pattern") {
    const std::string description = e.schema->value("description", "");
    if (description.rfind("A path inside the bundle", 0) == 0)
      return where + " is " + inst + ", not a relative path inside the bundle (no '..', no absolute path)";
    return where + " is " + inst + ", which is not of the expected form";
  }
  static const std::map<std::string, std::string> ops = {
      {"minimum", ">="}, {"maximum", "<="}, {"exclusiveMinimum", ">"}, {"exclusiveMaximum", "<"}};
  if (ops.count(v)) return where + " is " + inst + ", must be " + ops.at(v) + " " + py_repr(expected);
  if (v == "minItems" || v == "maxItems" || v == "minLength" || v == "maxLength" || v == "minProperties")
    return where + " has the wrong size (" + v + " " + py_repr(expected) + ")";
  if (v == "oneOf" && !e.context.empty()) {
    const Violation* inner = best_match(e.context);
    return inner ? describe(*inner) : where + " is not valid";
  }
  return where + ": " + py_short(instance, 200) + " is valid under more than one of the alternatives";
}

const ojson& manifest_schema() {
  static const ojson schema = ojson::parse(kManifestSchema);
  return schema;
}

}  // namespace

void check_manifest_header(const ojson& raw, const std::string& where) {
  if (!raw.is_object())
    fail(TSTITCH_ERR_BUNDLE, where + " holds a JSON " + py_type_name(raw) + ", not a manifest object; rebuild the bundle");
  const ojson format = raw.contains("format") ? raw.at("format") : ojson();
  if (format != "tstitch-bundle")
    fail(TSTITCH_ERR_BUNDLE, where + " is not a tstitch bundle manifest (format is " + py_short(format) +
                                 ", expected 'tstitch-bundle'); rebuild the bundle");
  const ojson version = raw.contains("format_version") ? raw.at("format_version") : ojson();
  if (!version.is_number_integer())
    fail(TSTITCH_ERR_BUNDLE, where + ": format_version must be an integer, got " + py_short(version) + "; rebuild the bundle");
  if (version.is_number_unsigned() ? version.get<uint64_t>() > 1 : version.get<int64_t>() > 1)
    fail(TSTITCH_ERR_BUNDLE, where + " has bundle format version " + version.dump() +
                                 ", newer than this tstitch-trt reads (1); upgrade tstitch-trt or rebuild the bundle with this version");
  if (version.get<int64_t>() < 1)
    fail(TSTITCH_ERR_BUNDLE, where + ": format_version " + version.dump() + " does not exist; rebuild the bundle");
}

std::string schema_violation(const ojson& raw) {
  const ojson& root = manifest_schema();
  std::vector<Violation> errors;
  Path path;
  Validator(root).validate(raw, root, path, 0, errors);
  const Violation* best = best_match(errors);
  return best ? describe(*best) : "";
}

void validate_manifest_schema(const ojson& raw, const std::string& where) {
  check_manifest_header(raw, where);
  const std::string why = schema_violation(raw);
  if (!why.empty()) fail(TSTITCH_ERR_BUNDLE, where + ": " + why + "; rebuild the bundle with `tstitch-trt build`");
}

}  // namespace tstitch
