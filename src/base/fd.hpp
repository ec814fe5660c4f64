// UniqueFd: owns one file descriptor and closes it exactly once.
//
// Every kernel object dmakit talks to (the VFIO container, a group, a
// device, a sysfs attribute) is reached through an fd; wrapping each in a
// move-only owner means an early error return can never leak one.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <utility>

namespace dmakit::base {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  explicit operator bool() const noexcept { return valid(); }

  // Gives up ownership without closing.
  int release() noexcept { return std::exchange(fd_, -1); }

  // Closes the current fd (if any) and takes ownership of fd. close() errors
  // are ignored: the descriptor is gone either way and nothing can be retried.
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

}  // namespace dmakit::base
