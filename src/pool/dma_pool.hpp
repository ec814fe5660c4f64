// DmaPool: fixed-size DMA blocks (size, align, boundary) with the semantics
// of the kernel's dma_pool, carved from large regions ("chunks") of a Backing
// (normally buffers of the BufferAllocator: few, large IOMMU mappings).
//
// Data structure (all of it in host memory; nothing lives in DMA memory, so a
// device may overwrite every byte of every block and the pool stays intact):
//
//   chunk table   address >> chunk_shift -> Chunk (open-addressed hash; a
//                 chunk of 2^chunk_shift bytes touches at most two slots)
//   Chunk         base vaddr, base IOVA, first-block offset, block count,
//                 one state byte per block (free / allocated)
//   free stack    {chunk, offset, index} entries of free blocks, one mutex
//   thread cache  per thread and pool, up to cache_size entries, no lock
//
// A block's vaddr and IOVA are chunk base + offset. Alloc pops from the
// thread cache (else refills a batch from the free stack, else grows by one
// chunk); free validates the block in O(1) - chunk found by address, offset
// is a block start, IOVA matches, state is allocated - then pushes it on the
// thread cache (else flushes a batch to the free stack). Every build
// validates; a bad free returns Errc::corrupted, is counted and changes
// nothing.
//
// Chunks go back to the Backing only when the pool is destroyed (as the
// kernel's dma_pool does); there is no trim. A pool destroyed with blocks
// still allocated logs a warning and abandons the chunks that hold them:
// they stay allocated (and mapped, as long as the allocator lives), because a
// device may still be writing there.
//
// Thread safety: alloc, free and stats may be called from any thread; a block
// may be freed by a thread other than the one that allocated it. Each
// thread's cache for a pool is returned to the pool when the thread exits; a
// pool destroyed first drops the caches that point at it. Destroying a pool
// while another thread still uses it is the caller's bug.
#pragma once

#include <atomic>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "dmakit/error.hpp"

namespace dmakit::alloc_buffer {
class BufferAllocator;
}

namespace dmakit::pool {

struct DmaBlock {
  void* vaddr = nullptr;
  uint64_t iova = 0;
};

struct PoolOptions {
  uint32_t cache_size = 32;   // per-thread cache, blocks; 0 = no cache
  bool poison = false;        // poison on free, check on alloc (reports writes to free blocks)
  bool zero = false;          // zero every block on alloc
  uint64_t chunk_bytes = 0;   // power of two >= 4 KiB; 0 = from the block size (64 KiB..2 MiB)
  uint32_t max_chunks = 0;    // grow at most this many times; 0 = until the backing says no
};

struct PoolStats {
  std::string name;
  uint64_t size = 0, align = 0, boundary = 0;
  uint64_t chunk_bytes = 0;
  uint64_t blocks = 0;               // carved so far
  uint64_t active = 0;               // allocated now (exact when no alloc/free is in flight)
  uint64_t chunks = 0;               // regions taken from the backing
  uint64_t validation_failures = 0;  // refused frees + duplicate entries found at alloc
  uint64_t poison_failures = 0;      // free blocks found written (poison option)
  uint64_t grow_failures = 0;        // the backing could not give a chunk
};

// The kernel's dma pools listing ("poolinfo - 0.1", then one line per pool:
// name, active blocks, total blocks, block size, chunks), each line followed
// by dmakit's extra counters as key=value pairs.
std::string format_pools(std::span<const PoolStats> pools);

// One region of DMA memory: contiguous in host VA and in IOVA.
struct Region {
  void* vaddr = nullptr;
  uint64_t iova = 0;
  uint64_t len = 0;
};

// Where a pool gets its chunks. Owns the regions it hands out until they are
// released or abandoned.
class Backing {
 public:
  virtual ~Backing() = default;
  // A region of exactly len bytes (len a power of two >= 4 KiB), page
  // aligned in VA and IOVA, mapped for the device until release().
  virtual Result<Region> grow(uint64_t len) = 0;
  // The pool no longer uses the region; memory and mapping may be reused.
  virtual void release(const Region& r) = 0;
  // A device may still use the region: keep memory (and mapping) forever,
  // never hand it to another owner.
  virtual void abandon(const Region& r) = 0;
  // For messages, e.g. "buffer allocator" or "host memory (synthetic IOVA)".
  virtual std::string describe() const = 0;
};

// Chunks as BufferAllocator buffers, each one virtually contiguous run. The
// allocator must outlive the backing.
std::unique_ptr<Backing> make_buffer_backing(alloc_buffer::BufferAllocator& buffers);

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

class DmaPool {
 public:
  // Kernel dma_pool_create semantics: align 0 means 1; align and boundary
  // powers of two; size rounded up to align (and to at least 8); boundary 0
  // means no constraint, else boundary >= size and no block crosses a
  // multiple of boundary in IOVA. Refused with Errc::invalid_argument naming
  // the values. No memory is taken until the first alloc.
  static Result<std::unique_ptr<DmaPool>> create(std::unique_ptr<Backing> backing, std::string name,
                                                 size_t size, size_t align, size_t boundary,
                                                 const PoolOptions& opts = {});
  // The same over BufferAllocator buffers (make_buffer_backing).
  static Result<std::unique_ptr<DmaPool>> create(alloc_buffer::BufferAllocator& buffers, std::string name,
                                                 size_t size, size_t align, size_t boundary,
                                                 const PoolOptions& opts = {});
  ~DmaPool();  // dma_pool_destroy; see the header comment about live blocks
  DmaPool(const DmaPool&) = delete;
  DmaPool& operator=(const DmaPool&) = delete;

