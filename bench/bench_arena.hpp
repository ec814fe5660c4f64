// The arena benchmark on any Domain, for callers without a Context (tests).
// It builds its own IovaArena instances confined to `region`, an IOVA range
// the caller reserved (run_arena(ctx) takes it from the context's arena), so
// its maps and unmaps cannot touch anyone else's mappings.
#pragma once

#include <cstdint>

#include "json.hpp"
#include "base/error.hpp"
#include "iommu/domain.hpp"

namespace dmakit::bench {

struct ArenaBenchOptions {
  uint64_t cycles = 100000;   // map_unmap cycles per mode
  uint64_t pairs = 200000;    // alloc+free pairs per timed run (fewer for big requests)
  int repeats = 7;            // timed runs; the median is reported
};

// Returns {"bench": "arena", "results": [...]}.
Result<Json> run_arena(iommu::Domain& domain, iommu::IovaSpan region, const ArenaBenchOptions& opt);

}  // namespace dmakit::bench
