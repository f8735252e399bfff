// Decoded RGB (pipeline/dit.py's _decode, pipeline/sd.py's decode): the bundle's VAE decoder engine
// (pipeline/vae.py: "latent" (B, C, h, w) float32, already divided by latent_scale_factor -> "image"
// (B, 3, h*f, w*f) float32 in [-1, 1]), then to_uint8 into HWC bytes. Like the text encoder it runs
// once per request on its own buffers, freed before decode() returns.
#pragma once

#include <cstdint>
#include <memory>

#include "engine.hpp"

namespace tstitch {

// pipeline/dit.py's to_uint8: clip((x + 1) * 127.5 + 0.5, 0, 255) in float32, truncated, (B, C, H, W)
// -> (B, H, W, C).
void to_uint8_hwc(const float* images, int64_t batch, int64_t channels, int64_t height, int64_t width, uint8_t* out);

class VaeDecoder {
 public:
  static constexpr const char* kLatent = "latent";
  static constexpr const char* kImage = "image";
  // factor: image pixels per latent pixel (the manifest's image_size / the latent height; 8 for SD).
  VaeDecoder(Device& device, std::unique_ptr<StepEngine> engine, int factor);
  int factor() const { return factor_; }
  // latents (B, C, h, w) as the loop left them; divided by `scale` here; writes (B, h*f, w*f, 3) bytes.
  void decode(const float* latents, int64_t batch, int64_t channels, int64_t height, int64_t width, float scale,
              uint8_t* rgb);

 private:
  Device& device_;
  std::unique_ptr<StepEngine> engine_;
  int factor_;
};

}  // namespace tstitch
