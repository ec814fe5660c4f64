#include "base/error.hpp"


namespace dmakit {

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

}  // namespace dmakit
