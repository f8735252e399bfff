/* tstitch-trt C API: T-Stitch diffusion sampling from an engine bundle, no Python in the process.
 *
 * Contract: every function returns a tstitch_status (TSTITCH_OK = 0); on failure a one-line
 * message saying what is wrong and what to do is in tstitch_last_error() (thread-local, valid until
 * the next call on this thread). No C++ exception crosses this boundary. Structs carry their own
 * size (struct_size): initialise them with the *_init functions so older callers keep working.
 * Handles are checked against the set of open handles: a NULL, unknown or closed handle is
 * TSTITCH_ERR_BAD_HANDLE, never a crash. A handle may be used by one thread at a time.
 * Compiles as C11 and C++. */
#ifndef TSTITCH_TSTITCH_H
#define TSTITCH_TSTITCH_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TSTITCH_API_VERSION 7  /* 2: tstitch_request.text_context (SD); 3: tstitch_request.height/width (SD);
                                  4: named request inputs (SDXL text_embeds / time_ids, ControlNet control_image),
                                     the ControlNet fields, "embedding" (LCM) guidance, the lcm sampler. A caller
                                     built against version 3 (struct_size of the version-3 request) keeps working.
                                  5: the openvino engine (CPU), engine NULL = auto, tstitch_open_params.precision,
                                     tstitch_engine, prompts as UTF-8 text (tstitch_request.prompts). A caller
                                     built against version 4 (its smaller structs) keeps working.
                                  6: feature caching (tstitch_request.cache_interval / cache_branch: DeepCache and
                                     FORA bundles; tstitch_cache_plan). A caller built against version 5 (or 4, 3) keeps working: its
                                     requests run without caching.
                                  7: tstitch_sample_info.truncated_prompts and .notes (a prompt cut to the tokenizer's
                                     length is said, not silent). A caller built against version 6 or older (its smaller
                                     tstitch_sample_info) keeps working. */

typedef enum tstitch_status {
  TSTITCH_OK = 0,
  TSTITCH_ERR_INVALID_ARGUMENT = 1, /* a NULL pointer, a wrong struct_size, a value out of range */
  TSTITCH_ERR_BAD_HANDLE = 2,       /* NULL, unknown or already closed runtime handle */
  TSTITCH_ERR_BUNDLE = 3,           /* missing / corrupt manifest, sealed-path violation, checksum mismatch */
  TSTITCH_ERR_INCOMPATIBLE = 4,     /* engine built for another GPU or TensorRT version */
  TSTITCH_ERR_UNAVAILABLE = 5,      /* not built into this library (e.g. no TensorRT / OpenVINO at build time) */
  TSTITCH_ERR_NO_DEVICE = 6,        /* no usable CUDA device */
  TSTITCH_ERR_OUT_OF_MEMORY = 7,    /* device allocation failed; everything allocated was freed */
  TSTITCH_ERR_RUNTIME = 8,          /* a CUDA, TensorRT or OpenVINO call failed */
  TSTITCH_ERR_NON_FINITE = 9,       /* a step produced NaN/Inf (the message names the step and model) */
  TSTITCH_ERR_BUFFER_TOO_SMALL = 10,/* the caller's output buffer is smaller than the result */
  TSTITCH_ERR_INTERNAL = 11
} tstitch_status;

typedef struct tstitch_runtime tstitch_runtime; /* opaque */

typedef struct tstitch_open_params {
  size_t struct_size;    /* sizeof(tstitch_open_params) (a version-4 binary's smaller size is accepted) */
  const char* engine;    /* "openvino": the bundle's fp32 ONNX graphs on the CPU (OpenVINO); "trt": TensorRT engines on
                            a CUDA GPU; NULL = auto, as `tstitch-trt run --backend auto`: trt where this library has
                            TensorRT, a GPU is present and the bundle has trt engines, else openvino (API < 5: "trt") */
  int device_index;      /* CUDA device, default 0 */
  int cuda_graph;        /* 1 (default): the whole trajectory as one CUDA graph (trt); 0: plain launches */
  int verify_checksums;  /* 1 (default): sha256 of every engine file against the manifest */
  /* ---- API 5 ---- */
  const char* precision; /* openvino: "fp32", "bf16" (needs a CPU with native bf16), or NULL / "auto": bf16 only for
                            models whose bundle records bf16 as safe (tstitch-trt check --record) on a bf16 CPU, as
                            `tstitch-trt run --precision auto`; trt: NULL only (its engines have their own) */
} tstitch_open_params;

/* One named request input of the step graphs (API 4): float32, row-major, in the shape the bundle's
 * io gives it for this request (tstitch_input_shape). */
typedef struct tstitch_input {
  const char* name;   /* "text_embeds" (SDXL: N x P pooled prompt embeddings), "time_ids" (SDXL: N x 6; optional:
                         left out, every row is diffusers' default (height, width, 0, 0, height, width)),
                         "control_image" (ControlNet: batch x channels x height x width in [0, 1], the image size) */
  const float* data;
  size_t count;       /* floats in data */
} tstitch_input;