  // A block, or Errc::no_memory / no_space when the pool cannot grow.
  // Inline fast path (below), so the block is returned without a memory round trip.
  inline Result<DmaBlock> alloc();
  // Returns a block. Foreign pointer, not a block start, IOVA mismatch or a
  // block not currently allocated: Errc::corrupted, counted, nothing changes.
  inline Status free(void* vaddr, uint64_t iova);
  Status free(const DmaBlock& b) { return free(b.vaddr, b.iova); }

  // Returns this thread's cached blocks to the shared free stack.
  void flush_thread_cache();

  PoolStats stats() const;
  const std::string& name() const { return name_; }
  size_t block_size() const { return size_; }
  size_t align() const { return align_; }
  size_t boundary() const { return boundary_; }
  uint64_t chunk_bytes() const { return uint64_t{1} << chunk_shift_; }

  struct Chunk;
  struct Entry;
  struct Cache;
  struct ChunkTable;

  struct Key {  // create() is the only way to build a pool
   private:
    Key() = default;
    friend class DmaPool;
  };
  explicit DmaPool(Key);

 private:

  inline Cache* this_thread_cache() const;
  Cache* attach_cache();
  Result<DmaBlock> alloc_slow();
  Status free_slow(Chunk* ch, uint32_t off, uint32_t index);
  Status refuse_free(const void* vaddr, uint64_t iova, const char* why);
  bool take(const Entry& e, DmaBlock& out);  // false: a stale duplicate, dropped
  Status refill(Cache& c);       // free stack -> cache, growing when empty
  Status grow_locked();          // one chunk from the backing; mu_ held
  void flush(Cache& c, uint32_t n);  // top n cache entries -> free stack
  void publish_chunk(Chunk* ch); // into the chunk table; mu_ held
  inline Chunk* find_chunk(uintptr_t v) const;
  void debug_on_alloc(void* vaddr, uint64_t iova);
  void debug_on_free(void* vaddr);
  void detach_all_caches();      // at destroy
  friend struct ThreadCaches;
  void absorb_cache(Cache& c);   // a thread exits: its cache -> free stack

  // Fast-path constants (read-only after create).
  uint32_t slot_ = 0;            // index of this pool in every thread's cache array
  uint64_t uid_ = 0;             // never reused; tells a live cache from a stale one
  uint32_t cache_cap_ = 0;
  uint32_t batch_ = 0;           // entries moved per refill / flush
  uint32_t chunk_shift_ = 0;
  // Block layout on the IOVA grid: grid offset g = chunk offset + chunk
  // origin; segment g >> seg_shift_ (one boundary span), blocks at multiples
  // of size_ inside it, per_seg_ of them. Without a boundary: one segment.
  uint32_t seg_shift_ = 32;
  uint64_t seg_mask_ = 0xffffffff;
  uint64_t per_seg_ = UINT32_MAX;
  uint64_t div_magic_ = 0;       // exact division by size_ (multiply, no divide)
  uint32_t debug_ = 0;           // kPoison | kZero
  std::atomic<ChunkTable*> table_{nullptr};

