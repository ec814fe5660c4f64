// dmakit error model: every fallible call returns Result<T> (std::expected)
// whose error names the object involved (path, BDF, size, ioctl) and, where
// the kernel said no, the errno and its text. Nothing throws across the API.
#pragma once

#include <cerrno>
#include <expected>
#include <fmt/format.h>
#include <string>
#include <string_view>
#include <utility>

namespace dmakit {

enum class Errc : int {
  invalid_argument = 1,  // caller's input is wrong (size, alignment, BDF syntax, config value)
  not_found,             // file, device, group, key or mapping does not exist
  permission,            // EPERM/EACCES, RLIMIT_MEMLOCK too low
  busy,                  // EBUSY: already open, in use, lock held
  exists,                // EEXIST: overlapping mapping, duplicate name
  no_memory,             // host memory (hugepages, pages, pinning) exhausted
  no_space,              // IOVA space or mapping entries exhausted
  unsupported,           // the kernel or hardware lacks the feature
  not_viable,            // VFIO group has devices not bound to vfio-pci
  fault,                 // a (simulated) device access that the IOMMU blocked
  corrupted,             // validation of a caller-supplied object failed (double free, foreign pointer)
  io,                    // any other system error
  timeout,               // device did not answer in time
  internal,              // a dmakit bug; please report
};

std::string_view errc_name(Errc e) noexcept;

// Maps an errno value to the closest Errc.
Errc errc_from_errno(int err) noexcept;

struct Error {
  Errc code = Errc::internal;
  int sys_errno = 0;  // 0 when the error did not come from the kernel
  std::string message;

  // "message" or "message: <strerror> (errno N)".
  std::string what() const;
};

template <class T>
using Result = std::expected<T, Error>;
using Status = std::expected<void, Error>;

inline std::unexpected<Error> fail(Errc code, std::string message) {
  return std::unexpected(Error{code, 0, std::move(message)});
}

template <class... Args>
std::unexpected<Error> fail(Errc code, fmt::format_string<Args...> f, Args&&... args) {
  return std::unexpected(Error{code, 0, fmt::format(f, std::forward<Args>(args)...)});
}

// Error from an errno value; the message should name the call and the object,
// e.g. fail_errno(errno, "VFIO_GROUP_GET_STATUS on /dev/vfio/7").
inline std::unexpected<Error> fail_errno(int err, std::string message) {
  return std::unexpected(Error{errc_from_errno(err), err, std::move(message)});
}

template <class... Args>
std::unexpected<Error> fail_errno(int err, fmt::format_string<Args...> f, Args&&... args) {
  return std::unexpected(
      Error{errc_from_errno(err), err, fmt::format(f, std::forward<Args>(args)...)});
}

inline Status ok() { return {}; }

// Prefixes context onto an error travelling up: "while X: <inner message>".
inline Error with_context(Error e, std::string_view context) {
  e.message = std::string(context) + ": " + e.message;
  return e;
}

}  // namespace dmakit

// Propagates the error of a Result expression, or yields its value
// (a GNU statement expression: GCC and Clang, which is all dmakit targets).
#define DMAKIT_TRY(expr)                                      \
  __extension__({                                             \
    auto&& dmakit_try_r_ = (expr);                            \
    if (!dmakit_try_r_) return std::unexpected(std::move(dmakit_try_r_).error()); \
    std::move(dmakit_try_r_).value();                         \
  })
