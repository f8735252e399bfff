// Checksums remembered across processes, in the same place and format as Python's bundle/files.py: a file
// version found equal to its recorded sha256 once is not hashed again by either runtime (a 19 GB SDXL bundle
// costs seconds to minutes of hashing per open otherwise). A version is the file's identity and change time
// (device, inode, size, mtime and ctime in ns: ctime changes on every write and cannot be set back from user
// space), so any write to the file makes it hashed again.
#pragma once

#include <string>

namespace tstitch {

// Whether the file at `path` has this sha256: from the memo when this version of the file was verified
// before, else hashed (and remembered when equal). The memo lives in $TSTITCH_VERIFY_CACHE ("off": nowhere),
// else $XDG_CACHE_HOME/tstitch-trt/verified, else ~/.cache/tstitch-trt/verified; writing it is best effort.
bool file_has_sha256(const std::string& path, const std::string& sha256);

// The memo file of this version of `path` ("" when there is no memo directory or the file cannot be
// stat'ed): sha256 of Python's repr((realpath, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)).
std::string verified_memo_file(const std::string& path);

}  // namespace tstitch
