// Timing helpers shared by the benchmarks: a monotonic clock and the median
// of repeated runs (one process, so ratios between cases are meaningful).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <vector>

namespace dmakit::bench {

inline uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

// Runs fn `repeats` times and returns the median duration in ns.
uint64_t median_ns(int repeats, const std::function<void()>& fn);

// Median of a set of samples (sorted copy).
double median(std::vector<double> samples);

}  // namespace dmakit::bench
