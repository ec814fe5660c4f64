// Reserves 2 MiB hugepages on demand for a test (nr_overcommit_hugepages is
// enough for an --in-memory EAL) and puts the old value back when it ends.
// Needs root; ok() says whether the kernel took the new value. One
// reservation at a time across processes (ctest -j runs test binaries side
// by side): two that overlapped each read the other's raised value and the
// last to end put that back, leaving pages reserved after the run.
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cstdint>
#include <fstream>

namespace dmakit::test {

class HugepageReservation {
 public:
  static constexpr const char* kOvercommit = "/proc/sys/vm/nr_overcommit_hugepages";
  static constexpr const char* kLock = "/tmp/dmakit-hugepage-reservation.lock";

  explicit HugepageReservation(uint64_t pages)
      : lock_fd_(::open(kLock, O_RDWR | O_CREAT | O_CLOEXEC, 0600)) {
    if (lock_fd_ >= 0) ::flock(lock_fd_, LOCK_EX);  // until the old value is back
    old_ = read();
    write(old_ + pages);
    ok_ = lock_fd_ >= 0 && read() == old_ + pages;
  }
  ~HugepageReservation() {
    write(old_);
    if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the lock
  }
  HugepageReservation(const HugepageReservation&) = delete;
  HugepageReservation& operator=(const HugepageReservation&) = delete;

  bool ok() const { return ok_; }

 private:
  static uint64_t read() {
    std::ifstream in(kOvercommit);
    uint64_t v = 0;
    in >> v;
    return v;
  }
  static void write(uint64_t v) {
    std::ofstream out(kOvercommit);
    out << v;
  }

  int lock_fd_ = -1;
  uint64_t old_ = 0;
  bool ok_ = false;
};

}  // namespace dmakit::test
