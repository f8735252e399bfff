// sha256 of files and bytes, with OpenSSL's EVP interface.
#include <openssl/evp.h>

#include <cstdio>
#include <memory>
#include <vector>

#include "errors.hpp"
#include "manifest.hpp"

namespace tstitch {
namespace {

struct MdCtxDeleter {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};
struct FileCloser {
  void operator()(FILE* f) const { std::fclose(f); }
};

std::string hex(const unsigned char* d, unsigned n) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (unsigned i = 0; i < n; ++i) s += digits[d[i] >> 4], s += digits[d[i] & 15];
  return s;
}

std::unique_ptr<EVP_MD_CTX, MdCtxDeleter> new_ctx() {
  std::unique_ptr<EVP_MD_CTX, MdCtxDeleter> ctx(EVP_MD_CTX_new());
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) fail(TSTITCH_ERR_INTERNAL, "OpenSSL sha256 init failed");
  return ctx;
}

std::string finish(EVP_MD_CTX* ctx) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  if (EVP_DigestFinal_ex(ctx, md, &n) != 1) fail(TSTITCH_ERR_INTERNAL, "OpenSSL sha256 final failed");
  return hex(md, n);
}

}  // namespace

std::string sha256_bytes(const void* data, size_t n) {
  auto ctx = new_ctx();
  EVP_DigestUpdate(ctx.get(), data, n);
  return finish(ctx.get());
}

std::string sha256_file(const std::string& path) {
  std::unique_ptr<FILE, FileCloser> f(std::fopen(path.c_str(), "rb"));
  if (!f) fail(TSTITCH_ERR_BUNDLE, "cannot read " + path + "; check the bundle's permissions or rebuild it");
  auto ctx = new_ctx();
  std::vector<unsigned char> buf(1 << 20);
  size_t got;
  while ((got = std::fread(buf.data(), 1, buf.size(), f.get())) > 0) EVP_DigestUpdate(ctx.get(), buf.data(), got);
  if (std::ferror(f.get())) fail(TSTITCH_ERR_BUNDLE, "read error on " + path + "; rebuild the bundle");
  return finish(ctx.get());
}

}  // namespace tstitch
