/* A test driver over the C API (C11): open a bundle, sample one request, write the raw results for a
 * Python test to compare with its own pipeline (tests/test_cpp_openvino.py).
 *   tstitch_sample_dump key=value ...
 * keys: bundle engine precision steps ratio sampler cfg seed eta batch labels=1,2,.. (DiT)
 *       height width (SD) prompt=<file> negative=<file> (SD: int64 token ids, batch x tokens, raw little endian)
 *       tokens=<count per prompt> inputs=<name>:<file>[,...] (float32 raw) out=<latents.f32> rgb=<images.u8>
 *       prompts=<file> negative_prompts=<file> (SD, SDXL: prompts as text, NUL-separated)
 *       controlnet_scale control_start control_end guess_mode (ControlNet bundles)
 *       cache_interval cache_branch (DeepCache / FORA bundles; prints "cached calls: i,j,..", the plan it follows)
 * Prints "engine <name>; <precision line>", the sample info, "truncated prompts <n>" and (when any) "notes:" with the
 * run's notes one per line; on failure one line on stderr, exit 2. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tstitch/tstitch.h"

#define MAX_INPUTS 8

static const char* arg(int argc, char** argv, const char* key) {
  const size_t n = strlen(key);
  int i;
  for (i = 1; i < argc; ++i)
    if (strncmp(argv[i], key, n) == 0 && argv[i][n] == '=') return argv[i] + n + 1;
  return NULL;
}

static void* read_file(const char* path, size_t* size) {
  FILE* f = fopen(path, "rb");
  void* buf = NULL;
  long n;
  if (!f) return NULL;
  if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
    buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
      free(buf);
      buf = NULL;
    }
    *size = (size_t)n;
  }
  fclose(f);
  return buf;
}

static int write_file(const char* path, const void* data, size_t n) {
  FILE* f = fopen(path, "wb");
  if (!f) return -1;
  if (fwrite(data, 1, n, f) != n) {
    fclose(f);
    return -1;
  }
  return fclose(f) == 0 ? 0 : -1;
}

static int fail(const char* what) {
  fprintf(stderr, "error: %s\n", what);
  return 2;
}

int main(int argc, char** argv) {
  const char* bundle = arg(argc, argv, "bundle");
  const char* out = arg(argc, argv, "out");
  const char* rgb_path = arg(argc, argv, "rgb");
  const char* v;
  tstitch_open_params params;
  tstitch_request req;
  tstitch_sample_info info;
  tstitch_runtime* rt = NULL;
  tstitch_status s;
  tstitch_input inputs[MAX_INPUTS];
  void* owned[MAX_INPUTS + 3] = {0};
  int64_t labels[64];
  int n_owned = 0, c = 0, h = 0, w = 0, ih = 0, iw = 0, ic = 0, k, rc = 0;
  size_t n_lat, n_rgb = 0, size = 0;
  float* lat = NULL;
  uint8_t* rgb = NULL;
  const char *engine = NULL, *precision = NULL;
  if (!bundle || !out) return fail("usage: tstitch_sample_dump bundle=DIR out=FILE [key=value ...]");
  tstitch_open_params_init(&params);
  params.engine = arg(argc, argv, "engine");
  params.precision = arg(argc, argv, "precision");
  s = tstitch_open(bundle, &params, &rt);
  if (s != TSTITCH_OK) return fail(tstitch_last_error());
  tstitch_engine(rt, &engine, &precision);
  printf("engine %s; %s\n", engine, precision);
  tstitch_request_init(&req);
  if ((v = arg(argc, argv, "batch"))) req.batch = atoi(v);
  if ((v = arg(argc, argv, "steps"))) req.steps = atoi(v);
  if ((v = arg(argc, argv, "ratio"))) req.ratio = atof(v);
  if ((v = arg(argc, argv, "cfg"))) req.cfg_scale = (float)atof(v);
  if ((v = arg(argc, argv, "seed"))) req.seed = strtoull(v, NULL, 10);
  if ((v = arg(argc, argv, "eta"))) req.eta = atof(v);
  if ((v = arg(argc, argv, "height"))) req.height = atoi(v);
  if ((v = arg(argc, argv, "width"))) req.width = atoi(v);
  req.sampler = arg(argc, argv, "sampler");
  if ((v = arg(argc, argv, "controlnet_scale"))) req.controlnet_scale = (float)atof(v);
  if ((v = arg(argc, argv, "control_start"))) req.control_guidance_start = atof(v);
  if ((v = arg(argc, argv, "control_end"))) req.control_guidance_end = atof(v);
  if ((v = arg(argc, argv, "guess_mode"))) req.control_guess_mode = atoi(v);
  if ((v = arg(argc, argv, "cache_interval"))) req.cache_interval = atoi(v);
  if ((v = arg(argc, argv, "cache_branch"))) req.cache_branch = atoi(v);
  if ((v = arg(argc, argv, "labels"))) {
    char* end = NULL;
    for (k = 0; k < 64 && *v; ++k) {
      labels[k] = strtoll(v, &end, 10);
      v = *end == ',' ? end + 1 : end;
    }
    req.class_labels = labels;
  }
  if ((v = arg(argc, argv, "tokens"))) req.token_count = atoi(v);
  /* prompts as text: a file of prompts separated by NUL bytes (any UTF-8, or not), one per image */
  if ((v = arg(argc, argv, "prompts")) || (v = arg(argc, argv, "negative_prompts"))) {
    static const char* lists[2][64];
    int which;
    for (which = 0; which < 2; ++which) {
      char* text;
      size_t at = 0;
      int count = 0;
      if (!(v = arg(argc, argv, which == 0 ? "prompts" : "negative_prompts"))) continue;
      text = owned[n_owned++] = read_file(v, &size);
      if (!text) return fail("cannot read a prompts file");
      text[size] = 0;
      while (at < size && count < 64) {
        lists[which][count++] = text + at;
        at += strlen(text + at) + 1;
      }
      if (which == 0) req.prompts = lists[0], req.num_prompts = count;
      else req.negative_prompts = lists[1], req.num_negative_prompts = count;
    }
  }
  if ((v = arg(argc, argv, "prompt"))) req.prompt_tokens = owned[n_owned++] = read_file(v, &size);
  if ((v = arg(argc, argv, "negative"))) req.negative_tokens = owned[n_owned++] = read_file(v, &size);
  if ((v = arg(argc, argv, "inputs"))) {
    char* spec = owned[n_owned++] = malloc(strlen(v) + 1);
    char* item;
    strcpy(spec, v);
    for (item = strtok(spec, ","); item && req.num_inputs < MAX_INPUTS; item = strtok(NULL, ",")) {
      char* colon = strchr(item, ':');
      if (!colon) return fail("inputs=name:file[,...]");
      *colon = 0;
      inputs[req.num_inputs].name = item;
      inputs[req.num_inputs].data = owned[n_owned++] = read_file(colon + 1, &size);
      inputs[req.num_inputs].count = size / sizeof(float);
      req.num_inputs++;
    }
    req.inputs = inputs;
  }
  /* the latent size: the request's height/width over the VAE factor, else the bundle's */
  tstitch_latent_shape(rt, &c, &h, &w);
  if (tstitch_image_shape(rt, &ih, &iw, &ic) == TSTITCH_OK && req.height && req.width) {
    h = req.height / (ih / h), w = req.width / (iw / w);
    ih = req.height, iw = req.width;
  }
  n_lat = (size_t)req.batch * c * h * w;
  lat = malloc(n_lat * sizeof(float));
  if (rgb_path) {
    if (tstitch_image_shape(rt, &ih, &iw, &ic) != TSTITCH_OK) return fail(tstitch_last_error());
    if (req.height && req.width) ih = req.height, iw = req.width;
    n_rgb = (size_t)req.batch * ih * iw * ic;
    rgb = malloc(n_rgb);
  }
  if (arg(argc, argv, "cache_interval")) {  /* the plan the sample follows, before it runs */
    static uint8_t plan[4096];
    int calls = 0;
    if (tstitch_cache_plan(rt, &req, plan, sizeof plan, &calls) != TSTITCH_OK) {
      rc = fail(tstitch_last_error());
    } else {
      printf("cached calls:");
      for (k = 0; k < calls; ++k)
        if (plan[k]) printf(" %d", k);
      printf("\n");
    }
  }
  tstitch_sample_info_init(&info);
  s = rc ? TSTITCH_OK : tstitch_sample(rt, &req, lat, n_lat, rgb, n_rgb, &info);
  if (rc) {
    /* refused above: nothing written */
  } else if (s != TSTITCH_OK) {
    rc = fail(tstitch_last_error());
  } else if (write_file(out, lat, n_lat * sizeof(float)) != 0 || (rgb && write_file(rgb_path, rgb, n_rgb) != 0)) {
    rc = fail("cannot write the results");
  } else {
    printf("steps %d, %.3f ms, host overhead %.4f ms/step\n", info.steps, info.total_ms, info.host_overhead_ms_per_step);
    printf("truncated prompts %d\n", info.truncated_prompts);
    if (info.notes[0]) printf("notes:\n%s\n", info.notes);
  }
  free(lat);
  free(rgb);
  for (k = 0; k < n_owned; ++k) free(owned[k]);
  tstitch_close(rt);
  return rc;
}
