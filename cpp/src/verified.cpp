#include "verified.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "manifest.hpp"
#include "pyrepr.hpp"

namespace tstitch {
namespace fs = std::filesystem;

namespace {

fs::path memo_dir() {
  const char* env = std::getenv("TSTITCH_VERIFY_CACHE");
  if (env && std::string(env) == "off") return {};
  if (env && *env) return env;
  fs::path base;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) base = x;
  else if (const char* h = std::getenv("HOME"); h && *h) base = fs::path(h) / ".cache";
  else return {};
  return base / "tstitch-trt" / "verified";
}

long long ns(const struct timespec& t) { return static_cast<long long>(t.tv_sec) * 1000000000LL + t.tv_nsec; }

bool is_digest(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

}  // namespace

std::string verified_memo_file(const std::string& path) {
  const fs::path dir = memo_dir();
  if (dir.empty()) return "";
  std::error_code ec;
  const fs::path real = fs::canonical(path, ec);  // Python's Path.resolve()
  struct stat st {};
  if (ec || ::stat(real.c_str(), &st) != 0) return "";
#ifdef __APPLE__
  const long long mtime = ns(st.st_mtimespec), ctime = ns(st.st_ctimespec);
#else
  const long long mtime = ns(st.st_mtim), ctime = ns(st.st_ctim);
#endif
  const std::string key = "(" + py_repr(nlohmann::ordered_json(real.string())) + ", " +
                          std::to_string(static_cast<unsigned long long>(st.st_dev)) + ", " +
                          std::to_string(static_cast<unsigned long long>(st.st_ino)) + ", " +
                          std::to_string(static_cast<long long>(st.st_size)) + ", " + std::to_string(mtime) + ", " +
                          std::to_string(ctime) + ")";
  return (dir / sha256_bytes(key.data(), key.size())).string();
}

bool file_has_sha256(const std::string& path, const std::string& sha256) {
  const std::string memo = verified_memo_file(path);
  if (!memo.empty()) {
    std::ifstream in(memo);
    std::string digest;
    if (in >> digest && is_digest(digest)) return digest == sha256;
  }
  const std::string digest = sha256_file(path);
  if (digest != sha256 || memo.empty()) return digest == sha256;
  std::error_code ec;  // best effort, as Python: a read-only or full cache directory means hashing next time
  fs::create_directories(fs::path(memo).parent_path(), ec);
  const fs::path tmp = fs::path(memo).parent_path() / ("." + fs::path(memo).filename().string() + "." + std::to_string(::getpid()));
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << digest;
    if (!out.flush()) {
      fs::remove(tmp, ec);
      return true;
    }
  }
  fs::rename(tmp, memo, ec);
  if (ec) fs::remove(tmp, ec);
  return true;
}

}  // namespace tstitch
