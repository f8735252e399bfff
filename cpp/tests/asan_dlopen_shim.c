/* Sanitizer builds only: oneTBB (inside the openvino wheel) dlopens libtbbbind with RTLD_DEEPBIND, which
 * AddressSanitizer refuses (google/sanitizers#611: it would abort the process). This dlopen, defined in the test
 * executable, comes before ASan's interceptor in symbol lookup: it clears only that flag and passes the call on.
 * tbbbind then binds to the process's one hwloc (the wheel's), which is what DEEPBIND would have picked anyway. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

void* dlopen(const char* file, int mode) {
  static void* (*next)(const char*, int) = NULL;
  if (next == NULL) *(void**)(&next) = dlsym(RTLD_NEXT, "dlopen");
  return next(file, mode & ~RTLD_DEEPBIND);
}
