#include "text_encoder.hpp"

#include <algorithm>

#include "errors.hpp"
#include "roles.hpp"

namespace tstitch {
namespace {

// Device buffers freed on every path out of encode().
struct Scoped {
  Device& dev;
  std::vector<void*> ptrs;
  void* alloc(size_t n, const std::string& what) {
    ptrs.push_back(dev.alloc(std::max<size_t>(n, 1), what));
    return ptrs.back();
  }
  ~Scoped() {
    for (void* p : ptrs) dev.free(p);
  }
};

}  // namespace

TextEncoder::TextEncoder(const std::vector<TensorSpec>& io, Device& device, std::unique_ptr<StepEngine> engine, std::string label)
    : device_(device), engine_(std::move(engine)), label_(std::move(label)) {
  const std::string field = label_ == "text encoder 2" ? "text_encoder_2.io" : "text_encoder.io";
  const auto in = std::find_if(io.begin(), io.end(), [](const TensorSpec& t) { return t.input; });
  const auto text = std::find_if(io.begin(), io.end(), [](const TensorSpec& t) { return !t.input && t.name == kTextOutput; });
  const bool one_input = std::count_if(io.begin(), io.end(), [](const TensorSpec& t) { return t.input; }) == 1;
  if (in == io.end() || !one_input || text == io.end() || in->dtype != "int64" || in->shape.size() != 2 || text->dtype != "float32" ||
      text->shape.size() != 3)
    fail(TSTITCH_ERR_BUNDLE, "the manifest's " + field + " is not input_ids (N, L) int64 -> text_embeddings (N, L, D) float32; "
                             "rebuild the bundle");
  input_ = *in;
  for (const TensorSpec& t : io) {
    if (t.input) continue;
    if (t.dtype != "float32" || t.shape.size() < 2 || !(t.shape[0] == input_.shape[0]))
      fail(TSTITCH_ERR_BUNDLE, "the manifest's " + field + " output " + t.name + " is not float32 with one row per prompt; "
                               "rebuild the bundle");
    outputs_.push_back(t);
  }
  const std::vector<EngineTensor> ts = engine_->tensors();
  std::vector<const TensorSpec*> specs = {&input_};
  for (const TensorSpec& t : outputs_) specs.push_back(&t);
  for (const TensorSpec* spec : specs)
    if (std::none_of(ts.begin(), ts.end(), [&](const EngineTensor& t) {
          return t.name == spec->name && t.input == spec->input && t.dtype == spec->dtype && t.on_device;
        }))
      fail(TSTITCH_ERR_BUNDLE, "the " + label_ + " engine has no " + spec->dtype + " device tensor " + spec->name +
                                   " as the manifest says; rebuild the bundle");
}

bool TextEncoder::has_output(const std::string& name) const {
  return std::any_of(outputs_.begin(), outputs_.end(), [&](const TensorSpec& t) { return t.name == name; });
}

std::vector<float> TextEncoder::encode(const std::vector<int64_t>& ids, int64_t n, int64_t tokens, int64_t* width) {
  std::map<std::string, TextOutput> out = encode_all(ids, n, tokens);
  TextOutput& text = out.at(kTextOutput);
  *width = text.dims[2];
  return std::move(text.values);
}

std::map<std::string, TextOutput> TextEncoder::encode_all(const std::vector<int64_t>& ids, int64_t n, int64_t tokens) {
  DimValues dims;
  const std::vector<int64_t> given = {n, tokens};
  for (size_t i = 0; i < 2; ++i) {
    const Dim& d = input_.shape[i];
    if (!d.symbol.empty()) dims[d.symbol] = given[i];
    else if (d.size != given[i])
      fail(TSTITCH_ERR_INVALID_ARGUMENT, "the " + label_ + " takes " + std::to_string(d.size) + " tokens per prompt, the request has " +
                                             std::to_string(tokens) + " (pad or cut to it, as the bundle's tokenizer does)");
  }
  std::map<std::string, TextOutput> result;
  for (const TensorSpec& spec : outputs_) {
    TextOutput& o = result[spec.name];
    o.dims = resolve_dims(spec, dims);
    size_t count = 1;
    for (int64_t d : o.dims) count *= static_cast<size_t>(d);
    o.values.resize(count);
  }
  Scoped mem{device_, {}};  // declared first: freed after the context is gone
  std::unique_ptr<StepContext> ctx = engine_->create_context();
  if (!ctx->set_input_shape(input_.name, given))
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "the " + label_ + " engine refused " + std::to_string(n) + " prompt rows (2 per image under cfg "
                                       "guidance) of " + std::to_string(tokens) + " tokens; rebuild with a wider batch range");
  void* in = mem.alloc(ids.size() * sizeof(int64_t), label_ + " input ids");
  ctx->set_address(input_.name, in);
  std::map<std::string, void*> out_ptrs;
  for (auto& [name, o] : result) {
    out_ptrs[name] = mem.alloc(o.values.size() * sizeof(float), label_ + " " + name);
    ctx->set_address(name, out_ptrs[name]);
  }
  const size_t scratch = std::max(engine_->scratch_bytes(), ctx->scratch_needed());
  ctx->set_scratch(mem.alloc(scratch, label_ + " scratch"), std::max<size_t>(scratch, 1));
  device_.upload(in, ids.data(), ids.size() * sizeof(int64_t));
  ctx->enqueue();
  for (auto& [name, o] : result) device_.download(o.values.data(), out_ptrs[name], o.values.size() * sizeof(float));
  device_.synchronize();
  ctx.reset();  // the context goes before its scratch
  return result;
}

}  // namespace tstitch
