// The dmapool benchmark with its knobs exposed, so tests can run it small
// and on any backing; run_dmapool(Context&) is this with the context's
// buffer allocator and settings.
#pragma once

#include <functional>
#include <memory>

#include "core/config.hpp"
#include "json.hpp"
#include "base/error.hpp"
#include "core/context.hpp"
#include "dmakit/dmakit.h"
#include "pool/dma_pool.hpp"

namespace dmakit::bench {

struct DmapoolBenchOptions {
  uint32_t rounds = 100;        // alloc-all then free-all, per timed run
  uint32_t repeats = 11;        // timed runs per case (each a few ms, so a host hiccup hits one); the median is reported
  uint32_t max_blocks = 8192;   // the kernel's clamp upper bound (lower it to run small)
  uint32_t cache_size = 256;    // dmakit per-thread cache (pool.cache_size default)
  uint32_t mempool_cache = 256; // rte_mempool per-lcore cache
  bool mempool = true;          // also run rte_mempool (starts the EAL)
  bool two_threads = true;      // also run dmakit with two threads
  // "dmakit-c": the one-thread loop through the C API (dmakit_pool_alloc /
  // dmakit_pool_free) on pools made in this context with dmakit_pool_create
  // and cache_size; fair when the context's buffer allocator is what
  // `backing` hands the C++ pools. nullptr: no dmakit-c rows.
  dmakit_ctx* c_ctx = nullptr;
};

using BackingFactory = std::function<std::unique_ptr<pool::Backing>()>;

Result<Json> run_dmapool(const core::Config& cfg, const DmapoolBenchOptions& opts,
                               const BackingFactory& backing);

// On a context: the C++ pools over its buffer allocator, the C API's pools
// in the same context through a handle of it (opts.c_ctx is set here).
Result<Json> run_dmapool(core::Context& ctx, const DmapoolBenchOptions& opts);

}  // namespace dmakit::bench
