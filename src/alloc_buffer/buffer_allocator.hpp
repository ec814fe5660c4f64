// BufferAllocator: large DMA buffers from order-fallback host memory, each
// mapped as one contiguous IOVA range from the arena.
//
// Order fallback. The order list (default 2M, 1M, 64K, 4K; orders below the
// IOMMU's smallest page dropped; 1G first when buffer.hugepage_1g is set and
// the EAL has 1 GiB pages) has one MemorySource per order. A request of N
// bytes (rounded up to the smallest order) takes chunks of the largest order
// that still fits the remaining size. The first failure of an order drops to
// the next order for the rest of the request and that order is not retried,
// so source calls per request <= chunks + orders. An order that failed is
// skipped by later requests for backoff_ms, then probed again; the smallest
// order is never skipped (it is the last resort). A source that can serve
// runs (anonymous memory) gives the whole remainder of its order in one call.
//
// Layout. Chunks are placed largest first in one IOVA range aligned to the
// largest chunk order, so every chunk sits on an IOVA aligned to its own size
// (2 MiB chunks on 2 MiB IOVAs, where the IOMMU can use 2 MiB pages). Chunks
// that are also contiguous in virtual memory form a run; each run is mapped
// with one Domain::map, so mapping entries grow with runs, not pages.
//
// Slabs. A request of at most buffer.slab_max bytes (and alignment), read-
// write, is served by the slab tier (slab.hpp): a slot of a power-of-two
// class carved from a slab mapped once, so small buffers cost no mapping
// entry each and, in the steady state, no syscall or heap allocation. Each
// thread caches the slots of up to 64 KiB it frees (at most 256 KiB per class)
// for its own next allocations, with no lock taken.
//
// Isolation mode (buffer.isolation). No slabs and no recycler: every buffer
// is its own mapping and a freed buffer is retired at once, so its memory
// goes to no new owner while a stale IOVA may still reach it.
//
// Recycler. A freed buffer keeps its IOVA and mapping and goes to
// the free list of its size (span length), "dirty"; re-allocation of that size
// costs no ioctl. A background thread zeroes dirty buffers and moves them to
// the "clean" list, so zeroed requests are served without a memset on the
// caller's path (a dirty buffer is memset by the caller only when no clean
// one is ready). A shrinker retires recycled buffers above recycle_high_mb,
// on trim(), and on memory pressure (a Linux PSI trigger on
// /proc/pressure/memory, watched by a second thread).
//
// An allocation that fails for lack of IOVA space, mapping entries or
// memory retires every recycled buffer and every wholly free slab, flushes
// the arena and tries once more, so memory kept for reuse never causes a
// failure. The failing thread's cached slots go back first; other threads
// give theirs back at their next free or when they exit (the per-thread
// bound above is what may stay out of reach meanwhile).
//
// Retiring a buffer frees its IOVA range to the arena, where it turns stale
// and stays mapped. Its host memory stays with the buffer until the arena's
// flush listener reports the range unmapped; only then do its chunks go back
// to their sources, so a device holding a stale IOVA never reaches memory
// that has a new owner.
//
// Threads and locks. alloc() and Buffer destruction run on caller threads;
// the zeroing thread and the PSI thread are the allocator's own. One mutex
// guards the free lists, the pending-flush map and the counts; it is never
// held across a call into the arena, the domain, a source or a memset.
// Sources have their own locks. Back-off state is per-order atomics.
//
// Owns: the sources, the recycled and pending buffers, its two threads, its
// subscription to the arena's flush listener. Does not own the arena.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "alloc_buffer/memory_source.hpp"
#include "alloc_buffer/settings.hpp"
#include "base/error.hpp"
#include "iommu/iova_arena.hpp"

namespace dmakit::alloc_buffer {

// One piece of a buffer: memory a source gave at one order, and its IOVA.
// Named BufferChunk rather than Chunk to keep it apart from the DMA pool's
// pool::DmaPool::Chunk (the region a pool carves blocks from), while keeping
// the "chunk" of this allocator's vocabulary (orders, Buffer::chunks()).
struct BufferChunk {
  void* vaddr = nullptr;
  uint64_t iova = 0;
  uint64_t len = 0;         // bytes: the order size, or a multiple of it for a run
  uint64_t order = 0;       // the order it was taken at
  std::string_view source;  // the source's name, e.g. "hugepage-2M", "carved-64K", "anon-4K"
};

struct BufferRequest {
  uint64_t len = 0;
  uint64_t align = kPage4K;            // IOVA alignment, a power of two; the host address is 4 KiB aligned
  bool zeroed = false;
  uint64_t dma_limit = ~0ull;          // highest IOVA any byte may have
  uint32_t prot = iommu::kReadWrite;
};

class BufferAllocator;

// A DMA buffer. Move-only; destroying it returns it to its allocator. The
// IOVA range is contiguous; the host memory is the chunk list, contiguous
// only where virtually_contiguous() says so. If the allocator is destroyed
// first, the buffer's memory and mapping are left in place.
//
// Owns: its record (Impl) while it is handed out; the allocator owns the
// record at every other time. Not the memory or the mapping the record
// describes: those go back only through the allocator.
class Buffer {
 public:
  Buffer() noexcept;
  Buffer(Buffer&&) noexcept;
  Buffer& operator=(Buffer&&) noexcept;
  ~Buffer();

