// One exception type for the core: a status (the C API's code) and a one-line message that says
// what is wrong and what to do. Nothing else crosses the C boundary (c_api.cpp catches everything).
#pragma once

#include <stdexcept>
#include <string>

#include "tstitch/tstitch.h"

namespace tstitch {

class Error : public std::runtime_error {
 public:
  Error(tstitch_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  tstitch_status status() const { return status_; }

 private:
  tstitch_status status_;
};

[[noreturn]] inline void fail(tstitch_status status, const std::string& message) { throw Error(status, message); }

}  // namespace tstitch
