// What an ONNX graph in a bundle makes a runtime read besides itself: its external-data locations, read from
// the protobuf wire format (no ONNX or protobuf library; weights are skipped, never copied), and the seal's rule
// for them. The same rules as python/tstitch_trt/bundle/graphs.py.
#pragma once

#include <string>
#include <vector>

namespace tstitch {

// Every external-data location the ONNX graph at `path` names (initializers, sparse ones, subgraphs, functions),
// duplicates removed. Throws std::runtime_error for a file that is not an ONNX protobuf.
std::vector<std::string> external_data_locations(const std::string& path);

// The graph `rel` (already sealed and checksummed) may name as external data only files inside the bundle that
// the manifest checksums (`sealed`: bundle-relative paths of the artifact's files); else fail(TSTITCH_ERR_BUNDLE)
// with one line naming the graph and the path.
void check_graph_references(const std::string& bundle_dir, const std::string& rel, const std::vector<std::string>& sealed);

}  // namespace tstitch
