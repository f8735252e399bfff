#include "graph_refs.hpp"

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <stdexcept>

#include "errors.hpp"

namespace fs = std::filesystem;

namespace tstitch {
namespace {

// field numbers of onnx.proto on the way to a TensorProto's external_data (graphs.py names them)
constexpr uint64_t kModelGraph = 7, kModelFunctions = 25, kGraphNode = 1, kGraphInitializer = 5,
                   kGraphSparseInitializer = 15, kNodeAttribute = 5, kFunctionNode = 7, kAttrT = 5, kAttrG = 6,
                   kAttrTensors = 10, kAttrGraphs = 11, kAttrSparse = 22, kAttrSparses = 23, kSparseValues = 1,
                   kSparseIndices = 2, kTensorExternalData = 13, kEntryKey = 1, kEntryValue = 2;
constexpr int kMaxDepth = 64;

struct Reader {
  const unsigned char* buf;

  uint64_t varint(size_t& pos, size_t end) const {
    uint64_t value = 0;
    for (int shift = 0;; shift += 7) {
      if (pos >= end || shift > 63) throw std::runtime_error("truncated varint");
      const unsigned char b = buf[pos++];
      value |= uint64_t(b & 0x7F) << shift;
      if (b < 0x80) return value;
    }
  }

  // calls fn(field number, start, end) for each length-delimited field of buf[start, end)
  void fields(size_t start, size_t end, const std::function<void(uint64_t, size_t, size_t)>& fn) const {
    size_t pos = start;
    while (pos < end) {
      const uint64_t key = varint(pos, end);
      const uint64_t number = key >> 3, wire = key & 7;
      if (wire == 0) {
        varint(pos, end);
      } else if (wire == 1) {
        pos += 8;
      } else if (wire == 5) {
        pos += 4;
      } else if (wire == 2) {
        const uint64_t length = varint(pos, end);
        if (length > end - pos) throw std::runtime_error("a field runs past its message");
        fn(number, pos, pos + length);
        pos += length;
      } else {
        throw std::runtime_error("wire type " + std::to_string(wire));
      }
    }
    if (pos != end) throw std::runtime_error("a field runs past its message");
  }

  void tensor(size_t s, size_t e, std::vector<std::string>& out) const {
    fields(s, e, [&](uint64_t n, size_t fs, size_t fe) {
      if (n != kTensorExternalData) return;
      std::string key, value;
      bool has_value = false;
      fields(fs, fe, [&](uint64_t k, size_t vs, size_t ve) {
        if (k == kEntryKey) key.assign(reinterpret_cast<const char*>(buf + vs), ve - vs);
        if (k == kEntryValue) value.assign(reinterpret_cast<const char*>(buf + vs), ve - vs), has_value = true;
      });
      if (key == "location" && has_value) out.push_back(value);
    });
  }

  void sparse(size_t s, size_t e, std::vector<std::string>& out) const {
    fields(s, e, [&](uint64_t n, size_t fs, size_t fe) {
      if (n == kSparseValues || n == kSparseIndices) tensor(fs, fe, out);
    });
  }

  void node(size_t s, size_t e, std::vector<std::string>& out, int depth) const {
    fields(s, e, [&](uint64_t n, size_t fs, size_t fe) {
      if (n != kNodeAttribute) return;
      fields(fs, fe, [&](uint64_t a, size_t as, size_t ae) {
        if (a == kAttrT || a == kAttrTensors) tensor(as, ae, out);
        else if (a == kAttrSparse || a == kAttrSparses) sparse(as, ae, out);
        else if (a == kAttrG || a == kAttrGraphs) graph(as, ae, out, depth + 1);
      });
    });
  }

  void graph(size_t s, size_t e, std::vector<std::string>& out, int depth) const {
    if (depth > kMaxDepth) throw std::runtime_error("subgraphs nested too deeply");
    fields(s, e, [&](uint64_t n, size_t fs, size_t fe) {
      if (n == kGraphInitializer) tensor(fs, fe, out);
      else if (n == kGraphSparseInitializer) sparse(fs, fe, out);
      else if (n == kGraphNode) node(fs, fe, out, depth);
    });
  }
};

bool within(const fs::path& root, const fs::path& p) {
  const std::string r = root.string() + "/", s = p.string();
  return s.compare(0, r.size(), r) == 0;
}

}  // namespace

std::vector<std::string> external_data_locations(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open it");
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.empty()) throw std::runtime_error("empty file");
  const Reader r{reinterpret_cast<const unsigned char*>(bytes.data())};
  std::vector<std::string> out;
  r.fields(0, bytes.size(), [&](uint64_t n, size_t s, size_t e) {
    if (n == kModelGraph) r.graph(s, e, out, 0);
    else if (n == kModelFunctions)
      r.fields(s, e, [&](uint64_t f, size_t fs, size_t fe) {
        if (f == kFunctionNode) r.node(fs, fe, out, 0);
      });
  });
  std::vector<std::string> unique;
  for (const std::string& loc : out)
    if (std::find(unique.begin(), unique.end(), loc) == unique.end()) unique.push_back(loc);
  return unique;
}

void check_graph_references(const std::string& bundle_dir, const std::string& rel, const std::vector<std::string>& sealed) {
  std::error_code ec;
  const fs::path root = fs::weakly_canonical(fs::path(bundle_dir), ec);
  const fs::path graph = fs::weakly_canonical(root / rel, ec);
  std::vector<std::string> locations;
  try {
    locations = external_data_locations(graph.string());
  } catch (const std::exception& e) {
    fail(TSTITCH_ERR_BUNDLE, "bundle file " + rel + " is not an ONNX graph that can be read (" + e.what() + "); rebuild the bundle");
  }
  for (const std::string& loc : locations) {
    const std::string shown = loc.size() <= 120 ? loc : loc.substr(0, 120) + "...";
    const fs::path p(loc);
    bool dotdot = false;
    for (const fs::path& part : p) dotdot = dotdot || part == "..";
    std::error_code ec2;
    const fs::path target = fs::weakly_canonical(graph.parent_path() / p, ec2);  // as the runtimes open it
    if (p.is_absolute() || dotdot || loc.find('\\') != std::string::npos || ec2 || !within(root, target))
      fail(TSTITCH_ERR_BUNDLE, "bundle file " + rel + " names external data '" + shown + "', which leads outside the bundle (to " +
                                   target.string() + "); a bundle may only use its own files: rebuild it");
    bool is_sealed = false;
    for (const std::string& s : sealed) {
      std::error_code ec3;
      is_sealed = is_sealed || fs::weakly_canonical(root / s, ec3) == target;
    }
    if (!is_sealed)
      fail(TSTITCH_ERR_BUNDLE, "bundle file " + rel + " names external data '" + shown +
                                   "', which the manifest does not checksum; rebuild the bundle");
  }
}

}  // namespace tstitch
