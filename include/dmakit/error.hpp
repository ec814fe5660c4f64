// dmakit's error model, shared by the C++ API and the library: every
// fallible call returns Result<T> (std::expected) whose error names the
// object involved (path, BDF, size, ioctl) and, where the kernel said no,
// the errno and its text. Nothing throws across the API. Header-only and
// free of any dependency but the standard library.
#ifndef DMAKIT_ERROR_HPP
#define DMAKIT_ERROR_HPP

#include <cstring>
#include <expected>
#include <string>
#include <string_view>

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

inline std::string_view errc_name(Errc e) noexcept {
  switch (e) {
    case Errc::invalid_argument: return "invalid_argument";
    case Errc::not_found: return "not_found";
    case Errc::permission: return "permission";
    case Errc::busy: return "busy";
    case Errc::exists: return "exists";
    case Errc::no_memory: return "no_memory";
    case Errc::no_space: return "no_space";
    case Errc::unsupported: return "unsupported";
    case Errc::not_viable: return "not_viable";
    case Errc::fault: return "fault";
    case Errc::corrupted: return "corrupted";
    case Errc::io: return "io";
    case Errc::timeout: return "timeout";
    case Errc::internal: return "internal";
  }
  return "unknown";
}

struct Error {
  Errc code = Errc::internal;
  int sys_errno = 0;  // 0 when the error did not come from the kernel
  std::string message;

  // "message" or "message: <strerror> (errno N)".
  std::string what() const {
    if (sys_errno == 0) return message;
    return message + ": " + std::strerror(sys_errno) + " (errno " + std::to_string(sys_errno) + ")";
  }
};

template <class T>
using Result = std::expected<T, Error>;
using Status = std::expected<void, Error>;

}  // namespace dmakit

#endif  // DMAKIT_ERROR_HPP
