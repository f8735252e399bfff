/* The public header compiled as C11 (-pedantic -Werror), and the contract seen from C. */
#include <stdio.h>
#include <string.h>

#include "tstitch/tstitch.h"

static int failures = 0;
#define CHECK(cond)                                             \
  do {                                                          \
    if (!(cond)) {                                              \
      fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++failures;                                               \
    }                                                           \
  } while (0)

int main(int argc, char** argv) {
  tstitch_open_params params;
  tstitch_runtime* rt = NULL;
  int c = 0, h = 0, w = 0;
  const char* bundle = argc > 1 ? argv[1] : ".";
  CHECK(tstitch_api_version() == TSTITCH_API_VERSION);
  CHECK(tstitch_latent_shape(NULL, &c, &h, &w) == TSTITCH_ERR_BAD_HANDLE);
  CHECK(strchr(tstitch_last_error(), '\n') == NULL && strlen(tstitch_last_error()) > 0);
  tstitch_open_params_init(&params);
  params.struct_size = 1;
  CHECK(tstitch_open(bundle, &params, &rt) == TSTITCH_ERR_INVALID_ARGUMENT && rt == NULL);
  tstitch_open_params_init(&params);
  CHECK(tstitch_open(NULL, &params, &rt) == TSTITCH_ERR_INVALID_ARGUMENT);
  CHECK(tstitch_open("/nonexistent/bundle", &params, &rt) == TSTITCH_ERR_BUNDLE && rt == NULL);
  /* The toy bundle opens as far as this build allows: without TensorRT (or a GPU) it says why. */
  {
    tstitch_status s = tstitch_open(bundle, &params, &rt);
    CHECK(s == TSTITCH_OK || s == TSTITCH_ERR_UNAVAILABLE || s == TSTITCH_ERR_NO_DEVICE);
    if (s != TSTITCH_OK) printf("open: %s: %s\n", tstitch_status_name(s), tstitch_last_error());
    CHECK(tstitch_close(rt) == TSTITCH_OK);
  }
  CHECK(tstitch_close(NULL) == TSTITCH_OK);
  /* API 4: named inputs and the ControlNet fields, with their defaults, from C */
  {
    tstitch_request req;
    tstitch_input in;
    float v = 0.5f;
    tstitch_request_init(&req);
    CHECK(req.inputs == NULL && req.num_inputs == 0 && req.controlnet_scale == 1.0f && req.control_guidance_start == 0.0 &&
          req.control_guidance_end == 1.0 && req.control_guess_mode == 0);
    in.name = "control_image";
    in.data = &v;
    in.count = 1;
    req.inputs = &in;
    req.num_inputs = 1;
    CHECK(tstitch_sample(NULL, &req, &v, 1, NULL, 0, NULL) == TSTITCH_ERR_BAD_HANDLE);
  }
  if (failures == 0) printf("C API from C11: ok\n");
  return failures == 0 ? 0 : 1;
}
