// The stress workload behind `dmakit stress`: threads allocate and free
// buffers and pool blocks of random sizes and lifetimes, free across
// threads, and check every byte they can: zeroed buffers are zero, patterns
// survive until free, each byte's IOVA is the buffer's IOVA plus its offset,
// and - on the simulated IOMMU - what the device reaches at that IOVA is
// exactly the host memory. At the end everything is freed and the domain's
// mappings must be back to where they started.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "core/settings.hpp"
#include "core/context.hpp"
#include "base/error.hpp"

namespace dmakit::core {

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
};

// Runs for s.seconds, or until *stop (when given) turns true; either way
// everything is freed and checked before it returns.
Result<StressReport> run_stress(Context& ctx, const StressSettings& s,
                                const std::atomic<bool>* stop = nullptr);

}  // namespace dmakit::core