  std::string name_;
  size_t size_ = 0, align_ = 0, boundary_ = 0;
  uint32_t max_chunks_ = 0;
  std::unique_ptr<Backing> backing_;

  mutable std::mutex mu_;        // guards everything below
  std::vector<Entry> stack_;
  std::vector<std::unique_ptr<Chunk>> chunks_;
  std::vector<std::unique_ptr<ChunkTable>> tables_;  // old ones kept: lock-free readers
  uint64_t blocks_ = 0;
  uint64_t table_used_ = 0;
  std::vector<Cache*> caches_;   // guarded by the registry mutex, not mu_

  std::atomic<uint64_t> validation_failures_{0};
  std::atomic<uint64_t> poison_failures_{0};
  std::atomic<uint64_t> grow_failures_{0};
};

// ---------------------------------------------------------------------------
// Internals the inline fast paths need. Not part of the interface.

struct DmaPool::Chunk {
  uintptr_t base = 0;      // vaddr of byte 0
  uint64_t iova = 0;       // IOVA of byte 0
  uint64_t len = 0;
  uint64_t origin = 0;     // grid offset of byte 0 (iova modulo the segment or alignment)
  uint64_t first = 0;      // grid index of block 0
  uint32_t nblocks = 0;
  std::unique_ptr<std::atomic<uint8_t>[]> state;  // free (0) / allocated (1) per block
  Region region;
};

// A free block: chunk, byte offset in it, block index in it.
struct DmaPool::Entry {
  Chunk* chunk = nullptr;
  uint32_t off = 0;
  uint32_t index = 0;
};

// One thread's cache for one pool. Only the owner thread pushes and pops;
// count is atomic so stats() and a destroying pool may read or reset it.
struct DmaPool::Cache {
  std::atomic<uint64_t> uid{0};  // owning pool's uid; 0 once detached
  DmaPool* pool = nullptr;       // guarded by the registry mutex
  std::atomic<uint32_t> count{0};
  uint32_t cap = 0;
  std::unique_ptr<Entry[]> slots;
};

// Open-addressed, insert-only table read without locks. A slot holds the
// (at most two) chunks that overlap one 2^chunk_shift-aligned address range;
// slot index = range number modulo the table size, then linear probing.
struct DmaPool::ChunkTable {
  struct Slot {
    std::atomic<uint64_t> key{0};  // (address >> chunk_shift) + 1; 0 = empty
    std::atomic<Chunk*> a{nullptr};
    std::atomic<Chunk*> b{nullptr};
  };
  uint64_t mask = 0;  // size - 1
  std::unique_ptr<Slot[]> slots;
};

namespace detail {
// This thread's cache array, indexed by pool slot (plain TLS: no wrapper call).
extern __thread DmaPool::Cache** tl_slots __attribute__((tls_model("initial-exec")));
extern __thread uint32_t tl_nslots __attribute__((tls_model("initial-exec")));
inline constexpr uint8_t kFree = 0;
inline constexpr uint8_t kAllocated = 1;
inline constexpr uint32_t kPoison = 1;
inline constexpr uint32_t kZero = 2;
__extension__ typedef unsigned __int128 u128;
inline uint64_t mulhi(uint64_t a, uint64_t b) { return static_cast<uint64_t>((u128{a} * b) >> 64); }
// The block written as one 16-byte store: GCC builds the Result in memory
// and copies it with one 16-byte load, which stalls when the two halves were
// stored separately (a failed store-to-load forward costs more than the pop).
inline DmaBlock make_block(uintptr_t v, uint64_t iova) {
#if defined(__SSE2__)
  static_assert(sizeof(DmaBlock) == sizeof(__m128i));
  DmaBlock b;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(&b),
                   _mm_set_epi64x(static_cast<long long>(iova), static_cast<long long>(v)));
  return b;
#else
  return DmaBlock{reinterpret_cast<void*>(v), iova};
#endif
}
}  // namespace detail

inline DmaPool::Cache* DmaPool::this_thread_cache() const {
  const uint32_t s = slot_;
  if (s >= detail::tl_nslots) return nullptr;
  Cache* c = detail::tl_slots[s];
  if (c == nullptr || c->uid.load(std::memory_order_relaxed) != uid_) return nullptr;
  return c;
}

