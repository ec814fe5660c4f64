// The buffer benchmark with its scale as options, for tests that run it
// small; run_buffer(ctx) is this with the defaults below.
#pragma once

#include <cstdint>

#include "base/error.hpp"
#include "core/context.hpp"
#include "json.hpp"

namespace dmakit::bench {

struct BufferBenchOptions {
  uint64_t many_small = 1000000;    // live 4 KiB buffers the many_small case aims for
  uint64_t mixed_bytes = 1ull << 30;  // live bytes of the mixed case (random 4 KiB-1 MiB buffers)
  uint64_t pairs = 200000;          // alloc+free pairs per timed small_alloc_free run
  uint32_t small_live = 512;        // 4 KiB buffers held live around the timed pairs
  int repeats = 7;                  // timed small_alloc_free runs; the median is reported
  bool classic = true;              // the fragmented, entries_per_gib and zeroed cases too
};

Result<Json> run_buffer(core::Context& ctx, const BufferBenchOptions& o);

}  // namespace dmakit::bench
