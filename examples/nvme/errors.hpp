// Error values with printf-style messages (the driver needs no formatting
// library beyond the C one).
#pragma once

#include <cstdarg>
#include <cstdio>
#include <expected>
#include <string>

#include "nvme.hpp"

namespace nvme {

[[gnu::format(printf, 1, 2)]] inline std::string strf(const char* format, ...) {
  va_list ap;
  va_start(ap, format);
  char buf[512];
  const int n = std::vsnprintf(buf, sizeof buf, format, ap);
  va_end(ap);
  return n < 0 ? std::string(format) : std::string(buf);
}

inline std::unexpected<Error> fail(Errc code, std::string message) {
  return std::unexpected(Error{code, 0, std::move(message)});
}

// The error of a dmakit call, with what the driver was doing first.
inline std::unexpected<Error> fail(const Error& e, const std::string& doing) {
  return std::unexpected(Error{e.code, e.sys_errno, doing + ": " + e.message});
}

}  // namespace nvme