  explicit operator bool() const { return impl_ != nullptr; }
  uint64_t iova() const;
  uint64_t size() const;                // requested bytes
  uint64_t span() const;                // IOVA bytes (size rounded to the smallest order)
  std::span<const BufferChunk> chunks() const;  // in IOVA order
  void* vaddr() const;                  // first chunk
  bool virtually_contiguous() const;    // all chunks form one VA run
  uint32_t mappings() const;            // Domain::map calls (runs) behind this buffer
  uint32_t attempts() const;            // source calls made to build it (0 when recycled)
  bool recycled() const;                // served from the recycler
  bool from_slab() const;               // carved from a slab (shares its mapping; mappings() is 0)
  // Host address of byte `offset` of the buffer, or nullptr past size().
  void* at(uint64_t offset) const;
  // IOVA of a host address inside the buffer; Errc::invalid_argument otherwise.
  Result<uint64_t> iova_of(const void* p) const;

  struct Impl;
  explicit Buffer(std::unique_ptr<Impl> impl);

 private:
  // Handed back to the allocator on destruction. If the allocator is gone,
  // only the record is freed here; its memory and mapping stay in place.
  std::unique_ptr<Impl> impl_;
};

struct BufferStats {
  uint64_t buffers_live = 0;
  uint64_t bytes_live = 0;            // span bytes of live buffers
  uint64_t recycled_bytes = 0;        // in the recycler (clean + dirty + being zeroed)
  uint64_t prezeroed_bytes = 0;       // clean, ready for zeroed requests
  uint64_t pending_flush_bytes = 0;   // retired, waiting for the arena to unmap them
  uint64_t chunk_attempts = 0;        // source calls, all requests
  uint64_t order_fallbacks = 0;       // an order failed and the request dropped below it
  uint64_t backoff_skips = 0;         // an order skipped because it failed recently
  uint64_t map_calls = 0;             // Domain::map calls
  uint64_t fresh_allocs = 0;          // buffers built from sources
  uint64_t recycle_hits = 0;          // buffers served from the recycler
  uint64_t memset_fallbacks = 0;      // zeroed requests memset on the caller's path
  uint64_t shrinks = 0;               // buffers retired by the shrinker
  uint64_t reclaims = 0;              // failed builds retried after retiring all recycled memory
  uint64_t psi_events = 0;            // memory-pressure events handled
  bool psi_armed = false;             // a PSI trigger is being watched
  // Slab tier (buffers up to buffer.slab_max); slab buffers are also in
  // buffers_live and bytes_live (their class sizes).
  uint64_t slabs = 0;                 // slabs mapped
  uint64_t slab_bytes = 0;            // their bytes
  uint64_t slab_bytes_in_use = 0;     // slots handed out
  uint64_t slab_free_bytes = 0;       // in wholly free slabs (retired by trim and before a failure)
  uint64_t slab_grows = 0;            // slabs built
  uint64_t slab_double_frees = 0;     // frees of a slot not allocated, refused
};

class BufferAllocator {
 public:
  virtual ~BufferAllocator() = default;
  virtual Result<Buffer> alloc(const BufferRequest& req) = 0;
  // Retires recycled memory (all of it, or down to the high watermark) and
  // flushes the arena so it goes back to the sources now.
  virtual void trim(bool all) = 0;
  virtual BufferStats stats() const = 0;
  virtual iommu::IovaArena& arena() = 0;
  // The orders in use, largest first, and their sources.
  virtual std::vector<uint64_t> orders() const = 0;
  virtual std::vector<const MemorySource*> sources() const = 0;
  // Waits until the zeroing thread has nothing left to zero; false on
  // timeout or when pre-zeroing is off.
  virtual bool wait_prezeroed(std::chrono::milliseconds timeout) = 0;
};

// The allocator on `arena` (whose flush listener it subscribes to; several
// allocators may share one arena). Empty `sources` = the real sources for s
// and the EAL's mode (the caller started the EAL): hugepage 2M (and 1G)
// pages, carved 1M/64K pieces, anonymous memory for the smallest order;
// orders without a source (all hugepage ones under --no-huge) are left out.
// Given sources define the order list, one source per order.
Result<std::unique_ptr<BufferAllocator>> create_buffer_allocator(
    iommu::IovaArena& arena, const BufferSettings& s,
    std::vector<std::unique_ptr<MemorySource>> sources = {});

// Parses buffer.orders ("2M,1M,64K,4K") into sizes, largest first.
Result<std::vector<uint64_t>> parse_orders(const std::string& list);

}  // namespace dmakit::alloc_buffer
