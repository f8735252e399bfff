/* An example service in C: open a bundle, sample class-conditional images, write them as a PNG.
 *   tstitch_sample <bundle_dir> [out.png] [label] [steps] [ratio]
 * The engine is auto (tstitch_open_params.engine NULL): TensorRT on a GPU where this library has it, else OpenVINO
 * on the CPU; where neither can run the bundle it says in one line why it cannot sample and exits 2.
 * The runtime decodes the images (tstitch_image_shape: through the bundle's VAE engine, or a
 * pixel-space bundle's latent itself); an RGB image is written in colour, other channel counts as
 * channel 0 in gray; a bundle that makes latents only is written as its latents' channel 0. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tstitch/tstitch.h"

/* PNG with "stored" (uncompressed) deflate blocks: no image library needed for an example. */
static uint32_t crc_table[256];

static void init_crc(void) {
  uint32_t n, c;
  int k;
  for (n = 0; n < 256; ++n) {
    for (c = n, k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
    crc_table[n] = c;
  }
}

static uint32_t crc_update(uint32_t crc, const unsigned char* p, size_t n) {
  size_t i;
  for (i = 0; i < n; ++i) crc = crc_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return crc;
}

static void put32(FILE* f, uint32_t v) {
  unsigned char b[4];
  b[0] = (unsigned char)(v >> 24), b[1] = (unsigned char)(v >> 16), b[2] = (unsigned char)(v >> 8), b[3] = (unsigned char)v;
  fwrite(b, 1, 4, f);
}

static void chunk(FILE* f, const char* type, const unsigned char* data, uint32_t n) {
  uint32_t crc = crc_update(0xffffffffu, (const unsigned char*)type, 4);
  crc = crc_update(crc, data, n);
  put32(f, n);
  fwrite(type, 1, 4, f);
  if (n) fwrite(data, 1, n, f);
  put32(f, crc ^ 0xffffffffu);
}

/* pixels: height rows of width x channels bytes; channels 1 (gray) or 3 (RGB) */
static int write_png(const char* path, const unsigned char* pixels, uint32_t width, uint32_t height, int channels) {
  const size_t line = (size_t)width * (size_t)channels, row = line + 1, raw_n = row * height;
  const size_t blocks = (raw_n + 65534) / 65535, z_n = 2 + raw_n + 5 * blocks + 4;
  unsigned char ihdr[13] = {0};
  unsigned char* raw = malloc(raw_n);
  unsigned char* z = malloc(z_n);
  FILE* f = fopen(path, "wb");
  size_t y, pos = 0, done = 0;
  uint32_t a = 1, b = 0;
  if (!raw || !z || !f) {
    free(raw), free(z);
    if (f) fclose(f);
    return -1;
  }
  for (y = 0; y < height; ++y) {
    raw[y * row] = 0; /* filter: none */
    memcpy(raw + y * row + 1, pixels + y * line, line);
  }
  z[pos++] = 0x78, z[pos++] = 0x01;
  while (done < raw_n) {
    const size_t n = raw_n - done < 65535 ? raw_n - done : 65535;
    z[pos++] = done + n == raw_n ? 1 : 0;
    z[pos++] = (unsigned char)(n & 0xff), z[pos++] = (unsigned char)(n >> 8);
    z[pos++] = (unsigned char)(~n & 0xff), z[pos++] = (unsigned char)((~n >> 8) & 0xff);
    memcpy(z + pos, raw + done, n);
    pos += n, done += n;
  }
  for (y = 0; y < raw_n; ++y) a = (a + raw[y]) % 65521, b = (b + a) % 65521;
  z[pos++] = (unsigned char)(b >> 8), z[pos++] = (unsigned char)b, z[pos++] = (unsigned char)(a >> 8), z[pos++] = (unsigned char)a;
  init_crc();
  fwrite("\x89PNG\r\n\x1a\n", 1, 8, f);
  ihdr[0] = (unsigned char)(width >> 24), ihdr[1] = (unsigned char)(width >> 16), ihdr[2] = (unsigned char)(width >> 8),
  ihdr[3] = (unsigned char)width;
  ihdr[4] = (unsigned char)(height >> 24), ihdr[5] = (unsigned char)(height >> 16), ihdr[6] = (unsigned char)(height >> 8),
  ihdr[7] = (unsigned char)height;
  ihdr[8] = 8; /* bit depth */
  ihdr[9] = channels == 3 ? 2 : 0; /* color type: 2 = RGB, 0 = grayscale */
  chunk(f, "IHDR", ihdr, 13);
  chunk(f, "IDAT", z, (uint32_t)pos);
  chunk(f, "IEND", NULL, 0);
  free(raw), free(z);
  return fclose(f) == 0 ? 0 : -1;
}


int main(int argc, char** argv) {
  const char* bundle = argc > 1 ? argv[1] : NULL;
  const char* out = argc > 2 ? argv[2] : "sample.png";
  const int64_t label = argc > 3 ? atoll(argv[3]) : 3;
  tstitch_open_params params;
  tstitch_request req;
  tstitch_sample_info info;
  tstitch_runtime* rt = NULL;
  tstitch_status s;
  int64_t labels[4];
  float* x = NULL;
  size_t n = 0, i;
  int c, h, w, k, ih = 0, iw = 0, ic = 0, png_channels = 1;
  unsigned char* gray;
  unsigned char* rgb = NULL;
  const char *engine = NULL, *precision = NULL;
  if (!bundle) {
    fprintf(stderr, "usage: %s <bundle_dir> [out.png] [label] [steps] [ratio]\n", argv[0]);
    return 2;
  }
  tstitch_open_params_init(&params);
  s = tstitch_open(bundle, &params, &rt);
  if (s != TSTITCH_OK) {
    fprintf(stderr, "error: cannot sample here (%s): %s\n", tstitch_status_name(s), tstitch_last_error());
    return 2;
  }
  if (tstitch_engine(rt, &engine, &precision) == TSTITCH_OK) printf("engine %s; %s\n", engine, precision);
  tstitch_latent_shape(rt, &c, &h, &w);
  tstitch_request_init(&req);
  for (k = 0; k < 4; ++k) labels[k] = label;
  req.batch = 4;
  req.class_labels = labels;
  req.steps = argc > 4 ? atoi(argv[4]) : 50;
  req.ratio = argc > 5 ? atof(argv[5]) : 0.4;
  req.sampler = "ddpm";
  req.cfg_scale = 1.5f;
  req.seed = 0;
  tstitch_sample_info_init(&info);
  if (tstitch_image_shape(rt, &ih, &iw, &ic) == TSTITCH_OK) { /* decoded images: uint8 HWC */
    n = (size_t)4 * c * h * w;
    x = malloc(n * sizeof(float));
    rgb = malloc((size_t)4 * ih * iw * ic);
    s = x && rgb ? tstitch_sample(rt, &req, x, n, rgb, (size_t)4 * ih * iw * ic, &info) : TSTITCH_ERR_OUT_OF_MEMORY;
  } else {
    printf("note: %s\n", tstitch_last_error()); /* latents only: channel 0 in gray */
    s = tstitch_sample_alloc(rt, &req, &x, &n, &info);
  }
  if (s != TSTITCH_OK) {
    fprintf(stderr, "error: %s\n", s == TSTITCH_ERR_OUT_OF_MEMORY && !rgb ? "out of host memory" : tstitch_last_error());
    free(rgb);
    tstitch_free(x);
    tstitch_close(rt);
    return 2;
  }
  if (rgb) {
    h = ih, w = iw;
    png_channels = ic == 3 ? 3 : 1;
  }
  /* the images side by side: RGB as decoded, else channel 0 ([-1, 1] -> [0, 255] for latents) */
  gray = malloc((size_t)4 * h * w * png_channels);
  for (k = 0; gray && k < 4; ++k)
    for (i = 0; i < (size_t)h * w; ++i) {
      const size_t at = ((i / w) * 4 * w + (size_t)k * w + i % w) * png_channels;
      if (rgb) {
        int ch;
        for (ch = 0; ch < png_channels; ++ch) gray[at + ch] = rgb[((size_t)k * h * w + i) * ic + ch];
      } else {
        const float v = x[(size_t)k * c * h * w + i];
        const float p = floorf((v < -1 ? -1 : v > 1 ? 1 : v) * 127.5f + 127.5f + 0.5f);
        gray[at] = (unsigned char)(p > 255 ? 255 : p);
      }
    }
  if (!gray || write_png(out, gray, (uint32_t)(4 * w), (uint32_t)h, png_channels) != 0) {
    fprintf(stderr, "error: cannot write %s\n", out);
    s = TSTITCH_ERR_INVALID_ARGUMENT;
  } else {
    printf("wrote %s: 4 x %dx%d, %d steps, %s, %.2f ms, host overhead %.3f ms/step\n", out, h, w, info.steps,
           info.used_cuda_graph ? "one CUDA graph" : "plain launches", info.total_ms, info.host_overhead_ms_per_step);
  }
  free(gray);
  free(rgb);
  tstitch_free(x); /* malloc'd here or by tstitch_sample_alloc: both are free() */
  tstitch_close(rt);
  return s == TSTITCH_OK ? 0 : 2;
}
