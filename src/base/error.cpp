#include "dmakit/error.hpp"

#include <cstring>

namespace dmakit {

std::string_view errc_name(Errc e) noexcept {
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

Errc errc_from_errno(int err) noexcept {
  switch (err) {
    case EINVAL: case ERANGE: case EOVERFLOW: return Errc::invalid_argument;
    case ENOENT: case ENODEV: case ENXIO: return Errc::not_found;
    case EPERM: case EACCES: return Errc::permission;
    case EBUSY: return Errc::busy;
    case EEXIST: return Errc::exists;
    case ENOMEM: return Errc::no_memory;
    case ENOSPC: return Errc::no_space;
    case ENOTSUP: case ENOTTY: case ENOSYS: return Errc::unsupported;
    case EFAULT: return Errc::fault;
    case ETIMEDOUT: return Errc::timeout;
    default: return Errc::io;
  }
}

std::string Error::what() const {
  if (sys_errno == 0) return message;
  return fmt::format("{}: {} (errno {})", message, std::strerror(sys_errno), sys_errno);
}

}  // namespace dmakit
