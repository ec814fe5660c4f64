// The stress workload behind `dmakit stress`: threads allocate and free
// buffers and pool blocks of random sizes and lifetimes, free across
// threads, and check every byte they can: zeroed buffers are zero, patterns
// survive until free, each byte's IOVA is the buffer's IOVA plus its offset,
// and - on the simulated IOMMU - what the device reaches at that IOVA is
// exactly the host memory. At the end everything is freed and the domain's
// mappings must be back to where they started.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <cstdint>
#include <string>

#include "core/settings.hpp"
#include "core/context.hpp"
#include "base/error.hpp"

namespace dmakit::core {

// Latencies of one kind of operation in power-of-two buckets of
// nanoseconds: quantiles are bucket upper bounds (within a factor of two),
// the maximum is exact.
struct LatencyHistogram {
  uint64_t buckets[64] = {};
  uint64_t count = 0, max_ns = 0;

  void add(uint64_t ns) {
    ++buckets[ns == 0 ? 0 : 64 - __builtin_clzll(ns) - 1];
    ++count;
    if (ns > max_ns) max_ns = ns;
  }
  void merge(const LatencyHistogram& o) {
    for (int i = 0; i < 64; ++i) buckets[i] += o.buckets[i];
    count += o.count;
    if (o.max_ns > max_ns) max_ns = o.max_ns;
  }
  // The smallest bucket bound below which a share q (0..1) of the samples lie.
  uint64_t quantile_ns(double q) const {
    if (count == 0) return 0;
    const auto want = static_cast<uint64_t>(q * static_cast<double>(count - 1)) + 1;
    uint64_t seen = 0;
    for (int i = 0; i < 64; ++i)
      if ((seen += buckets[i]) >= want) return std::min<uint64_t>((2ull << i) - 1, max_ns);
    return max_ns;
  }
};

// The operations the report times.
enum class StressOp { buffer_alloc, buffer_free, block_alloc, block_free };
inline constexpr const char* kStressOpNames[] = {"buffer alloc", "buffer free", "block alloc", "block free"};
inline constexpr size_t kStressOps = 4;

// What a running stress reports about itself, about once per interval.
struct StressProgress {
  double seconds = 0;
  uint64_t ops = 0, failures = 0;
};

struct StressReport {
  uint64_t ops = 0;             // allocations + frees + device checks
  uint64_t failures = 0;        // checks that failed
  double seconds = 0;
  std::string backend;
  uint64_t buffer_allocs = 0, buffer_bytes = 0, block_allocs = 0, cross_thread_frees = 0;
  uint64_t device_checks = 0;   // buffers/blocks read back through the IOMMU model
  uint64_t refused_bad_frees = 0;  // deliberate double frees that were refused (as they must be)
  uint64_t alloc_errors = 0;    // allocations refused for lack of memory (not failures)
  uint64_t mappings_at_end = 0, mappings_at_start = 0;
  std::string first_failure;    // the first failed check, for the user
  bool interrupted = false;     // *stop was raised before the time was up
  LatencyHistogram latency[kStressOps];  // by StressOp
};

// Runs for s.seconds (or until s.ops operations when that is set, with
// s.seconds still the limit), or until *stop (when given) turns true; either way
// everything is freed and checked before it returns.
// progress (when given) is called from the calling thread about every
// progress_every while the workers run.
Result<StressReport> run_stress(Context& ctx, const StressSettings& s, const std::atomic<bool>* stop = nullptr,
                                const std::function<void(const StressProgress&)>& progress = {},
                                std::chrono::milliseconds progress_every = std::chrono::seconds(1));

}  // namespace dmakit::core
