// The library's monotonic clock, injectable for tests.
//
// Time-dependent logic (the arena's stale-age bound, the buffer allocator's
// order back-off, the host-memory guard's refresh) reads time here rather
// than from std::chrono or clock_gettime directly, so a test installs a
// ManualClock and advances it instead of sleeping. Not installed, a read costs
// one relaxed load of a flag that never changes in production (predicted)
// on top of the clock read itself.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <time.h>

namespace dmakit::base {

namespace detail {
extern std::atomic<bool> g_manual_clock;   // a ManualClock is installed
extern std::atomic<int64_t> g_manual_ns;   // its time

// `id` in nanoseconds, or the ManualClock's time while one is set.
inline int64_t now_ns(clockid_t id) {
  if (g_manual_clock.load(std::memory_order_relaxed)) [[unlikely]]
    return g_manual_ns.load(std::memory_order_relaxed);
  timespec ts{};
  clock_gettime(id, &ts);
  return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}
}  // namespace detail

// CLOCK_MONOTONIC in nanoseconds.
inline int64_t mono_now_ns() { return detail::now_ns(CLOCK_MONOTONIC); }

// CLOCK_MONOTONIC_COARSE (vDSO, a few ns, tick resolution) in nanoseconds;
// for bounds of milliseconds. Same time base as mono_now_ns under a
// ManualClock.
inline int64_t coarse_now_ns() { return detail::now_ns(CLOCK_MONOTONIC_COARSE); }

// For tests: while one lives, the library's time stands still at a point
// after the real clock's present and moves only by advance(). One at a time
// per process; time already read before it was installed stays comparable
// (it starts at the real time and never goes back).
class ManualClock {
 public:
  ManualClock();
  ~ManualClock();
  ManualClock(const ManualClock&) = delete;
  ManualClock& operator=(const ManualClock&) = delete;

  void advance(std::chrono::nanoseconds d);
  int64_t now_ns() const { return detail::g_manual_ns.load(std::memory_order_relaxed); }
};

}  // namespace dmakit::base
