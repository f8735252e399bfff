#include "vae_decoder.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "errors.hpp"

namespace tstitch {

void to_uint8_hwc(const float* images, int64_t batch, int64_t channels, int64_t height, int64_t width, uint8_t* out) {
  const int64_t plane = height * width;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t p = 0; p < plane; ++p) {
        // float32 throughout, as numpy computes it (NaN is refused before this; 0 keeps the cast defined)
        float v = (images[(b * channels + c) * plane + p] + 1.0f) * 127.5f + 0.5f;
        if (!(v == v)) v = 0.0f;
        out[(b * plane + p) * channels + c] = static_cast<uint8_t>(std::clamp(v, 0.0f, 255.0f));
      }
}

VaeDecoder::VaeDecoder(Device& device, std::unique_ptr<StepEngine> engine, int factor)
    : device_(device), engine_(std::move(engine)), factor_(factor) {
  const std::vector<EngineTensor> ts = engine_->tensors();
  for (auto [name, input] : {std::pair{kLatent, true}, std::pair{kImage, false}})
    if (std::none_of(ts.begin(), ts.end(), [&, n = name, in = input](const EngineTensor& t) {
          return t.name == n && t.input == in && t.dtype == "float32" && t.on_device;
        }))
      fail(TSTITCH_ERR_BUNDLE, std::string("the VAE decoder engine has no float32 device ") + (input ? "input " : "output ") +
                                   name + " (pipeline/vae.py's latent -> image); rebuild the bundle");
  if (factor_ < 1) fail(TSTITCH_ERR_BUNDLE, "the bundle's image_size is smaller than its latent; rebuild the bundle");
}

void VaeDecoder::decode(const float* latents, int64_t batch, int64_t channels, int64_t height, int64_t width, float scale,
                        uint8_t* rgb) {
  const size_t n_in = static_cast<size_t>(batch * channels * height * width);
  const int64_t out_h = height * factor_, out_w = width * factor_;
  const size_t n_out = static_cast<size_t>(batch * 3 * out_h * out_w);
  std::vector<float> z(latents, latents + n_in);
  for (float& v : z) v /= scale;  // latents / np.float32(latent_scale_factor)
  std::vector<void*> mem;
  auto alloc = [&](size_t n, const char* what) {
    mem.push_back(device_.alloc(std::max<size_t>(n, 1), what));
    return mem.back();
  };
  std::vector<float> image(n_out);
  try {
    std::unique_ptr<StepContext> ctx = engine_->create_context();
    if (!ctx->set_input_shape(kLatent, {batch, channels, height, width}))
      fail(TSTITCH_ERR_INVALID_ARGUMENT, "the VAE decoder engine refused a latent of batch " + std::to_string(batch) + " and " +
                                             std::to_string(height) + "x" + std::to_string(width) +
                                             "; rebuild the bundle's VAE with that range, or pass rgb = NULL");
    void* in = alloc(n_in * sizeof(float), "VAE latent");
    void* out = alloc(n_out * sizeof(float), "VAE image");
    ctx->set_address(kLatent, in);
    ctx->set_address(kImage, out);
    const size_t scratch = std::max(engine_->scratch_bytes(), ctx->scratch_needed());
    ctx->set_scratch(alloc(scratch, "VAE scratch"), std::max<size_t>(scratch, 1));
    device_.upload(in, z.data(), n_in * sizeof(float));
    ctx->enqueue();
    device_.download(image.data(), out, n_out * sizeof(float));
    device_.synchronize();
  } catch (...) {  // the context is gone here; its buffers go too
    for (void* p : mem) device_.free(p);
    throw;
  }
  for (void* p : mem) device_.free(p);
  for (float v : image)
    if (!std::isfinite(v)) fail(TSTITCH_ERR_NON_FINITE, "the VAE decoder produced NaN or Inf; check the bundle's VAE engine");
  to_uint8_hwc(image.data(), batch, 3, out_h, out_w, rgb);
}

}  // namespace tstitch
