// DmaPool: fixed-size DMA blocks (size, align, boundary) with the semantics
// of the kernel's dma_pool, carved from large regions ("chunks") of a Backing
// (normally buffers of the BufferAllocator: few, large IOMMU mappings).
//
// Data structure (all of it in host memory; nothing lives in DMA memory, so a
// device may overwrite every byte of every block and the pool stays intact):
//
//   chunk table   (address - bias) >> chunk_shift -> Chunk (open-addressed,
//                 almost always hit at the first slot; a chunk of
//                 2^chunk_shift bytes touches at most two slots)
//   Chunk         vaddr and IOVA of its first block, the span from there
//                 to the last block's end; followed in the same allocation
//                 by one state byte per granule of the span (the size's
//                 lowest set bit, so one per block for power-of-two sizes):
//                 no block starts here / free / allocated
//   magazine      an array of up to cache_size / 2 free-block entries
//                 {chunk, offset from the first block, index}
//   thread cache  per thread and pool: a loaded and a previous magazine
//                 (Bonwick's magazine layer), full magazines this thread
//                 freed or grew ("home", up to 16 MiB of blocks; others
//                 steal from it only when the pool cannot grow) and spare
//                 empty ones;
//                 found through a per-thread array indexed by the pool's
//                 slot (detail::kCacheSlots of them)
//   depot         per pool, one mutex: magazines from growth and from
//                 exited threads, spare empty magazines, loose entries of
//                 threads and pools without a cache (cache_size 0, debug
//                 options, no slot left)
//
// A block's vaddr and IOVA are the chunk's first-block vaddr and IOVA plus
// its offset. Alloc pops from the loaded magazine; free validates the block in O(1) - chunk found by
// address, offset is a block start, IOVA matches, state flips allocated ->
// free by one atomic compare-exchange, so of two racing frees of one block
// exactly one wins - then pushes it on the loaded magazine. Whole magazines move
// between a thread and the shared structures, one lock per cache_size / 2
// operations, and a thread takes back the magazines it filled itself, so two
// threads share no cache line in the steady state. A thread out of blocks
// takes the depot's, else grows the pool (carving the chunk outside the
// lock, and keeping its magazines at home: at most a chunk per thread more
// than a shared depot would hold, for no turn-taking on the lock while
// threads fill up), and takes another thread's home magazines only when the
// pool cannot grow: stealing while growth is possible turns into two
// threads stealing from each other every round.
// Every build validates; a bad free returns Errc::corrupted, is counted and
// changes nothing.
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

#include <algorithm>
#include <atomic>
#include <bit>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "base/error.hpp"

namespace dmakit::alloc_buffer {
class BufferAllocator;
}

