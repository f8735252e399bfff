#include "openvino_bf16.hpp"

#include <openvino/core/model.hpp>
#include <openvino/op/constant.hpp>
#include <openvino/op/parameter.hpp>
#include <openvino/pass/graph_rewrite.hpp>
#include <openvino/pass/manager.hpp>
#include <openvino/pass/matcher_pass.hpp>
#include <openvino/pass/pass.hpp>

#include <map>
#include <vector>

// Three symbols of libopenvino that Python's openvino._offline_transformations.apply_moc_transformations and the
// IR reader of DisablePrecisionConversion use, and that the wheel exports (nm -DC libopenvino.so) but ships no
// header for (transformations/...). Declared here as OpenVINO 2026.4 (the version CMakeLists.txt pins) defines
// them: MOCTransformations is a ModelPass with two bools (use_shapes, low_precision_enabled; its run_on_model
// reads this+0x40 and this+0x41, checked below); FlushFP32SubnormalsToZero a MatcherPass whose exported
// constructor builds it; disable_conversion(node, from types, to types) writes the rt_info attribute the IR's
// <attribute name="DisablePrecisionConversion" value="dynamic:f16,bf16"/> reads back as. A new OpenVINO must be
// checked against these again (tests/test_cpp_openvino.py compares the C++ bf16 result with Python's).
namespace ov {
void disable_conversion(const std::shared_ptr<Node>& node, const std::vector<element::Type>& from,
                        const std::vector<element::Type>& to);
namespace pass {
class MOCTransformations : public ModelPass {
 public:
  OPENVINO_MODEL_PASS_RTTI("MOCTransformations");
  explicit MOCTransformations(bool use_shapes, bool low_precision_enabled = true)
      : m_use_shapes(use_shapes), m_low_precision_enabled(low_precision_enabled) {}
  bool run_on_model(const std::shared_ptr<ov::Model>& m) override;  // defined in libopenvino (its vtable too)

 private:
  bool m_use_shapes;
  bool m_low_precision_enabled;
};
class FlushFP32SubnormalsToZero : public MatcherPass {
 public:
  OPENVINO_MATCHER_PASS_RTTI("FlushFP32SubnormalsToZero");
  FlushFP32SubnormalsToZero();  // defined in libopenvino
};
}  // namespace pass
}  // namespace ov

static_assert(sizeof(ov::pass::ModelPass) == 0x40, "MOCTransformations' bools are at this+0x40 in OpenVINO 2026.4");
static_assert(sizeof(ov::pass::FlushFP32SubnormalsToZero) == sizeof(ov::pass::MatcherPass),
              "FlushFP32SubnormalsToZero adds no members to MatcherPass");

