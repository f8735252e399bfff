// Not installed: lets the tests open a C API handle on a backend of their own (the fake engine).
#pragma once

#include "runtime.hpp"
#include "tstitch/tstitch.h"

namespace tstitch {
tstitch_status open_with_factory(const char* bundle_dir, const tstitch_open_params* params,
                                 const BackendFactory& factory, tstitch_runtime** out,
                                 const char* default_engine = "trt");  // params.engine NULL; "" = auto
Runtime* runtime_of(tstitch_runtime* handle);  // nullptr unless open
}  // namespace tstitch
