// IovaArena: decides every IOVA dmakit hands to a device.
//
// Data structure: the space is the Domain's usable windows at the IOMMU's
// smallest page (holes between windows and IOVA 0 are never handed out),
// optionally narrowed by iova_start/iova_end and capped at max_pages pages
// from its low end. Four bitmaps describe it, interleaved per 64 pages so one
// cache line serves an operation: used (allocated, stale or being unmapped;
// holes are permanently set), stale (freed, mapping still in place), head and
// tail (first and last page of every live allocation, so free() validates a
// range in O(1) for one page and O(pages/64) in general). The bitmaps grow
// with use, not with the window (iova_bits.hpp): a small top-level directory
// allocated at create() (128 entries for a 48-bit window, 64 Ki for a 57-bit
// one), and 64 KiB segments of 2^17 pages each allocated the first time an
// allocation lands in them; untouched parts read as free, holes between
// windows as used, at no cost. So a 57-bit window (the default cap,
// max_pages = 2^45) costs about 1 MiB until used, and what it costs later
// follows the IOVA space touched (next-fit restarts low after each flush, so
// that follows the working set). Growing the bitmaps never happens under a
// shard lock; when the memory is not there the request fails with
// Errc::no_memory and nothing changes.
//
// The space is split into N small shards (N a power of two, equal size, each a
// power-of-two page count) from the low end, and one large shard above them
// (at least large_share of the space; it also takes what the power-of-two
// rounding leaves). Each shard has its own spinlock, next-fit hint and
// counters. A thread's home shard is its per-thread number (handed out in
// order of first use) modulo N; if the home shard is locked, the thread tries
// the next shard with try_lock, and blocks only when every eligible shard was
// busy. Requests above large_threshold_pages start at the large shard. Any
// shard can serve any request; one served outside its home shard counts as a
// borrow.
//
// Fast path (1 page, lazy mode; budget 20 ns for an alloc+free pair on one
// thread, about 70 instructions each way and one try-lock): alloc takes the
// home shard's lock, checks that the hint lies in the segment the shard
// keeps at hand, the first zero bit of the hint's word (ctz), sets
// used/head/tail in that one 32-byte group, moves the hint, counts down to
// the next bounds check, unlocks. free finds the page's shard with a shift,
// tests head and tail, sets stale, counts down, unlocks. No heap allocation,
// no call but tail calls, no system call. Everything else (other sizes,
// alignments or limits, a busy shard, a full hint word, strict mode, any
// refusal, a bounds check) goes to the general code out of line, which checks
// again before it changes anything.
//
// Lazy flush: free() marks a range stale and leaves its IOMMU mapping in
// place. A shard flushes - collects its stale runs (adjacent ranges merged),
// unmaps each run with one Domain::unmap, then clears the pages from the used
// bitmap and reports the runs to the flush listener - when it cannot serve a
// request (before anyone borrows from another shard), when its next-fit hint
// wraps around, when its stale pages reach stale_max_pages, and when its
// oldest stale range is older than stale_max_age. Each shard counts its
// operations down to the next point a bound can be reached: the page bound
// exactly (a fast free adds one stale page; the general path compares the
// count itself), the age on every kStaleAgeCheckEvery-th operation (even the
// coarse clock costs a third of a fast alloc+free pair). The shard lock is not
// held during the unmap calls; the pages stay marked used meanwhile, so an
// IOVA is never handed out again before its unmap returned. A run whose unmap
// fails stays stale (never handed out, retried by later flushes) and the
// error is logged and counted; flush() returns it. Strict mode unmaps inside
// free().
//
// Exposure window: after free() in lazy mode a device can still reach the
// freed IOVA (and the memory behind it, which therefore must not change
// owner before the listener reports the flush) until its shard flushes: at
// most stale_max_pages pages per shard stay reachable, for at most
// stale_max_age after the free provided the shard sees kStaleAgeCheckEvery
// allocs or frees in that time (a quiet shard keeps its stale ranges until
// that many more operations or an explicit flush()). Allocation pressure
// shortens the window.
//
// Owns: the bitmaps and the shard state. Does not own the Domain nor the
// memory behind mappings. The destructor unmaps remaining stale ranges
// (without calling the listener); live allocations stay the caller's.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "iommu/settings.hpp"
#include "base/error.hpp"
#include "iommu/domain.hpp"