namespace tstitch {
namespace {

// the body: nodes bf16 is for; the tail walk and the embedding walks stop here
bool significant(const std::string& t) {
  return t == "MatMul" || t == "Convolution" || t == "GroupConvolution" || t == "ConvolutionBackpropData" ||
         t == "GroupConvolutionBackpropData";
}
// numerically sensitive wherever they are: exp/log overflow, normalization statistics, softmax
bool sensitive(const std::string& t) {
  static const std::set<std::string> kinds = {"Softmax", "LogSoftmax", "MVN", "GroupNormalization", "BatchNormInference",
                                              "NormalizeL2", "ReduceMean", "ReduceSum", "ReduceL2", "Sqrt", "Power",
                                              "Divide", "Exp", "Log", "Sin", "Cos"};
  return kinds.count(t) > 0;
}
bool leaf(const std::string& t) { return t == "Parameter" || t == "Constant" || t == "Result"; }
std::string type_of(const ov::Node* n) { return n->get_type_name(); }

std::vector<ov::Node*> parents(ov::Node* n) {
  std::vector<ov::Node*> out;
  for (const ov::Output<ov::Node>& v : n->input_values()) out.push_back(v.get_node());
  return out;
}
std::vector<ov::Node*> children(ov::Node* n) {
  std::vector<ov::Node*> out;
  for (const ov::Output<ov::Node>& o : n->outputs())
    for (const ov::Input<ov::Node>& i : o.get_target_inputs()) out.push_back(i.get_node());
  return out;
}

// Friendly names of every node reachable from `starts` along `step`, not crossing significant nodes or leaves.
template <typename Step>
std::set<std::string> walk(const std::vector<ov::Node*>& starts, Step step) {
  std::set<std::string> seen;
  std::vector<ov::Node*> stack(starts);
  while (!stack.empty()) {
    ov::Node* node = stack.back();
    stack.pop_back();
    for (ov::Node* next : step(node)) {
      const std::string t = type_of(next);
      if (significant(t) || leaf(t)) continue;
      if (seen.insert(next->get_friendly_name()).second) stack.push_back(next);
    }
  }
  return seen;
}

}  // namespace

std::set<std::string> keep_f32_nodes(const ov::Model& model) {
  const auto ops = model.get_ordered_ops();
  std::set<std::string> keep, bias_adds;
  std::vector<ov::Node*> sinusoids, results;
  for (const auto& op : ops) {
    const std::string t = type_of(op.get());
    if (sensitive(t)) keep.insert(op->get_friendly_name());
    if (t == "Sin" || t == "Cos") sinusoids.push_back(op.get());
    if (t == "Add") {  // a matmul's / conv's bias Add belongs to the body (fused into it by the plugin)
      bool sig = false, constant = false;
      for (ov::Node* p : parents(op.get())) sig = sig || significant(type_of(p)), constant = constant || type_of(p) == "Constant";
      if (sig && constant) bias_adds.insert(op->get_friendly_name());
    }
  }
  for (const auto& r : model.get_results()) results.push_back(r.get());
  for (const std::string& n : walk(results, parents))  // the sampler update, CFG combine, learned-sigma math
    if (!bias_adds.count(n)) keep.insert(n);
  for (const std::string& n : walk(sinusoids, parents)) keep.insert(n);  // the sinusoidal embedding, both ways
  for (const std::string& n : walk(sinusoids, children)) keep.insert(n);
  return keep;
}

size_t mark_for_bf16(const std::shared_ptr<ov::Model>& model) {
  // Python: apply_moc_transformations(model, cf=True) = MOCTransformations(cf) + FlushFP32SubnormalsToZero. First:
  // the plugin would run them anyway, and the nodes they rebuild would not keep the mark. On the topology only, as
  // Python (openvino_precision.marked_for_bf16): every weight Constant (floating point, >= 1 KiB) is swapped for a
  // Parameter around them, so MOC's MatMulConstTransposesExtraction + constant folding do not write a transposed
  // copy of each linear weight (7.7 GB for the SDXL U-Net, kept by the compiled model).
  std::vector<std::pair<std::shared_ptr<ov::op::v0::Parameter>, std::shared_ptr<ov::Node>>> swapped;
  for (const auto& op : model->get_ordered_ops()) {
    auto c = std::dynamic_pointer_cast<ov::op::v0::Constant>(op);
    if (!c || !c->get_output_element_type(0).is_real() || c->get_byte_size() < 1024) continue;
    auto param = std::make_shared<ov::op::v0::Parameter>(c->get_output_element_type(0), c->get_output_partial_shape(0));
    for (ov::Input<ov::Node> target : c->output(0).get_target_inputs()) target.replace_source_output(param->output(0));
    swapped.emplace_back(param, c);
  }
  ov::ParameterVector params;
  for (const auto& [param, c] : swapped) params.push_back(param);
  model->add_parameters(params);
  const auto restore = [&] {
    for (const auto& [param, c] : swapped) {
      for (ov::Input<ov::Node> target : param->output(0).get_target_inputs()) target.replace_source_output(c->output(0));
      model->remove_parameter(param);
    }
    model->validate_nodes_and_infer_types();
  };
  try {
    ov::pass::Manager manager;
    manager.register_pass<ov::pass::MOCTransformations>(true);
    manager.register_pass<ov::pass::FlushFP32SubnormalsToZero>();
    manager.run_passes(model);
  } catch (...) {
    restore();
    throw;
  }
  restore();
  const std::set<std::string> names = keep_f32_nodes(*model);
  size_t marked = 0;
  for (const auto& op : model->get_ordered_ops()) {
    if (!names.count(op->get_friendly_name())) continue;
    ov::disable_conversion(op, {ov::element::dynamic}, {ov::element::f16, ov::element::bf16});
    ++marked;
  }
  return marked;
}

}  // namespace tstitch