namespace dmakit::pool {

struct DmaBlock {
  void* vaddr = nullptr;
  uint64_t iova = 0;
};

// A pool with poison or zero, or with cache_size 0, has no per-thread
// caches: every alloc and free takes the pool lock. Debug options are for
// finding bugs, and keeping them off the fast path keeps its budget.
struct PoolOptions {
  uint32_t cache_size = 256;  // per-thread cache, blocks (two magazines of half); 0 = no cache
  bool poison = false;        // poison on free, check on alloc (reports writes to free blocks); no cache
  bool zero = false;          // zero every block on alloc; no cache
  uint64_t chunk_bytes = 0;   // power of two >= 4 KiB; 0 = from the block size (64 KiB..2 MiB), see Backing::chunk_size
  uint32_t max_chunks = 0;    // grow at most this many times; 0 = until the backing says no
  uint64_t dma_limit = ~0ull; // highest IOVA a block may have (buffer-backed pools)
  bool log_refusals = true;   // refused frees are logged at warn; off for a caller that refuses on purpose
};

struct PoolStats {
  std::string name;
  uint64_t size = 0, align = 0, boundary = 0;
  uint64_t chunk_bytes = 0;
  uint64_t blocks = 0;               // carved so far
  uint64_t active = 0;               // allocated now (exact when no alloc/free is in flight)
  uint64_t chunks = 0;               // regions taken from the backing
  uint64_t validation_failures = 0;  // refused frees
  uint64_t poison_failures = 0;      // free blocks found written (poison option)
  uint64_t grow_failures = 0;        // the backing could not give a chunk
  uint64_t steals = 0;               // full magazines taken from another thread's cache
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
  // aligned in VA and IOVA, mapped for the device until release(). May be
  // called from several threads at once.
  virtual Result<Region> grow(uint64_t len) = 0;
  // The pool no longer uses the region; memory and mapping may be reused.
  virtual void release(const Region& r) = 0;
  // A device may still use the region: keep memory (and mapping) forever,
  // never hand it to another owner.
  virtual void abandon(const Region& r) = 0;
  // For messages, e.g. "buffer allocator" or "host memory (synthetic IOVA)".
  virtual std::string describe() const = 0;
  // The chunk size to use for a pool that would like want bytes (a power
  // of two >= 4 KiB): a power of two >= want that this backing serves well.
  virtual uint64_t chunk_size(uint64_t want) const { return want; }
};

// Chunks as BufferAllocator buffers, each one virtually contiguous run. The
// allocator must outlive the backing. Its chunk_size is the smallest
// allocator order >= the wish: such a chunk is one take from one source,
// contiguous whatever else runs meanwhile. A size between orders is made of
// several pieces of the order below, which other allocations running at the
// same time interleave; growth then fails (not one run), so an explicit
// PoolOptions::chunk_bytes should be an order too.
// Chunks are buffers whose every byte lies at or below dma_limit.
std::unique_ptr<Backing> make_buffer_backing(alloc_buffer::BufferAllocator& buffers, uint64_t dma_limit = ~0ull);


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

  // A block, or Errc::no_memory / no_space when the pool cannot grow (the
  // backing says no, max_chunks, or no host memory for the pool's own
  // records). Inline fast path (below), so the block is returned without a
  // memory round trip.
  [[gnu::always_inline]] inline Result<DmaBlock> alloc();
  // Returns a block. Foreign pointer, not a block start, IOVA mismatch or a
  // block not currently allocated: Errc::corrupted, counted, nothing changes.
  // Errc::no_memory when host memory for this thread's cache or a magazine
  // ran out: the block stays allocated and may be freed again later.
  [[gnu::always_inline]] inline Status free(void* vaddr, uint64_t iova);
  [[gnu::always_inline]] Status free(const DmaBlock& b) { return free(b.vaddr, b.iova); }
  // The fast paths alone, for a caller that keeps the slow paths out of line
  // (the C API: its exported calls then need no stack frame and save no
  // registers on the fast path). try_alloc: a block, or {nullptr, 0} where
  // alloc() would take its slow path (nothing changed: call alloc()).
  // try_free: true when the block was freed; false when nothing changed and
  // free() must run: another chunk than the one this thread freed into
  // last, a full magazine, or a free that free() refuses with its error.
  [[gnu::always_inline]] inline DmaBlock try_alloc();
  [[gnu::always_inline]] inline bool try_free(void* vaddr, uint64_t iova);

  // Returns this thread's cached blocks (its magazines) to the pool's depot.
  void flush_thread_cache();

  PoolStats stats() const;
  // False for pools without per-thread caches: cache_size 0, debug options,
  // or created while detail::kCacheSlots - 1 pools with caches existed.
  bool thread_caches() const { return slot_ != 0; }
  const std::string& name() const { return name_; }
  size_t block_size() const { return size_; }
  size_t align() const { return align_; }
  size_t boundary() const { return boundary_; }
  uint64_t chunk_bytes() const { return uint64_t{1} << chunk_shift_; }

  struct Chunk;
  struct ChunkDeleter {  // a chunk record and its state bytes are one allocation
    void operator()(Chunk* ch) const noexcept;
  };
  struct Entry;
  struct Magazine;
  struct Cache;
  struct ChunkTable;

  struct Key {  // create() is the only way to build a pool
   private:
    Key() = default;
    friend class DmaPool;
  };
  explicit DmaPool(Key);