typedef struct tstitch_request {
  size_t struct_size;            /* sizeof(tstitch_request) (a version-3, -4 or -5 binary's smaller size is accepted) */
  int batch;                     /* images in the request; within the engines' batch range */
  /* DiT (class-conditional) */
  const int64_t* class_labels;   /* batch labels in [0, num_classes) */
  /* SD (text-to-image): token ids come from the caller's tokenizer (or give prompts as text below) */
  const int64_t* prompt_tokens;  /* batch x token_count (SD 1.x bundles; SDXL's two tokenizers: give prompts as text,
                                    or text_context + the text_embeds input) */
  const int64_t* negative_tokens;/* batch x token_count (cfg guidance; the tokenized "" for no negative prompt);
                                    NULL under "embedding" (LCM) guidance, which takes no negative prompt */
  int token_count;
  const float* added_conditions; /* unused, must be NULL: API 4 takes SDXL's text_embeds / time_ids in inputs */
  int added_condition_count;
  /* the trajectory */
  int steps;                     /* sampling steps, >= 1 */
  double ratio;                  /* two models: fraction of steps on the small one (used when fractions == NULL) */
  const double* fractions;       /* K models: one fraction per model, summing to 1; or NULL */
  int num_fractions;
  const char* sampler;           /* DiT: "ddim" (NULL), "ddpm", "dpm-solver++"; SD: "pndm", "ddim", "euler",
                                    "dpm-solver++", "lcm" (NULL: the bundle's scheduler) */
  double eta;                    /* DDIM eta */
  float cfg_scale;               /* guidance scale (<= 1: none, as diffusers): classifier-free guidance under cfg;
                                    under "embedding" guidance the step graphs embed (scale - 1) (LCM) */
  uint64_t seed;                 /* numpy default_rng(seed): the same noise as the Python runtime */
  const float* init_noise;       /* optional batch x C x H x W initial latent (then seed feeds only step noise) */
  /* SD: the text context from the caller's text encoder(s) (instead of prompt_tokens): float32 N x text_tokens
     x text_width, N = 2 x batch under cfg guidance (the negative-prompt (unconditional) rows first), N = batch
     under the bundle's "embedding" (LCM) guidance. SDXL: both encoders' penultimate states, concatenated. */
  const float* text_context;
  int text_tokens;
  int text_width;
  /* SD: the image size in pixels (0: the U-Net's sample size x the VAE factor), multiples of the VAE
     factor x the U-Nets' downsampling, within the bundle's io.dim_ranges; the latent is height/f x
     width/f (init_noise and latents are sized by it). DiT: leave 0. */
  int height;
  int width;
  /* ---- API 4 (beyond a version-3 struct_size these read as their _init defaults) ---- */
  /* The step graphs' other request inputs by name (tstitch_input); N as for text_context. NULL / 0: none. */
  const tstitch_input* inputs;
  int num_inputs;
  /* ControlNet bundles (diffusers' meaning): the ControlNet's residuals are scaled by controlnet_scale on U-Net
     calls i of n with start <= i / n and (i + 1) / n <= end, else 0; guess mode: no residuals on the
     unconditional half, residuals weighted by logspace(-1, 0). Defaults 1, 0, 1, 0; other values are refused
     on bundles without a ControlNet. */
  float controlnet_scale;
  double control_guidance_start;
  double control_guidance_end;
  int control_guess_mode;
  /* ---- API 5 (beyond a version-4 struct_size these read as NULL / 0) ---- */
  /* SD, SDXL: prompts as UTF-8 text, one per image (num_prompts == batch), tokenized here exactly as the Python
     pipeline tokenizes them with the bundle's tokenizer.json(s) (instead of prompt_tokens / text_context) and encoded
     by the bundle's text encoder(s) (SDXL: both, the context concatenated, text_embeds the second's pooled output:
     leave text_embeds out of inputs; time_ids stay an optional input). negative_prompts: one per image under cfg
     guidance (NULL: none, as diffusers' negative_prompt=None: "" for each on SD 1.x, zero embeddings on SDXL bundles
     with force_zeros_for_empty_prompt); none under "embedding" (LCM) guidance. */
  const char* const* prompts;
  int num_prompts;
  const char* const* negative_prompts;
  int num_negative_prompts;
  /* ---- API 6 (a version-5 or older struct_size reads these as 1 and -1: no caching) ---- */
  /* Feature caching, as `tstitch-trt run --cache-interval N --cache-branch K`: on a bundle built with
     `--cache-branch K` (SD U-Nets: DeepCache) or `--cache-scheme fora` (DiT), interval N > 1 runs each model's full
     step graph on every N-th of its calls, counted afresh from its first call after a stitch switch (that call is
     always full: no model reads another's features), and its cached step graph, on the kept feature, in between:
     the same plan as Python's. 1 (default): every call full. Bounds 1..1000; N > 1 on a bundle without cached step
     graphs is refused. cache_branch: -1 (default) or the DeepCache branch the caller expects, checked against the
     bundle's (the branch is fixed when the bundle is built; DiT bundles take -1 only). */
  int cache_interval;
  int cache_branch;
} tstitch_request;