namespace dmakit::iommu {

// A shard checks the age of its oldest stale range on every this many of its
// allocs and frees (see "Exposure window" above).
inline constexpr uint32_t kStaleAgeCheckEvery = 32;

struct ArenaConfig {
  uint32_t shards = 0;                  // 0 = from hardware threads; power of two <= 16
  double large_share = 0.25;            // minimum share of the space for the large shard, 0..0.9
  uint64_t large_threshold_pages = 64;  // requests above this go to the large shard
  bool strict = false;                  // unmap at free
  uint64_t stale_max_pages = 8192;      // per shard; 0 = no bound (flush on pressure only)
  std::chrono::milliseconds stale_max_age{50};  // 0 = no age bound
  uint64_t iova_start = 0;              // narrow the space (0/0 = all windows)
  uint64_t iova_end = 0;                // inclusive; 0 = end of the last window
  uint64_t max_pages = 1ull << 45;      // cap on the space (a whole 57-bit IOVA space of 4K pages), from its low end

  static ArenaConfig from_settings(const ArenaSettings& s);
};

struct IovaRequest {
  uint64_t len = 0;                  // bytes, rounded up to the page
  uint64_t align = 0;                // bytes, power of two; 0 = one page; absolute IOVA alignment
  uint64_t dma_limit = ~0ull;        // highest IOVA any byte may have (e.g. 0xffffffff)
};

struct ArenaStats {
  uint64_t pages_in_use = 0;   // allocated and not freed
  uint64_t stale_pages = 0;    // freed, mapping still in place (including runs being unmapped)
  uint64_t flushes = 0;        // flushes that unmapped at least one run
  uint64_t unmap_calls = 0;    // Domain::unmap calls issued by the arena
  uint64_t ranges_flushed = 0; // stale ranges before merging (strict mode: ranges unmapped)
  uint64_t borrows = 0;        // served by a shard other than the caller's
  uint64_t failures = 0;       // requests refused for lack of space (or of memory for the bitmaps)
  uint64_t flush_errors = 0;   // unmap calls that failed (their runs stay stale)
  uint64_t total_pages = 0;    // usable pages (holes excluded)
  uint64_t bitmap_bytes = 0;   // bookkeeping allocated so far (grows with the IOVA space touched)
  uint32_t shards = 0;         // small shards
  bool large_shard = false;
};

class IovaArena {
 public:
  // Called after a flush unmapped these ranges (unmap returned) and before
  // their IOVAs can be handed out again: memory that stood behind them may
  // now be given to a new owner. Called from whichever thread flushed, with
  // no bitmap lock held but inside the shard's flush, so it must not call
  // back into the arena. Every registered listener hears every flush (each
  // buffer allocator sharing the arena keeps its own list of what waits).
  using FlushListener = std::function<void(std::span<const IovaSpan>)>;
  using ListenerId = uint64_t;

  static Result<std::unique_ptr<IovaArena>> create(Domain& domain, const ArenaConfig& cfg);
  virtual ~IovaArena() = default;
  IovaArena(const IovaArena&) = delete;
  IovaArena& operator=(const IovaArena&) = delete;

  // Reserves an IOVA range. The caller maps memory into it via domain().
  // The returned len is the request rounded up to the page.
  virtual Result<IovaSpan> alloc(const IovaRequest& req) = 0;

  // Returns a range from alloc() (len may be the requested or the rounded
  // length). Lazy mode: marked stale, unmapped later. Strict mode: unmapped
  // before return. A range not currently allocated is refused
  // (Errc::corrupted) and nothing changes.
  virtual Status free(IovaSpan range) = 0;

  // Flushes every shard now; returns the first unmap error.
  virtual Status flush() = 0;

  // Registers a listener; Errc::no_memory when its entry cannot be stored.
  virtual Result<ListenerId> add_flush_listener(FlushListener listener) = 0;
  // Unregisters it: once this returns, the listener is not running and is
  // never called again, so its owner may be destroyed. An unknown id is
  // ignored. Must not be called from inside a listener.
  virtual void remove_flush_listener(ListenerId id) = 0;

  virtual ArenaStats stats() const = 0;
  virtual uint64_t page_size() const = 0;
  virtual Domain& domain() = 0;

  // The IOVA span of each shard: small shards in order, then the large shard.
  virtual std::vector<IovaSpan> shard_spans() const = 0;

  // Recounts every bitmap against the counters and checks the invariants
  // (stale implies used, heads and tails pair up, holes stay reserved).
  // O(size of the space); meant for tests and the stress tool.
  virtual Status check() const = 0;

 protected:
  IovaArena() = default;
};

}  // namespace dmakit::iommu