 private:
  // create() past its argument checks; may throw std::bad_alloc.
  static std::unique_ptr<DmaPool> create_pool(std::unique_ptr<Backing> backing, const std::string& name,
                                              size_t rsize, size_t align, size_t boundary, uint64_t chunk,
                                              const PoolOptions& opts);
  // Slow-path helpers below may throw std::bad_alloc, each leaving the pool
  // as it was; alloc_slow, free_slow and grow_locked turn it into an error.
  Cache* attach_cache();
  Cache* own_cache();            // this thread's cache for this pool, attached on demand; null: none
  Result<DmaBlock> alloc_slow();  // alloc_slower(), std::bad_alloc as Errc::no_memory
  Result<DmaBlock> alloc_slower();
  Status free_slow(Chunk* ch, uint32_t off, uint32_t index);  // free_slower(), the same
  Status free_slower(Chunk* ch, uint32_t off, uint32_t index);
  // why null: the address is in no chunk's blocks; the message says whether it is in a chunk at all.
  [[gnu::cold, gnu::noinline]] Status refuse_free(const void* vaddr, uint64_t iova, const char* why);
  // The state index of the granule at offset off from block 0: off >> the
  // granule shift, as a rotation, so that an offset off the granule grid
  // carries its low bits to the top and comes out >= every chunk's ngran.
  // One compare then refuses both an address outside the block span and
  // one that is not on the grid (ngran < 2^34: spans are at most 1 GiB and
  // granules at least 8 bytes).
  uint64_t granule(uint64_t off) const { return std::rotr(off, static_cast<int>(gran_shift_)); }
  Chunk* find_chunk_probe(uintptr_t v) const;  // find_chunk past the first slot
  const Chunk* chunk_around(uintptr_t v) const;  // the chunk whose region holds v, blocks or not; cold
  Status load_full(Cache& c);    // loaded magazine (empty) -> a full one: home, depot, grow, steal
  void stash_full(Cache& c);     // both magazines full: previous -> home, an empty one in its place
  Magazine* take_full_locked();  // depot full list or loose entries; mu_ held; null: none
  Magazine* take_empty_locked(); // depot spare or a new magazine; mu_ held
  Magazine* steal();             // a full magazine from another thread's home (growth failed); null: none
  DmaBlock take(const Entry& e); // marks the block allocated
  // One chunk from the backing; mu_ held (dropped meanwhile). Its magazines
  // end on top of the depot's full list (mags_added of them).
  Status grow_locked(std::unique_lock<std::mutex>& lock, uint64_t* mags_added = nullptr);
  Result<Magazine*> take_grown_locked(std::unique_lock<std::mutex>& lock, Cache& c);  // grow, keep the rest home
  void keep_home_locked(Cache& c, uint64_t n);  // the depot's top n full magazines -> c's home
  bool at_max_chunks_locked() const { return max_chunks_ != 0 && chunks_.size() + growing_ >= max_chunks_; }
  std::unique_ptr<ChunkTable> table_for_locked(Chunk* ch, uint64_t& used) const;  // may throw
  void publish_chunk(Chunk* ch, std::unique_ptr<ChunkTable> nt, uint64_t used);  // into the chunk table; mu_ held
  inline Chunk* find_chunk(uintptr_t v) const;
  void debug_on_alloc(void* vaddr, uint64_t iova);
  void debug_on_free(void* vaddr);
  void return_cache_locked(Cache& c);  // every magazine of c -> depot; mu_ held
  void deposit_locked(Magazine* m, uint32_t n);  // one magazine of n entries -> depot; mu_ held
  void detach_all_caches();      // at destroy
  friend struct ThreadCaches;
  void absorb_cache(Cache& c);   // a thread exits: its cache -> depot

