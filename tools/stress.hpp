// The stress workload behind `dmakit stress` (the dmakit_stress library of
// the tool, which tests also link; not part of libdmakit). Threads
// allocate and free buffers and pool blocks and map and unmap memory of
// their own, in the proportions of stress.mix, with random sizes and
// lifetimes, free across threads, and check every byte they can: zeroed
// buffers are zero, patterns survive until free, each byte's IOVA is the
// buffer's IOVA plus its offset, and - on the simulated IOMMU - what the
// device reaches at that IOVA is exactly the host memory. At the end
// everything is freed and the domain's mappings must be back to where they
// started.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "core/context.hpp"
#include "core/settings.hpp"

namespace dmakit::tool {

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

// The kinds of operation stress.mix weighs: buffer alloc/free, pool block
// alloc/free, map_memory/unmap_memory of the worker's own memory.
enum class StressKind { buffers, blocks, maps };
inline constexpr const char* kStressKindNames[] = {"buffers", "blocks", "maps"};
inline constexpr size_t kStressKinds = 3;

struct KindReport {
  uint64_t ops = 0;  // calls made: allocations and frees (maps and unmaps)
  LatencyHistogram latency;
};

// What a running stress reports about itself, about once per interval.
struct StressProgress {
  double seconds = 0;
  uint64_t ops = 0, failures = 0;
};

// Process memory, the domain's mapping entries and the open fds at one time.
struct SoakSample {
  double seconds = 0;
  uint64_t rss_bytes = 0, mappings = 0, fds = 0;
};

// Whether a soak run's samples stayed flat after warm-up (check_soak).
struct SoakVerdict {
  bool flat = false;
  std::string why;  // the series that grew (or why there is no verdict); empty when flat
  size_t samples = 0, warmup = 0;
  SoakSample first_max, last_max;  // per series: the maxima of the first and last third after warm-up
};

// The soak rule. The first quarter of the samples is warm-up (the recycler,
// the arena's shards and the pools' caches fill to their steady size). The
// rest is cut into thirds; each series must have a last-third maximum no
// higher than its first-third maximum plus a tolerance. The workload's live
// set is a bounded random walk that reverts to half its caps, so every
// window of a healthy run reaches about the same maximum, while a leak keeps
// raising it. Tolerances: RSS 10% + 16 MiB (allocator caches, page-table and
// EAL growth that is not a leak), mappings 25% + 16 and fds 25% + 4 (a window
// may catch the live set nearer its cap than another). Fewer than 8 samples
// after warm-up give no verdict, which fails: a soak run must be long enough.
SoakVerdict check_soak(const std::vector<SoakSample>& samples);

struct StressReport {
  uint64_t ops = 0;             // workload operations, all kinds (kinds[].ops summed)
  uint64_t failures = 0;        // checks that failed
  double seconds = 0;
  std::string backend;
  KindReport kinds[kStressKinds];  // by StressKind
  uint64_t buffer_bytes = 0;    // bytes the buffer allocations asked for
  uint64_t cross_thread_frees = 0;
  uint64_t device_checks = 0;   // buffers/blocks/maps read back through the IOMMU model
  uint64_t misuse_checks = 0;   // deliberate misuse refused as it must be (double free, double map, ...)
  uint64_t validation_failures = 0;  // frees the workload's own pools refused (must be 0)
  uint64_t alloc_errors = 0;    // allocations refused for lack of memory (not failures)
  uint64_t flushes = 0;         // arena flushes during the run
  uint64_t order_fallbacks = 0; // buffer requests that dropped below an order that failed
  uint64_t peak_live_bytes = 0; // most bytes the workload held at once (buffers, blocks, maps)
  uint64_t peak_rss_bytes = 0;  // the process's peak resident memory (VmHWM)
  uint64_t mappings_at_end = 0, mappings_at_start = 0;
  std::string first_failure;    // the first failed check, for the user
  bool interrupted = false;     // *stop was raised before the time was up
  bool soak = false;            // samples were taken (StressOptions::soak)
  std::vector<SoakSample> samples;
  SoakVerdict soak_verdict;     // when soak
};

struct StressOptions {
  const std::atomic<bool>* stop = nullptr;  // raised (e.g. by a signal) ends the run early
  std::function<void(const StressProgress&)> progress;  // called from the calling thread
  std::chrono::milliseconds progress_every{1000};
  bool soak = false;            // sample RSS, mappings and fds; the run fails unless they stay flat
};

// Runs for s.seconds, or - when s.ops is set - until every worker has done
// its share of s.ops operations (s.seconds still the limit), or until
// *opts.stop turns true; either way everything is freed and checked before
// it returns. With s.ops and one seed, every worker makes the same choices
// in every run, so the operation counts per kind repeat (unless memory runs
// out, whose refusals change what a worker holds).
Result<StressReport> run_stress(core::Context& ctx, const core::StressSettings& s, const StressOptions& opts = {});

}  // namespace dmakit::tool
