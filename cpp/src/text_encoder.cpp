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

TextEncoder::TextEncoder(const Manifest& m, Device& device, std::unique_ptr<StepEngine> engine)
    : device_(device), engine_(std::move(engine)) {
  const auto in = std::find_if(m.text_encoder_io.begin(), m.text_encoder_io.end(), [](const TensorSpec& t) { return t.input; });
  const auto out = std::find_if(m.text_encoder_io.begin(), m.text_encoder_io.end(), [](const TensorSpec& t) { return !t.input; });
  if (in == m.text_encoder_io.end() || out == m.text_encoder_io.end() || in->dtype != "int64" || out->dtype != "float32" ||
      in->shape.size() != 2 || out->shape.size() != 3)
    fail(TSTITCH_ERR_BUNDLE, "the manifest's text_encoder.io is not input_ids (N, L) int64 -> (N, L, D) float32; rebuild the bundle");
  input_ = *in, output_ = *out;
  const std::vector<EngineTensor> ts = engine_->tensors();
  for (const TensorSpec* spec : {&input_, &output_})
    if (std::none_of(ts.begin(), ts.end(), [&](const EngineTensor& t) {
          return t.name == spec->name && t.input == spec->input && t.dtype == spec->dtype && t.on_device;
        }))
      fail(TSTITCH_ERR_BUNDLE, "the text encoder engine has no " + spec->dtype + " device tensor " + spec->name +
                                   " as the manifest says; rebuild the bundle");
}

std::vector<float> TextEncoder::encode(const std::vector<int64_t>& ids, int64_t n, int64_t tokens, int64_t* width) {
  DimValues dims;
  const std::vector<int64_t> given = {n, tokens};
  for (size_t i = 0; i < 2; ++i) {
    const Dim& d = input_.shape[i];
    if (!d.symbol.empty()) dims[d.symbol] = given[i];
    else if (d.size != given[i])
      fail(TSTITCH_ERR_INVALID_ARGUMENT, "the text encoder takes " + std::to_string(d.size) + " tokens per prompt, the request has " +
                                             std::to_string(tokens) + " (pad or cut to it, as the bundle's tokenizer does)");
  }
  const std::vector<int64_t> out_dims = resolve_dims(output_, dims);
  const size_t count = static_cast<size_t>(out_dims[0] * out_dims[1] * out_dims[2]);
  Scoped mem{device_, {}};  // declared first: freed after the context is gone
  std::unique_ptr<StepContext> ctx = engine_->create_context();
  if (!ctx->set_input_shape(input_.name, given))
    fail(TSTITCH_ERR_INVALID_ARGUMENT, "the text encoder engine refused " + std::to_string(n) + " prompt rows (2 per image under cfg guidance) of " +
                                           std::to_string(tokens) + " tokens; rebuild with a wider batch range");
  void* in = mem.alloc(ids.size() * sizeof(int64_t), "text encoder input ids");
  void* out = mem.alloc(count * sizeof(float), "text encoder embeddings");
  ctx->set_address(input_.name, in);
  ctx->set_address(output_.name, out);
  const size_t scratch = std::max(engine_->scratch_bytes(), ctx->scratch_needed());
  ctx->set_scratch(mem.alloc(scratch, "text encoder scratch"), std::max<size_t>(scratch, 1));
  device_.upload(in, ids.data(), ids.size() * sizeof(int64_t));
  ctx->enqueue();
  std::vector<float> emb(count);
  device_.download(emb.data(), out, count * sizeof(float));
  device_.synchronize();
  ctx.reset();  // the context goes before its scratch
  *width = out_dims[2];
  return emb;
}

}  // namespace tstitch