  // Fast-path constants (read-only after create); on their own cache lines,
  // apart from the mutex and counters that the slow paths write.
  uint32_t slot_ = 0;            // index of this pool in every thread's cache array; 0: no caches
  uint64_t uid_ = 0;             // never reused; tells a live cache from a stale one
  uint32_t mag_cap_ = 0;         // entries per magazine: cache_size / 2 (at least 1); 0: no caches
  uint32_t home_cap_ = 0;        // full magazines a thread keeps at home; more go to the depot
  uint32_t chunk_shift_ = 0;
  // Block layout on the IOVA grid: grid offset g = chunk offset + chunk
  // origin; segment g >> seg_shift_ (one boundary span), blocks at multiples
  // of size_ inside it, per_seg_ of them. Without a boundary: one segment.
  uint32_t seg_shift_ = 32;
  uint64_t seg_mask_ = 0xffffffff;
  uint64_t per_seg_ = UINT32_MAX;
  // Every block starts on a multiple of the granule (the lowest set bit of
  // size_) counted from the chunk's first block; state is kept per granule.
  uint32_t gran_shift_ = 0;
  uint32_t debug_ = 0;           // kPoison | kZero
  bool log_refusals_ = true;     // PoolOptions::log_refusals
  std::atomic<ChunkTable*> table_;  // never null (see find_chunk)

  std::string name_;
  size_t size_ = 0, align_ = 0, boundary_ = 0;
  uint32_t max_chunks_ = 0;
  std::unique_ptr<Backing> backing_;

  alignas(64) mutable std::mutex mu_;  // guards the depot and growth, below
  std::vector<Magazine*> full_;        // magazines with at least one entry
  std::vector<Magazine*> empty_;       // spare magazines
  std::vector<Entry> loose_;           // entries of threads without a cache (LIFO)
  std::vector<std::unique_ptr<Magazine>> mags_;  // every magazine, for destruction
  std::vector<std::unique_ptr<Chunk, ChunkDeleter>> chunks_;
  std::vector<std::unique_ptr<ChunkTable>> tables_;  // old ones kept: lock-free readers
  uint64_t blocks_ = 0;
  uint64_t growing_ = 0;               // backing calls in flight (mu_ dropped): count against max_chunks
  uint64_t depot_blocks_ = 0;          // entries in full_ and loose_
  uint64_t table_used_ = 0;
  std::vector<Cache*> caches_;         // guarded by the registry mutex, not mu_

  alignas(64) std::atomic<uint64_t> validation_failures_{0};
  std::atomic<uint64_t> poison_failures_{0};
  std::atomic<uint64_t> grow_failures_{0};
  std::atomic<uint64_t> steals_{0};
};

// ---------------------------------------------------------------------------
// Internals the inline fast paths need. Not part of the interface.

namespace detail {
// Memory on its own cache lines: state bytes and magazine entries are written
// by one thread at a time and must not share a line with anything another
// thread writes.
void* alloc_lines(size_t bytes);
void free_lines(void* p) noexcept;
struct LineDeleter {
  void operator()(void* p) const noexcept { free_lines(p); }
};
}  // namespace detail

// A chunk record owns its state bytes, one per granule of its block span,
// which follow it in the same allocation: the fast paths reach a block's
// state at a fixed offset from the chunk, without loading a pointer first.
struct alignas(64) DmaPool::Chunk {
  // Block addresses: v - lo < span. Offsets ("off") count from block 0.
  // lo and iova_lo adjacent: alloc adds an offset to both in one step.
  uintptr_t lo = 0;        // vaddr of block 0
  uint64_t iova_lo = 0;    // IOVA of block 0
  uint64_t span = 0;       // block 0's start to the last block's end
  uint64_t ngran = 0;      // span in granules: state bytes; 0 for the empty chunk
  Region region;

  uintptr_t base() const { return reinterpret_cast<uintptr_t>(region.vaddr); }  // byte 0 of the region

  // One byte per granule of the span: kNone, or a block's kFree /
  // kAllocated at the granule where the block starts. Only for a chunk
  // built by make(); the empty chunk has none.
  std::atomic<uint8_t>* state() { return reinterpret_cast<std::atomic<uint8_t>*>(this + 1); }
  // A copy of layout followed by ngran state bytes, all kNone.
  static std::unique_ptr<Chunk, ChunkDeleter> make(const Chunk& layout);
};

