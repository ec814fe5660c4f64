#include "base/clock.hpp"

namespace dmakit::base {

namespace detail {
std::atomic<bool> g_manual_clock{false};
std::atomic<int64_t> g_manual_ns{0};
}  // namespace detail

ManualClock::ManualClock() {
  // The later of the two clocks, so no reading taken before goes backwards.
  timespec a{}, b{};
  clock_gettime(CLOCK_MONOTONIC, &a);
  clock_gettime(CLOCK_MONOTONIC_COARSE, &b);
  const int64_t fine = int64_t{a.tv_sec} * 1'000'000'000 + a.tv_nsec;
  const int64_t coarse = int64_t{b.tv_sec} * 1'000'000'000 + b.tv_nsec;
  detail::g_manual_ns.store(fine > coarse ? fine : coarse, std::memory_order_relaxed);
  detail::g_manual_clock.store(true, std::memory_order_seq_cst);
}

ManualClock::~ManualClock() {
  // Back to the real clock, which is behind the manual time by what the test
  // advanced; readers compare differences, so a step back only delays bounds.
  detail::g_manual_clock.store(false, std::memory_order_seq_cst);
}

void ManualClock::advance(std::chrono::nanoseconds d) {
  detail::g_manual_ns.fetch_add(d.count(), std::memory_order_relaxed);
}

}  // namespace dmakit::base