typedef struct tstitch_sample_info {
  size_t struct_size;            /* sizeof(tstitch_sample_info) (a version-6 or older binary's smaller size is accepted) */
  int used_cuda_graph;           /* 1: one graph launch for the whole trajectory */
  int steps;
  double total_ms;               /* prepare + run + read back */
  double host_overhead_ms_per_step; /* mean(step wall - engine time) of plain launches; -1 if unknown */
  /* ---- API 7 (not written for a version-6 or older struct_size) ---- */
  int truncated_prompts;         /* prompts and negative prompts given as text that were longer than the tokenizer's
                                    length (77 tokens for CLIP) and were cut to it, as diffusers and the Python pipeline
                                    do; the notes name them. 0: none */
  const char* notes;             /* the run's notes, one per line ("" when none), in the Python run report's words:
                                    "prompt '...' is longer than 77 tokens and was truncated (as diffusers does)", a CUDA
                                    graph that could not be used; valid until the next sample or close on this handle */
} tstitch_sample_info;

int tstitch_api_version(void);
const char* tstitch_last_error(void);
const char* tstitch_status_name(tstitch_status status);

void tstitch_open_params_init(tstitch_open_params* params);
void tstitch_request_init(tstitch_request* request);
void tstitch_sample_info_init(tstitch_sample_info* info);

/* Open a bundle directory: manifest, sealed paths, checksums, engine compatibility, device buffers. */
tstitch_status tstitch_open(const char* bundle_dir, const tstitch_open_params* params, tstitch_runtime** out);
/* Close and invalidate the handle; closing NULL is OK, closing twice is TSTITCH_ERR_BAD_HANDLE. */
tstitch_status tstitch_close(tstitch_runtime* runtime);

/* The engine running (API 5: "openvino" or "trt", what NULL resolved to) and one line on its precision and why;
 * both valid while the handle is open. */
tstitch_status tstitch_engine(tstitch_runtime* runtime, const char** engine, const char** precision);

/* The latent shape (C, H, W), the number of stitched models, the batch range of the engines. */
tstitch_status tstitch_latent_shape(tstitch_runtime* runtime, int* channels, int* height, int* width);
tstitch_status tstitch_model_count(tstitch_runtime* runtime, int* count);
tstitch_status tstitch_batch_range(tstitch_runtime* runtime, int* min_batch, int* max_batch);

/* The step graphs' request inputs (the text context first, then the named ones), and the shape one takes for
 * a request of `batch` images at height x width pixels (0, 0: the default size): rank <= 8 dims into dims. */
tstitch_status tstitch_input_count(tstitch_runtime* runtime, int* count);
tstitch_status tstitch_input_name(tstitch_runtime* runtime, int index, const char** name);
tstitch_status tstitch_input_shape(tstitch_runtime* runtime, const char* name, int batch, int height, int width,
                                   int64_t dims[8], int* rank);

/* The decoded image of one item at the bundle's default size, H x W x channels bytes (an SD request
 * with height/width set decodes to height x width): through the bundle's VAE engine (channels 3),
 * or for a pixel-space bundle (no VAE, latent_scale_factor 1) the latent itself, as the Python
 * pipelines give. TSTITCH_ERR_UNAVAILABLE (with the reason) when the bundle makes latents only. */
tstitch_status tstitch_image_shape(tstitch_runtime* runtime, int* height, int* width, int* channels);

/* Sample into the caller's buffer: latents holds batch*C*h*w floats (capacity in floats; h, w the
 * request's latent size: tstitch_latent_shape, or height/f x width/f for an SD request that sets them).
 * rgb: NULL for latents only, or batch*H*W*channels bytes (tstitch_image_shape) that receive the
 * decoded images as uint8 HWC: clip((x + 1) * 127.5 + 0.5, 0, 255) of the VAE's [-1, 1] output. */
tstitch_status tstitch_sample(tstitch_runtime* runtime, const tstitch_request* request, float* latents,
                              size_t latents_capacity, uint8_t* rgb, size_t rgb_capacity, tstitch_sample_info* info);
/* Sample into a buffer this library allocates (free it with tstitch_free); *count = floats written. */
tstitch_status tstitch_sample_alloc(tstitch_runtime* runtime, const tstitch_request* request, float** latents,
                                    size_t* count, tstitch_sample_info* info);
void tstitch_free(void* buffer);
/* API 6: the request's feature-caching plan, the one tstitch_sample follows: for each U-Net (SD) / DiT call of its
 * trajectory, cached[i] = 1 where the model's cached step graph runs, 0 where its full one does (the 0s are
 * `tstitch-trt run`'s report "full calls"); *calls = the trajectory's calls. cached NULL: the count only;
 * capacity in bytes (TSTITCH_ERR_BUFFER_TOO_SMALL below *calls). The request is checked as for sampling. */
tstitch_status tstitch_cache_plan(tstitch_runtime* runtime, const tstitch_request* request, uint8_t* cached,
                                  size_t capacity, int* calls);

#ifdef __cplusplus
}
#endif

#endif /* TSTITCH_TSTITCH_H */