// A free block: chunk, byte offset from the chunk's block 0, its state byte's index.
struct DmaPool::Entry {
  Chunk* chunk = nullptr;
  uint32_t off = 0;
  uint32_t index = 0;
};

// On its own cache line: count is written by whichever thread holds the magazine.
struct alignas(64) DmaPool::Magazine {
  uint32_t count = 0;      // valid while the magazine sits in a list (not loaded in a cache)
  Entry* slots = nullptr;  // mag_cap_ entries
  std::unique_ptr<void, detail::LineDeleter> mem;
};

// Open-addressed, insert-only table read without locks. A slot holds the
// (at most two) chunks that overlap one 2^chunk_shift-aligned address range;
// slot index = range number modulo the table size, then linear probing. The
// table is kept at most a quarter full, so the first slot almost always
// answers.
struct DmaPool::ChunkTable {
  static Chunk empty_chunk;  // len 0: contains no address
  struct Slot {
    std::atomic<uint64_t> key{0};  // (address >> chunk_shift) + 1; 0 = empty
    std::atomic<Chunk*> a{&empty_chunk};  // never null: see find_chunk
    std::atomic<Chunk*> b{&empty_chunk};
    uint64_t pad = 0;              // 32-byte slots: one slot never spans two lines
  };
  uint64_t mask = 0;  // size - 1
  // Subtracted from addresses before the shift: the first chunk's offset
  // from a 2^chunk_shift boundary. A backing that hands out chunks at one
  // fixed misalignment (a buffer allocator carving pages from a large
  // aligned run) then gets chunks that each fill exactly one range, so the
  // home slot's first chunk is always the one.
  uint64_t bias = 0;
  std::unique_ptr<Slot[]> slots;
};

// One thread's cache for one pool. Only the owner thread touches the loaded
// and previous magazines; the magazine bounds and the block tallies are
// atomic so that stats() and a destroying pool may read or reset them. home
// is shared with threads that steal, under home_mu.
struct alignas(64) DmaPool::Cache {
  // Fast path: one cache line, owner only. The loaded magazine's free
  // entries are [bottom, top); alloc pops while top != bottom, free pushes
  // while top != limit. All three are null while not attached, so both
  // tests send every call to the slow path.
  std::atomic<Entry*> top{nullptr};
  std::atomic<Entry*> bottom{nullptr};
  std::atomic<Entry*> limit{nullptr};
  // The chunk of this cache's pool that the last free found: consecutive
  // frees mostly hit one chunk, and then skip the table. The empty chunk
  // while not attached (reset on detach: a stale one could vouch for a
  // pointer into a dead pool).
  std::atomic<Chunk*> last_chunk{&ChunkTable::empty_chunk};
  Magazine* loaded = nullptr;
  Magazine* prev = nullptr;        // the previous magazine (full or empty), or null
  std::atomic<uint32_t> prev_count{0};
  std::atomic<uint64_t> uid{0};    // owning pool's uid; 0 once detached
  DmaPool* pool = nullptr;         // guarded by the registry mutex
  std::vector<Magazine*> spare;    // empty magazines, owner only
  // Shared with stealing threads.
  alignas(64) std::mutex home_mu;
  std::vector<Magazine*> home;     // full magazines this thread freed
  std::atomic<uint64_t> home_blocks{0};

  bool attached() const { return limit.load(std::memory_order_relaxed) != nullptr; }
  // Entries in the loaded magazine; a reader on another thread may see the
  // bounds of two magazines mid-swap and gets a clamped, approximate count.
  uint32_t count(uint32_t mag_cap) const {
    const auto n = top.load(std::memory_order_relaxed) - bottom.load(std::memory_order_relaxed);
    return n < 0 ? 0 : static_cast<uint32_t>(std::min<decltype(n)>(n, mag_cap));
  }
  // Forgets every magazine (the caller has returned them or they die with
  // their pool) and the remembered chunk; m, empty, becomes the loaded one
  // (null: none, not attached).
  void reset(Magazine* m, uint32_t mag_cap);
  // m (n entries) becomes the loaded magazine; null m: none (not attached).
  void load(Magazine* m, uint32_t n, uint32_t mag_cap) {
    loaded = m;
    Entry* b = m != nullptr ? m->slots : nullptr;
    bottom.store(b, std::memory_order_relaxed);
    top.store(m != nullptr ? b + n : nullptr, std::memory_order_relaxed);
    limit.store(m != nullptr ? b + mag_cap : nullptr, std::memory_order_relaxed);
  }
};

