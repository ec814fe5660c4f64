// IovaArena: decides every IOVA dmakit hands to a device.
//
// Data structure: the Domain's usable windows (holes excluded, optionally
// narrowed by config) at the IOMMU's smallest page, split into N small pools
// (power of two, each a bitmap with its own lock and next-fit hint) plus one
// large pool for requests above a page-count threshold. A thread picks its
// pool by a stable hash and tries the next one (trylock) if it is busy.
//
// Lazy flush: free() marks a range stale in its pool's stale bitmap and
// leaves the IOMMU mapping in place. A pool flushes (unmaps its stale ranges
// through the Domain, adjacent ones merged into one call, then clears them
// from the main bitmap) when it cannot serve a request - before borrowing
// from another pool - on wrap-around of its hint, and when its stale pages or
// the age of its oldest stale range reach the configured bounds. An IOVA is
// never handed out again before its unmap returned. Strict mode unmaps at free.
//
// Owns: the bitmaps. Does not own the Domain nor the memory behind mappings.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>

#include "dmakit/error.hpp"
#include "iommu/domain.hpp"

namespace dmakit::iommu {

struct ArenaConfig {
  uint32_t pools = 0;                   // 0 = from hardware threads; power of two <= 16
  double large_share = 0.25;            // share of the space for the large pool
  uint64_t large_threshold_pages = 64;  // requests above this go to the large pool
  bool strict = false;                  // unmap at free
  uint64_t stale_max_pages = 8192;      // per pool
  std::chrono::milliseconds stale_max_age{50};
  uint64_t iova_start = 0;              // narrow the space (0/0 = all windows)
  uint64_t iova_end = 0;                // inclusive; 0 = end of the last window
};

struct IovaRequest {
  uint64_t len = 0;                  // bytes, rounded up to the page
  uint64_t align = 0;                // bytes, power of two; 0 = one page
  uint64_t dma_limit = ~0ull;        // highest IOVA any byte may have (e.g. 0xffffffff)
};

struct ArenaStats {
  uint64_t pages_in_use = 0;   // allocated and not freed
  uint64_t stale_pages = 0;    // freed, mapping still in place
  uint64_t flushes = 0;
  uint64_t unmap_calls = 0;
  uint64_t ranges_flushed = 0; // stale ranges before merging
  uint64_t borrows = 0;        // served by a pool other than the caller's
  uint64_t failures = 0;       // requests refused for lack of space
  uint64_t total_pages = 0;
  uint32_t pools = 0;
};

class IovaArena {
 public:
  // Called after a flush unmapped these ranges (unmap returned): memory that
  // stood behind them may now be given to a new owner. Called without locks
  // held by the arena, from whichever thread flushed.
  using FlushListener = std::function<void(std::span<const IovaSpan>)>;

  static Result<std::unique_ptr<IovaArena>> create(Domain& domain, const ArenaConfig& cfg);
  virtual ~IovaArena() = default;

  // Reserves an IOVA range. The caller maps memory into it via domain().
  virtual Result<IovaSpan> alloc(const IovaRequest& req) = 0;

  // Returns a range from alloc(). Lazy mode: marked stale, unmapped later.
  // Strict mode: unmapped before return. A range not currently allocated is
  // refused (Errc::corrupted) and nothing changes.
  virtual Status free(IovaSpan range) = 0;

  // Flushes every pool now.
  virtual Status flush() = 0;

  virtual void set_flush_listener(FlushListener listener) = 0;

  virtual ArenaStats stats() const = 0;
  virtual uint64_t page_size() const = 0;
  virtual Domain& domain() = 0;

 protected:
  IovaArena() = default;
};

}  // namespace dmakit::iommu
