// A pool Backing for tests and the pool benchmark's host-only rows (test
// support, not part of libdmakit).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "pool/dma_pool.hpp"

namespace dmakit::pool {

// Page-aligned anonymous host memory with synthetic IOVAs, for tests and for
// measuring the pool logic alone. Not mapped for any device.
struct HostBackingOptions {
  uint64_t iova_base = 0x1'0000'0000;  // first IOVA handed out
  uint64_t iova_skew = 0;              // added to each region's IOVA (page multiple): unaligned IOVAs
  uint64_t va_skew = 0;                // added to each region's vaddr (page multiple): unaligned VAs
  uint32_t max_regions = 0;            // grow fails after this many; 0 = unlimited
  struct Counters {
    std::atomic<uint64_t> grown{0}, released{0}, abandoned{0};
  };
  std::shared_ptr<Counters> counters;  // optional, outlives the backing
};
std::unique_ptr<Backing> make_host_backing(HostBackingOptions opts = {});

}  // namespace dmakit::pool