namespace detail {
// Pools that can have per-thread caches at once; slot 0 means none. A pool
// created while all are taken works without caches.
inline constexpr uint32_t kCacheSlots = 1024;
// This thread's cache array, kCacheSlots long and indexed by pool slot
// (plain TLS: no wrapper call, no bounds test). Never null: a thread that
// has attached no cache points at a shared array of idle caches, and unused
// slots of its own array hold the idle cache too; an idle cache is never
// attached, so both fast paths leave it for the slow path.
extern __thread DmaPool::Cache* const* tl_slots __attribute__((tls_model("initial-exec")));
inline constexpr uint8_t kNone = 0;  // no block starts at this granule
inline constexpr uint8_t kFree = 1;
inline constexpr uint8_t kAllocated = 2;
inline constexpr uint32_t kPoison = 1;
inline constexpr uint32_t kZero = 2;
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

inline DmaPool::Chunk* DmaPool::find_chunk(uintptr_t v) const {
  // Never null: an empty pool points at a one-slot table that matches nothing.
  const ChunkTable* t = table_.load(std::memory_order_acquire);
  // The home slot's first chunk answers almost every lookup by its own
  // range test (block addresses only), without reading the key: empty
  // slots hold a chunk of span 0, which contains nothing. Anything else
  // (second chunk, probing, not found) is the probe path. A block from a newly published chunk reached
  // this thread through the caller's own synchronisation, so its chunk is
  // visible here.
  const ChunkTable::Slot& s = t->slots[((uint64_t{v} - t->bias) >> chunk_shift_) & t->mask];
  Chunk* a = s.a.load(std::memory_order_relaxed);
  if (v - a->lo < a->span) [[likely]] return a;
  return find_chunk_probe(v);
}

// Alloc fast path, budget about 15 instructions, one test and no atomic
// RMW: TLS cache, pop one 16-byte entry if top != bottom, the block's state
// byte store, vaddr and IOVA from its chunk. Everything else (empty
// magazine, first use in this thread, no caches, debug options, growth) is
// alloc_slow().
inline Result<DmaBlock> DmaPool::alloc() {
  Cache* c = detail::tl_slots[slot_];
  Entry* t = c->top.load(std::memory_order_relaxed);
  if (t == c->bottom.load(std::memory_order_relaxed)) [[unlikely]] return alloc_slow();
  // Field by field: free stores them so, and one 8-byte load of off and
  // index would need two instructions to split.
  --t;
  Chunk* const ch = t->chunk;
  const uint64_t off = t->off;
  const uint32_t index = t->index;
  c->top.store(t, std::memory_order_relaxed);
  // Plain store: the block sits in this thread's magazine, so only a buggy
  // free could touch its state now, and that one is refused (it reads
  // kFree) or is indistinguishable from a legal free.
  ch->state()[index].store(detail::kAllocated, std::memory_order_relaxed);
  return detail::make_block(ch->lo + off, ch->iova_lo + off);
}

// Free fast path, budget about 25 instructions and one atomic
// compare-exchange: TLS cache, chunk by address (the chunk this thread freed
// into last, else one table slot), granule index (one rotation: in the
// span and on the grid, one compare), IOVA compare, the granule's state
// allocated -> free (atomic, so of two racing frees of one block exactly one
// succeeds; a granule where no block starts never changes), push if top !=
// limit. Three tests refuse; a full magazine, no cache yet, no caches or
// debug options take free_slow() after the block is validated and marked
// free. The compare-exchange is the costliest instruction here (a locked
// instruction waits for the stores before it); see docs/PERFORMANCE.md.
inline Status DmaPool::free(void* vaddr, uint64_t iova) {
  const auto v = reinterpret_cast<uintptr_t>(vaddr);
  Cache* c = detail::tl_slots[slot_];
  // An attached cache only ever remembers a chunk of its own (live) pool;
  // idle and detached caches remember the empty chunk, which contains nothing.
  Chunk* ch = c->last_chunk.load(std::memory_order_relaxed);
  uint64_t off = v - ch->lo;
  uint64_t index = granule(off);
  if (index >= ch->ngran) [[unlikely]] {  // another chunk, or not on the grid
    ch = find_chunk(v);
    if (ch == nullptr) [[unlikely]] return refuse_free(vaddr, iova, nullptr);
    if (c->attached()) c->last_chunk.store(ch, std::memory_order_relaxed);  // never the shared idle cache
    off = v - ch->lo;
    index = granule(off);
    if (index >= ch->ngran) [[unlikely]] return refuse_free(vaddr, iova, "not the start of a block");
  }
  if (iova != ch->iova_lo + off) [[unlikely]] return refuse_free(vaddr, iova, "IOVA does not match the block");
  uint8_t was = detail::kAllocated;
  if (!ch->state()[index].compare_exchange_strong(was, detail::kFree, std::memory_order_relaxed)) [[unlikely]]
    return refuse_free(vaddr, iova,
                       was == detail::kNone ? "not the start of a block" : "block is not allocated (double free?)");

  Entry* t = c->top.load(std::memory_order_relaxed);
  if (t == c->limit.load(std::memory_order_relaxed)) [[unlikely]]
    return free_slow(ch, static_cast<uint32_t>(off), static_cast<uint32_t>(index));
  t->chunk = ch;
  t->off = static_cast<uint32_t>(off);
  t->index = static_cast<uint32_t>(index);
  c->top.store(t + 1, std::memory_order_relaxed);
  return ok();
}

inline DmaBlock DmaPool::try_alloc() {
  Cache* c = detail::tl_slots[slot_];
  Entry* t = c->top.load(std::memory_order_relaxed);
  if (t == c->bottom.load(std::memory_order_relaxed)) [[unlikely]] return DmaBlock{};
  --t;
  Chunk* const ch = t->chunk;
  const uint64_t off = t->off;
  const uint32_t index = t->index;
  c->top.store(t, std::memory_order_relaxed);
  ch->state()[index].store(detail::kAllocated, std::memory_order_relaxed);  // plain store: see alloc()
  return DmaBlock{reinterpret_cast<void*>(ch->lo + off), ch->iova_lo + off};
}

// free()'s checks and its one compare-exchange in the same order; the
// magazine's room is tested before the exchange, so that a false return
// has changed nothing. A refused free reaches free(), which tests again
// and refuses it (an exchange that failed here fails there as well unless
// the block was allocated again in between, which the caller's free of a
// free block cannot be told from in free() alone either).
inline bool DmaPool::try_free(void* vaddr, uint64_t iova) {
  const auto v = reinterpret_cast<uintptr_t>(vaddr);
  Cache* c = detail::tl_slots[slot_];
  Chunk* const ch = c->last_chunk.load(std::memory_order_relaxed);  // idle caches: the empty chunk
  const uint64_t off = v - ch->lo;
  const uint64_t index = granule(off);
  Entry* const t = c->top.load(std::memory_order_relaxed);
  if (index >= ch->ngran || iova != ch->iova_lo + off || t == c->limit.load(std::memory_order_relaxed))
      [[unlikely]]
    return false;
  uint8_t was = detail::kAllocated;
  if (!ch->state()[index].compare_exchange_strong(was, detail::kFree, std::memory_order_relaxed)) [[unlikely]]
    return false;
  t->chunk = ch;
  t->off = static_cast<uint32_t>(off);
  t->index = static_cast<uint32_t>(index);
  c->top.store(t + 1, std::memory_order_relaxed);
  return true;
}

}  // namespace dmakit::pool