inline DmaPool::Chunk* DmaPool::find_chunk(uintptr_t v) const {
  const ChunkTable* t = table_.load(std::memory_order_acquire);
  if (t == nullptr) [[unlikely]] return nullptr;
  const uint64_t key = (uint64_t{v} >> chunk_shift_) + 1;
  for (uint64_t i = key & t->mask;; i = (i + 1) & t->mask) {
    const ChunkTable::Slot& s = t->slots[i];
    const uint64_t k = s.key.load(std::memory_order_acquire);
    if (k == key) {
      // A block from a newly published chunk reached this thread through the
      // caller's own synchronisation, so its chunk is visible here.
      Chunk* a = s.a.load(std::memory_order_relaxed);
      if (a != nullptr && v - a->base < a->len) return a;
      Chunk* b = s.b.load(std::memory_order_relaxed);
      if (b != nullptr && v - b->base < b->len) return b;
      return nullptr;
    }
    if (k == 0) return nullptr;
  }
}

// Alloc: pop from this thread's cache, else the slow path. About 25
// instructions: TLS slot lookup, one count test, one state test, one debug test.
inline Result<DmaBlock> DmaPool::alloc() {
  Cache* c = this_thread_cache();
  if (c != nullptr) [[likely]] {
    const uint32_t n = c->count.load(std::memory_order_relaxed);
    if (n != 0) [[likely]] {
      const Entry& e = c->slots[n - 1];
      Chunk* ch = e.chunk;
      const uint32_t off = e.off;
      std::atomic<uint8_t>& st = ch->state[e.index];
      if (st.load(std::memory_order_relaxed) == detail::kFree) [[likely]] {
        c->count.store(n - 1, std::memory_order_relaxed);
        st.store(detail::kAllocated, std::memory_order_relaxed);
        void* v = reinterpret_cast<void*>(ch->base + off);
        if (debug_ != 0) [[unlikely]] debug_on_alloc(v, ch->iova + off);
        return detail::make_block(ch->base + off, ch->iova + off);
      }
    }
  }
  return alloc_slow();
}

// Free: validate - chunk by address (table), block start (one multiply),
// IOVA, state byte - then push on this thread's cache, else the slow path.
// About 50 instructions; four tests refuse, one takes the slow path.
inline Status DmaPool::free(void* vaddr, uint64_t iova) {
  const auto v = reinterpret_cast<uintptr_t>(vaddr);
  Chunk* ch = find_chunk(v);
  if (ch == nullptr) [[unlikely]]
    return refuse_free(vaddr, iova, "not inside any chunk of this pool");
  const uint64_t off = v - ch->base;
  const uint64_t g = off + ch->origin;
  const uint64_t in = g & seg_mask_;
  const uint64_t k = detail::mulhi(in, div_magic_);  // in / size
  const uint64_t index = (g >> seg_shift_) * per_seg_ + k - ch->first;
  if (in * div_magic_ >= div_magic_ || k >= per_seg_ || index >= ch->nblocks) [[unlikely]]
    return refuse_free(vaddr, iova, "not the start of a block");
  if (iova != ch->iova + off) [[unlikely]] return refuse_free(vaddr, iova, "IOVA does not match the block");
  std::atomic<uint8_t>& st = ch->state[index];
  if (st.load(std::memory_order_relaxed) != detail::kAllocated) [[unlikely]]
    return refuse_free(vaddr, iova, "block is not allocated (double free?)");
  st.store(detail::kFree, std::memory_order_relaxed);
  if (debug_ & detail::kPoison) [[unlikely]] debug_on_free(vaddr);

  Cache* c = this_thread_cache();
  if (c != nullptr) [[likely]] {
    const uint32_t n = c->count.load(std::memory_order_relaxed);
    if (n < c->cap) [[likely]] {
      Entry& e = c->slots[n];
      e.chunk = ch;
      e.off = static_cast<uint32_t>(off);
      e.index = static_cast<uint32_t>(index);
      c->count.store(n + 1, std::memory_order_relaxed);
      return ok();
    }
  }
  return free_slow(ch, static_cast<uint32_t>(off), static_cast<uint32_t>(index));
}

}  // namespace dmakit::pool
