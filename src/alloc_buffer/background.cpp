// The allocator's own threads: the zeroing thread, which turns dirty
// recycled buffers clean, and the memory-pressure thread, which retires
// recycled memory on a PSI event (arm_psi, called by start()). The design is in
// buffer_allocator.hpp; the map of the allocator's files in allocator.hpp.
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <pthread.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>

#include "alloc_buffer/allocator.hpp"
#include "base/fault_inject.hpp"
#include "base/log.hpp"

namespace dmakit::alloc_buffer {

void Allocator::zero_loop() {
  ::pthread_setname_np(::pthread_self(), "dmakit-zero");
  std::unique_lock lock(mu_);
  for (;;) {
    work_cv_.wait(lock, [&] { return stopping_ || (hold_zeroing_ == 0 && dirty_bytes_ != 0); });
    if (stopping_) return;
    for (auto& [len, sc] : classes_) {
      if (sc.dirty.empty()) continue;
      zeroing_ = sc.dirty.pop();
      break;
    }
    // zeroing_ owns it while the lock is dropped; only this thread touches
    // the record, and others only test zeroing_ for null under the lock.
    Impl& b = *zeroing_;
    dirty_bytes_ -= b.span.len;
    lock.unlock();
    zero_memory(b);
    lock.lock();
    // The class is still there (idle() spares it while zeroing_ is
    // of its size), so filing the record back allocates nothing.
    classes_.find(b.span.len)->second.clean.push(std::move(zeroing_));  // leaves zeroing_ null
    clean_bytes_ += b.span.len;
    idle_cv_.notify_all();
  }
}

bool Allocator::wait_prezeroed(std::chrono::milliseconds timeout) {
  if (!prezero_) return false;
  std::unique_lock lock(mu_);
  return idle_cv_.wait_for(lock, timeout, [&] { return dirty_bytes_ == 0 && zeroing_ == nullptr; });
}

// Memory pressure: a PSI trigger (150 ms of stall in a 2 s window) wakes
// this thread, which retires every recycled buffer and flushes the arena.
void Allocator::psi_loop(int psi_fd) {
  ::pthread_setname_np(::pthread_self(), "dmakit-psi");
  pollfd fds[2] = {{psi_fd, POLLPRI, 0}, {stop_fd_, POLLIN, 0}};
  for (;;) {
    int n = ::poll(fds, 2, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || (fds[1].revents & POLLIN) != 0) break;
    if ((fds[0].revents & POLLERR) != 0) {
      base::log().warn("buffer allocator: PSI trigger stopped (the monitor went away)");
      break;
    }
    if ((fds[0].revents & POLLPRI) != 0) {
      psi_events_.fetch_add(1, std::memory_order_relaxed);
      base::log().info("buffer allocator: memory pressure, releasing recycled memory");
      trim(true);
    }
  }
  psi_armed_.store(false);
  ::close(psi_fd);
}

// Arms the PSI trigger and starts psi_loop; without one (no PSI, no rights,
// no thread) memory pressure is simply not watched.
void Allocator::arm_psi() {
  int fd = ::open("/proc/pressure/memory", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  static std::once_flag logged;
  if (fd < 0) {
    int err = errno;
    std::call_once(logged, [err] {
      base::log().debug("buffer allocator: no memory-pressure trigger (/proc/pressure/memory: {})",
                        std::strerror(err));
    });
    return;
  }
  const char trig[] = "some 150000 2000000";
  if (::write(fd, trig, sizeof trig) < 0) {
    int err = errno;
    std::call_once(logged, [err] {
      base::log().debug("buffer allocator: PSI trigger refused: {}", std::strerror(err));
    });
    ::close(fd);
    return;
  }
  if (const int err = base::fault::inject(base::fault::Point::allocator_eventfd))
    errno = err;
  else
    stop_fd_ = ::eventfd(0, EFD_CLOEXEC);
  if (stop_fd_ < 0) {
    base::log().warn("buffer allocator: eventfd: {}; no memory-pressure trigger", std::strerror(errno));
    ::close(fd);
    return;
  }
  try {
    psi_thread_ = std::thread([this, fd] { psi_loop(fd); });
  } catch (const std::exception& e) {  // system_error, or bad_alloc for the thread's state
    base::log().warn("buffer allocator: no memory-pressure thread: {}", e.what());
    ::close(fd);
    return;
  }
  psi_armed_.store(true);
}

}  // namespace dmakit::alloc_buffer
