// DmaPool implementation. The data structure is described in dma_pool.hpp;
// this file is ordered: types, per-thread caches, create/destroy, the fast
// paths (alloc, free), their slow paths, growth, debug and statistics.
#include "pool/dma_pool.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>

#include "base/cache_slots.hpp"
#include "base/log.hpp"

namespace dmakit::pool {

namespace {

using detail::kAllocated;
using detail::kFree;
using detail::kPoison;
using detail::kZero;
constexpr uint8_t kPoisonByte = 0xa5;
constexpr size_t kMinBlock = 8;
constexpr uint64_t kMaxChunk = uint64_t{1} << 30;
// Empty magazines a thread keeps for its next frees. A thread that cycles
// many blocks (allocate many, free many) empties magazines in one phase and
// fills them in the next; keeping them spares the pool mutex, which would
// otherwise bounce between threads once per magazine. Bounded, so that a
// thread that only allocates hands the surplus back to the depot.
constexpr size_t kMaxSpare = 64;
constexpr uint64_t kHomeBytes = 16ull << 20;  // per thread and pool
constexpr uint64_t kMinHome = 4;              // magazines


bool is_pow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// Room for n elements, growing geometrically (a plain reserve(n) per element
// would copy the whole vector every time).
template <class T>
void reserve_for(std::vector<T>& v, size_t n) {
  if (v.capacity() < n) v.reserve(std::max(n, 2 * v.capacity()));
}

// Host memory ran out (std::bad_alloc) while the pool worked for the caller:
// an error value, built without risking a second throw.
Error out_of_host_memory(const std::string& pool, const char* doing) noexcept {
  Error e{Errc::no_memory, ENOMEM, {}};
  try {
    e.message = fmt::format("pool '{}': no host memory {}", pool, doing);
  } catch (...) {  // the message stays empty; code and errno still say it
  }
  return e;
}

}  // namespace

// ---------------------------------------------------------------------------
// Line-aligned memory for state bytes and magazine entries.

namespace detail {
void* alloc_lines(size_t bytes) {
  return ::operator new((bytes + 63) & ~size_t{63}, std::align_val_t{64});
}
void free_lines(void* p) noexcept { ::operator delete(p, std::align_val_t{64}); }
}  // namespace detail

std::unique_ptr<DmaPool::Chunk, DmaPool::ChunkDeleter> DmaPool::Chunk::make(const Chunk& layout) {
  static_assert(std::is_trivially_destructible_v<std::atomic<uint8_t>>);
  void* mem = detail::alloc_lines(sizeof(Chunk) + layout.ngran);
  std::unique_ptr<Chunk, ChunkDeleter> ch(::new (mem) Chunk(layout));
  std::uninitialized_value_construct_n(ch->state(), layout.ngran);  // all kNone
  return ch;
}

void DmaPool::ChunkDeleter::operator()(Chunk* ch) const noexcept {
  ch->~Chunk();
  detail::free_lines(ch);
}

// ---------------------------------------------------------------------------
// Per-thread caches. Each pool with caches owns a slot number in
// 1..kCacheSlots-1; a thread keeps an array of kCacheSlots Cache pointers
// indexed by slot. The array pointer is plain initial-exec TLS, so the fast
// path finds its cache in two loads, without a TLS call or a bounds test.
// Slots a thread has not attached (and slot 0, pools without caches) point
// at an idle cache whose magazine bounds are null, so the fast path needs no
// null or owner test: an idle or detached cache sends every call to the
// slow path, which attaches. The registry mutex orders thread exit against
// pool destruction.

namespace {

base::CacheSlots& registry() {
  static base::CacheSlots r(detail::kCacheSlots);
  return r;
}

__thread bool tl_exiting __attribute__((tls_model("initial-exec"))) = false;

DmaPool::Cache g_idle_cache;  // never attached, never written

// What tl_slots points at in a thread that has attached no cache.
constexpr std::array<DmaPool::Cache*, detail::kCacheSlots> idle_slots() {
  std::array<DmaPool::Cache*, detail::kCacheSlots> a{};
  a.fill(&g_idle_cache);
  return a;
}
constinit const std::array<DmaPool::Cache*, detail::kCacheSlots> g_idle_slots = idle_slots();

}  // namespace

namespace detail {
__thread DmaPool::Cache* const* tl_slots __attribute__((tls_model("initial-exec"))) = g_idle_slots.data();
}  // namespace detail

using detail::kCacheSlots;
using detail::tl_slots;

// Owns a thread's caches; its destructor (thread exit) gives every cache
// still attached to a live pool back to that pool.
struct ThreadCaches {
  std::vector<std::unique_ptr<DmaPool::Cache>> caches;  // by slot
  std::vector<DmaPool::Cache*> ptrs;                    // what tl_slots points at, once sized
  ~ThreadCaches() {
    tl_exiting = true;
    tl_slots = g_idle_slots.data();
    std::lock_guard lock(registry().mutex());
    for (auto& c : caches)
      if (c && c->pool != nullptr) c->pool->absorb_cache(*c);
  }
};

namespace {
thread_local ThreadCaches tl_caches;
}

DmaPool::Cache* DmaPool::attach_cache() {
  if (slot_ == 0 || tl_exiting) return nullptr;
  // Everything that can throw std::bad_alloc comes first, while nothing
  // points at the new cache; a cache left in this slot by a destroyed pool
  // was detached (pool == nullptr) and is reused.
  ThreadCaches& tc = tl_caches;
  if (tc.caches.size() <= slot_) tc.caches.resize(slot_ + 1);
  if (tc.ptrs.empty()) tc.ptrs.assign(kCacheSlots, &g_idle_cache);
  auto& c = tc.caches[slot_];
  if (!c) c = std::make_unique<Cache>();
  c->spare.reserve(kMaxSpare);  // load_full keeps spares without allocating
  Magazine* m = nullptr;
  {
    std::lock_guard lock(mu_);
    m = take_empty_locked();
  }
  std::lock_guard lock(registry().mutex());
  try {
    reserve_for(caches_, caches_.size() + 1);
  } catch (const std::bad_alloc&) {
    std::lock_guard pool_lock(mu_);
    empty_.push_back(m);  // never allocates: see take_empty_locked
    throw;
  }
  c->pool = this;
  c->reset(m, mag_cap_);
  c->uid.store(uid_, std::memory_order_relaxed);
  caches_.push_back(c.get());
  tc.ptrs[slot_] = c.get();
  tl_slots = tc.ptrs.data();
  return c.get();
}

DmaPool::Cache* DmaPool::own_cache() {
  Cache* c = tl_slots[slot_];
  if (c->uid.load(std::memory_order_relaxed) == uid_) return c;
  return attach_cache();
}

void DmaPool::Cache::reset(Magazine* m, uint32_t mag_cap) {
  load(m, 0, mag_cap);
  prev = nullptr;
  prev_count.store(0, std::memory_order_relaxed);
  spare.clear();
  {
    std::lock_guard lock(home_mu);
    home.clear();
    home_blocks.store(0, std::memory_order_relaxed);
  }
  last_chunk.store(&ChunkTable::empty_chunk, std::memory_order_relaxed);
}

// mu_ held. A magazine holding n entries goes to the depot: full list or spares.
void DmaPool::deposit_locked(Magazine* m, uint32_t n) {
  if (m == nullptr) return;
  m->count = n;
  depot_blocks_ += n;
  (n != 0 ? full_ : empty_).push_back(m);
}

// mu_ held. Every magazine of c goes to the depot; c keeps none.
void DmaPool::return_cache_locked(Cache& c) {
  deposit_locked(c.loaded, c.count(mag_cap_));
  deposit_locked(c.prev, c.prev_count.load(std::memory_order_relaxed));
  for (Magazine* m : c.spare) deposit_locked(m, 0);
  {
    std::lock_guard home(c.home_mu);
    for (Magazine* m : c.home) deposit_locked(m, m->count);
    c.home.clear();
  }
  c.reset(nullptr, 0);
}

// Registry mutex held. The thread is exiting: its cached blocks go back.
void DmaPool::absorb_cache(Cache& c) {
  {
    std::lock_guard lock(mu_);
    return_cache_locked(c);
  }
  c.uid.store(0, std::memory_order_relaxed);
  c.pool = nullptr;
  std::erase(caches_, &c);
}

// Registry mutex held. The pool dies: cached blocks die with it (the
// magazines belong to the pool and are freed with it).
void DmaPool::detach_all_caches() {
  for (Cache* c : caches_) {
    c->reset(nullptr, 0);
    c->uid.store(0, std::memory_order_relaxed);
    c->pool = nullptr;
  }
  caches_.clear();
}

void DmaPool::flush_thread_cache() {
  Cache* c = tl_slots[slot_];
  if (c->uid.load(std::memory_order_relaxed) != uid_) return;
  std::lock_guard lock(mu_);
  Magazine* m = nullptr;  // the cache stays attached, with an empty magazine
  try {
    m = take_empty_locked();
  } catch (const std::bad_alloc&) {
    base::log().warn("pool '{}': no host memory for an empty magazine; this thread's cache is not flushed", name_);
    return;
  }
  return_cache_locked(*c);
  c->load(m, 0, mag_cap_);
}

// ---------------------------------------------------------------------------
// Create and destroy.

DmaPool::Chunk DmaPool::ChunkTable::empty_chunk;

namespace {
// What table_ points at before the first chunk: one slot whose key (0) no address has.
DmaPool::ChunkTable* empty_table() {
  static DmaPool::ChunkTable* t = [] {
    auto* e = new DmaPool::ChunkTable;  // lives for the process
    e->mask = 0;
    e->slots = std::make_unique<DmaPool::ChunkTable::Slot[]>(1);
    return e;
  }();
  return t;
}
}  // namespace

DmaPool::DmaPool(Key) : table_(empty_table()) {}

Result<std::unique_ptr<DmaPool>> DmaPool::create(std::unique_ptr<Backing> backing, std::string name,
                                                 size_t size, size_t align, size_t boundary,
                                                 const PoolOptions& opts) {
  if (name.empty()) return fail(Errc::invalid_argument, "DMA pool: empty name");
  if (!backing) return fail(Errc::invalid_argument, "pool '{}': no backing memory source", name);
  if (size == 0) return fail(Errc::invalid_argument, "pool '{}': block size 0", name);
  if (size > kMaxChunk / 2)
    return fail(Errc::invalid_argument, "pool '{}': block size {} is too large for a pool", name, size);
  if (align == 0) align = 1;
  if (!is_pow2(align))
    return fail(Errc::invalid_argument, "pool '{}': align {} is not a power of two", name, align);
  if (boundary != 0 && !is_pow2(boundary))
    return fail(Errc::invalid_argument, "pool '{}': boundary {} is not a power of two", name, boundary);
  const size_t rsize = (std::max(size, kMinBlock) + align - 1) & ~(align - 1);
  if (boundary != 0 && boundary < rsize)
    return fail(Errc::invalid_argument,
                "pool '{}': boundary {} is smaller than the block size {} (size {} rounded up to align {})",
                name, boundary, rsize, size, align);
  uint64_t chunk = opts.chunk_bytes;
  if (chunk == 0) {
    chunk = backing->chunk_size(std::clamp<uint64_t>(std::bit_ceil(uint64_t{rsize}) * 64, 64 << 10, 2 << 20));
    if (!is_pow2(chunk) || chunk < 4096 || chunk > kMaxChunk)
      return fail(Errc::internal, "pool '{}': {} suggests chunks of {} bytes, not a power of two in 4 KiB..1 GiB",
                  name, backing->describe(), chunk);
  } else if (!is_pow2(chunk) || chunk < 4096 || chunk > kMaxChunk) {
    return fail(Errc::invalid_argument, "pool '{}': chunk_bytes {} is not a power of two in 4 KiB..1 GiB",
                name, chunk);
  }
  if (rsize > chunk / 2)
    return fail(Errc::invalid_argument, "pool '{}': block size {} does not fit twice in a chunk of {} bytes",
                name, rsize, chunk);

  try {
    return create_pool(std::move(backing), name, rsize, align, boundary, chunk, opts);
  } catch (const std::bad_alloc&) {
    return std::unexpected(out_of_host_memory(name, "to create the pool"));
  }
}

std::unique_ptr<DmaPool> DmaPool::create_pool(std::unique_ptr<Backing> backing, const std::string& name,
                                              size_t rsize, size_t align, size_t boundary, uint64_t chunk,
                                              const PoolOptions& opts) {
  auto p = std::make_unique<DmaPool>(Key{});
  p->name_ = name;
  p->size_ = rsize;
  p->align_ = align;
  p->boundary_ = boundary;
  p->backing_ = std::move(backing);
  p->max_chunks_ = opts.max_chunks;
  p->debug_ = (opts.poison ? kPoison : 0) | (opts.zero ? kZero : 0);
  p->log_refusals_ = opts.log_refusals;
  // Two magazines of half the cache each: a thread holds at most cache_size
  // blocks in hand, and trades with the pool once per half cache. Debug
  // pools have none (see PoolOptions).
  p->mag_cap_ = opts.cache_size == 0 || p->debug_ != 0 ? 0 : std::max<uint32_t>(1, opts.cache_size / 2);
  // A thread keeps up to kHomeBytes of freed blocks at home (at least a few
  // magazines): enough for a thread's working set to stay on its core, and a
  // bound on what one thread can hold back from the others.
  if (p->mag_cap_ != 0)
    p->home_cap_ = static_cast<uint32_t>(
        std::clamp<uint64_t>(kHomeBytes / (uint64_t{p->mag_cap_} * rsize), kMinHome, UINT32_MAX));
  p->chunk_shift_ = static_cast<uint32_t>(std::countr_zero(chunk));
  // A block that crosses no multiple of the chunk size crosses no multiple of
  // a larger boundary, so the segment is at most one chunk.
  if (boundary != 0) {
    const uint64_t seg = std::min<uint64_t>(boundary, chunk);
    p->seg_shift_ = static_cast<uint32_t>(std::countr_zero(seg));
    p->seg_mask_ = seg - 1;
    p->per_seg_ = seg / rsize;
  }
  // Block starts lie at segment starts plus multiples of the size, and a
  // segment is a power of two at least the size: all on the size's lowest
  // set bit.
  p->gran_shift_ = static_cast<uint32_t>(std::countr_zero(uint64_t{rsize}));
  bool out_of_slots = false;
  {
    base::CacheSlots& r = registry();
    std::lock_guard lock(r.mutex());
    const auto t = r.take_locked(p->mag_cap_ != 0);
    p->uid_ = t.uid;
    p->slot_ = t.slot;
    out_of_slots = p->mag_cap_ != 0 && t.slot == 0;
  }
  if (out_of_slots) {
    p->mag_cap_ = 0;
    base::log().warn("pool '{}': {} pools with per-thread caches exist already; this one works without",
                     p->name_, kCacheSlots - 1);
  }
  return p;
}

DmaPool::~DmaPool() {
  {
    base::CacheSlots& r = registry();
    std::lock_guard lock(r.mutex());
    detach_all_caches();
    r.give_back_locked(slot_);
  }
  // The state bytes are the truth: a chunk holding an allocated block may
  // still be written by a device, so it is abandoned rather than released.
  uint64_t live = 0, kept = 0;
  for (auto& ch : chunks_) {
    uint64_t in_chunk = 0;
    for (uint64_t i = 0; i < ch->ngran; ++i)
      in_chunk += ch->state()[i].load(std::memory_order_relaxed) == kAllocated;
    live += in_chunk;
    if (in_chunk != 0) {
      ++kept;
      backing_->abandon(ch->region);
    } else {
      backing_->release(ch->region);
    }
  }
  if (live != 0)
    base::log().warn("pool '{}' destroyed with {} blocks still allocated; keeping their {} chunk(s) "
                     "({} bytes each) allocated, since a device may still use them",
                     name_, live, kept, chunk_bytes());
}

// ---------------------------------------------------------------------------
// Slow paths.

DmaBlock DmaPool::take(const Entry& e) {
  e.chunk->state()[e.index].store(kAllocated, std::memory_order_relaxed);
  const DmaBlock b{reinterpret_cast<void*>(e.chunk->lo + e.off), e.chunk->iova_lo + e.off};
  if (debug_ != 0) debug_on_alloc(b.vaddr, b.iova);
  return b;
}

Result<DmaBlock> DmaPool::alloc_slow() {
  try {
    return alloc_slower();
  } catch (const std::bad_alloc&) {
    return std::unexpected(out_of_host_memory(name_, "for a thread cache or a magazine"));
  }
}

Result<DmaBlock> DmaPool::alloc_slower() {
  Cache* c = own_cache();
  if (c == nullptr) {  // no cache (cache_size 0 or thread exiting): straight from the depot
    Entry e;
    {
      std::unique_lock lock(mu_);
      // Growth drops the lock while the backing works, and returns with the
      // new blocks in the depot (in loose_ when mag_cap_ is 0).
      if (loose_.empty() && full_.empty()) DMAKIT_TRY(grow_locked(lock));
      if (loose_.empty()) {
        reserve_for(loose_, mag_cap_);  // before a magazine is taken apart into it
        if (Magazine* m = take_full_locked(); m != nullptr) {  // unpacked with its top on top
          loose_.insert(loose_.end(), m->slots, m->slots + m->count);
          depot_blocks_ += m->count;
          m->count = 0;
          empty_.push_back(m);
        }
      }
      e = loose_.back();
      loose_.pop_back();
      --depot_blocks_;
    }
    return take(e);
  }
  if (c->count(mag_cap_) == 0) {
    if (c->prev != nullptr && c->prev_count.load(std::memory_order_relaxed) != 0) {
      // Bonwick: the previous magazine is full, swap it in.
      Magazine* full = c->prev;
      c->prev = c->loaded;
      c->load(full, c->prev_count.load(std::memory_order_relaxed), mag_cap_);
      c->prev_count.store(0, std::memory_order_relaxed);
    } else {
      DMAKIT_TRY(load_full(*c));
    }
  }
  Entry* t = c->top.load(std::memory_order_relaxed) - 1;
  c->top.store(t, std::memory_order_relaxed);
  return take(*t);
}

// Both magazines empty: the loaded one is traded for a full one - this
// thread's own (its entries and the blocks' state bytes are still in this
// core's cache), else the depot's, else new blocks, and only when the pool
// cannot grow another thread's.
//
// Growth comes before stealing because a steal moves a magazine's entries
// and its blocks' state lines to this core and takes the other thread's
// home lock while it works: with two threads each needing every block it
// owns at its peak (the kernel's alloc-all/free-all pattern) a thread that
// falls behind steals from the other, which then falls short and steals
// back, round after round (measured: two threads at 1.1-1.6x one thread's
// throughput, against 1.8-2.0x without stealing and the same growth). What
// a thread may keep at home is bounded (home_cap_), the rest goes to the
// depot, so a thread that only frees (blocks allocated by another) cannot
// make the pool grow without bound.
Status DmaPool::load_full(Cache& c) {
  Magazine* m = nullptr;
  {
    std::lock_guard home(c.home_mu);
    if (!c.home.empty()) {
      m = c.home.back();
      c.home.pop_back();
      c.home_blocks.fetch_sub(m->count, std::memory_order_relaxed);
    }
  }
  if (m == nullptr) {
    std::unique_lock lock(mu_);
    m = take_full_locked();
    // At max_chunks this is no failure yet (a steal may serve), so not tried.
    if (m == nullptr && !at_max_chunks_locked())
      if (auto grown = take_grown_locked(lock, c)) m = *grown;
  }
  if (m == nullptr) m = steal();
  if (m == nullptr) {
    std::unique_lock lock(mu_);
    m = take_full_locked();  // another thread may have returned blocks meanwhile
    if (m == nullptr) m = DMAKIT_TRY(take_grown_locked(lock, c));  // fails again: the caller gets why
  }
  // The empty loaded magazine becomes a spare; beyond kMaxSpare it goes back.
  if (c.spare.size() < kMaxSpare) {
    c.spare.push_back(c.loaded);
  } else {
    std::lock_guard lock(mu_);
    empty_.push_back(c.loaded);
  }
  c.load(m, m->count, mag_cap_);
  return ok();
}

// mu_ held through lock. Grows the pool and returns the new chunk's lowest
// magazine; the thread keeps the chunk's other magazines at home, as far as
// its home has room: it wants them next, and takes them there without the
// pool lock. Left in the depot, they went to whichever thread came next,
// and two threads filling up at once took turns growing and taking each
// other's new magazines, each turn a pass through the contended lock.
Result<DmaPool::Magazine*> DmaPool::take_grown_locked(std::unique_lock<std::mutex>& lock, Cache& c) {
  uint64_t grown = 0;
  DMAKIT_TRY(grow_locked(lock, &grown));
  Magazine* m = take_full_locked();  // the new chunk's magazines are on top
  if (m == nullptr) return fail(Errc::internal, "pool '{}': grew but found no free block", name_);
  if (grown > 1) keep_home_locked(c, grown - 1);
  return m;
}

// mu_ held. The depot's top n full magazines go to c's home, as far as it
// has room.
void DmaPool::keep_home_locked(Cache& c, uint64_t n) {
  std::lock_guard home(c.home_mu);
  n = std::min<uint64_t>({n, full_.size(), home_cap_ - std::min<uint64_t>(home_cap_, c.home.size())});
  if (n == 0) return;
  const auto first = full_.end() - static_cast<std::ptrdiff_t>(n);
  try {
    c.home.insert(c.home.end(), first, full_.end());  // the lowest address stays on top
  } catch (const std::bad_alloc&) {
    return;  // they stay in the depot
  }
  uint64_t blocks = 0;
  for (auto it = first; it != full_.end(); ++it) blocks += (*it)->count;
  full_.erase(first, full_.end());
  depot_blocks_ -= blocks;
  c.home_blocks.fetch_add(blocks, std::memory_order_relaxed);
}

// mu_ held. A magazine with entries, or null.
DmaPool::Magazine* DmaPool::take_full_locked() {
  Magazine* m = nullptr;
  if (!full_.empty()) {
    m = full_.back();
    full_.pop_back();
  } else if (!loose_.empty() && mag_cap_ != 0) {  // entries freed without a cache
    m = take_empty_locked();
    const uint32_t n = static_cast<uint32_t>(std::min<size_t>(mag_cap_, loose_.size()));
    std::copy(loose_.end() - n, loose_.end(), m->slots);
    loose_.resize(loose_.size() - n);
    m->count = n;
  } else {
    return nullptr;
  }
  depot_blocks_ -= m->count;
  return m;
}

// mu_ held.
DmaPool::Magazine* DmaPool::take_empty_locked() {
  if (!empty_.empty()) {
    Magazine* m = empty_.back();
    empty_.pop_back();
    return m;
  }
  // The depot's lists can hold every magazine at once, so that moving one
  // between them (or back from a cache) never allocates: the paths that
  // hand a magazine over cannot fail halfway and lose its blocks.
  const size_t n = mags_.size() + 1;
  reserve_for(mags_, n);
  reserve_for(empty_, n);
  reserve_for(full_, n);
  auto m = std::make_unique<Magazine>();
  m->mem.reset(detail::alloc_lines(sizeof(Entry) * mag_cap_));
  m->slots = static_cast<Entry*>(m->mem.get());
  std::uninitialized_default_construct_n(m->slots, mag_cap_);
  mags_.push_back(std::move(m));
  return mags_.back().get();
}

// The oldest full magazine of another thread (the one it will want last).
DmaPool::Magazine* DmaPool::steal() {
  std::lock_guard reg(registry().mutex());
  const Cache* self = tl_slots[slot_];
  for (Cache* other : caches_) {
    if (other == self || other->home_blocks.load(std::memory_order_relaxed) == 0) continue;
    std::lock_guard home(other->home_mu);
    if (other->home.empty()) continue;
    Magazine* m = other->home.front();
    other->home.erase(other->home.begin());
    other->home_blocks.fetch_sub(m->count, std::memory_order_relaxed);
    steals_.fetch_add(1, std::memory_order_relaxed);
    return m;
  }
  return nullptr;
}

// The block is validated and marked free already. Without host memory for
// a cache or a magazine it is marked allocated again and the free refused:
// the caller still holds it and may free it later.
Status DmaPool::free_slow(Chunk* ch, uint32_t off, uint32_t index) {
  try {
    return free_slower(ch, off, index);
  } catch (const std::bad_alloc&) {
    ch->state()[index].store(kAllocated, std::memory_order_relaxed);
    return std::unexpected(out_of_host_memory(name_, "to take back a block; it stays allocated"));
  }
}

Status DmaPool::free_slower(Chunk* ch, uint32_t off, uint32_t index) {
  const Entry e{ch, off, index};
  Cache* c = own_cache();
  if (c == nullptr) {  // no caches (cache_size 0, debug options) or the thread is exiting
    std::lock_guard lock(mu_);
    loose_.push_back(e);
    ++depot_blocks_;
    // Poisoned once it is surely the pool's (the push may have thrown), under
    // the lock, before another thread can take it.
    if (debug_ & kPoison) debug_on_free(reinterpret_cast<void*>(ch->lo + off));
    return ok();
  }
  if (c->top.load(std::memory_order_relaxed) == c->limit.load(std::memory_order_relaxed)) stash_full(*c);
  Entry* t = c->top.load(std::memory_order_relaxed);
  *t = e;
  c->top.store(t + 1, std::memory_order_relaxed);
  return ok();
}

// The loaded magazine is full. Bonwick: an empty previous one is swapped in;
// a full previous one goes to this thread's home list (where this thread
// takes it back first and others may steal it) and the loaded one becomes
// previous, with an empty magazine loaded.
void DmaPool::stash_full(Cache& c) {
  const uint32_t n = c.count(mag_cap_);
  Magazine* next = nullptr;
  if (c.prev != nullptr && c.prev_count.load(std::memory_order_relaxed) == 0) {
    next = c.prev;
    c.prev = c.loaded;
    c.prev_count.store(n, std::memory_order_relaxed);
  } else {
    // The empty magazine first: if that needs memory and there is none,
    // nothing has moved yet.
    if (!c.spare.empty()) {
      next = c.spare.back();
      c.spare.pop_back();
    } else {
      std::lock_guard lock(mu_);
      next = take_empty_locked();
    }
    if (c.prev != nullptr) {
      c.prev->count = c.prev_count.load(std::memory_order_relaxed);
      bool kept = false;
      {
        std::lock_guard home(c.home_mu);
        if (c.home.size() < home_cap_) {
          try {
            c.home.push_back(c.prev);
            c.home_blocks.fetch_add(c.prev->count, std::memory_order_relaxed);
            kept = true;
          } catch (const std::bad_alloc&) {  // the depot takes it instead, without allocating
          }
        }
      }
      if (!kept) {
        std::lock_guard lock(mu_);
        deposit_locked(c.prev, c.prev->count);
      }
    }
    c.prev = c.loaded;
    c.prev_count.store(n, std::memory_order_relaxed);
  }
  c.load(next, 0, mag_cap_);
}

Status DmaPool::refuse_free(const void* vaddr, uint64_t iova, const char* why) {
  const uint64_t nth = validation_failures_.fetch_add(1, std::memory_order_relaxed) + 1;
  const Chunk* ch = chunk_around(reinterpret_cast<uintptr_t>(vaddr));
  if (why == nullptr) why = ch != nullptr ? "not the start of a block" : "not inside any chunk of this pool";
  std::string msg;
  try {
    msg = fmt::format("pool '{}': free of {} (IOVA {:#x}) refused: {}", name_, vaddr, iova, why);
    if (ch != nullptr)
      msg += fmt::format(" [chunk {:#x} IOVA {:#x}, offset {:#x}]", ch->base(), ch->region.iova,
                         reinterpret_cast<uintptr_t>(vaddr) - ch->base());
  } catch (const std::bad_alloc&) {  // refused all the same; the counter has it
    return std::unexpected(Error{Errc::corrupted, 0, {}});
  }
  // A workload that refuses many frees (a stress run double-frees on
  // purpose) must not flood the log: the first few in full, then one line
  // per 1024 with the running count. The counter and the returned error
  // still carry every one.
  constexpr uint64_t kLogFirst = 8, kLogEvery = 1024;
  if (!log_refusals_) {
    // Refused on purpose by the caller (counted and returned all the same).
  } else if (nth <= kLogFirst) {
    base::log().warn("{}", msg);
    if (nth == kLogFirst)
      base::log().warn("pool '{}': further refused frees are logged once per {}", name_, kLogEvery);
  } else if (nth % kLogEvery == 0) {
    base::log().warn("pool '{}': {} frees refused so far; latest: {}", name_, nth, msg);
  }
  return fail(Errc::corrupted, std::move(msg));
}

namespace {
// The chunk of table t that `holds` v, from the slot of v's range; null: none.
template <class Holds>
DmaPool::Chunk* probe(const DmaPool::ChunkTable* t, uint32_t chunk_shift, uintptr_t v, Holds holds) {
  const uint64_t key = ((uint64_t{v} - t->bias) >> chunk_shift) + 1;
  for (uint64_t i = (key - 1) & t->mask;; i = (i + 1) & t->mask) {
    const DmaPool::ChunkTable::Slot& s = t->slots[i];
    const uint64_t k = s.key.load(std::memory_order_acquire);
    if (k == key) {
      DmaPool::Chunk* a = s.a.load(std::memory_order_relaxed);
      if (holds(a)) return a;
      DmaPool::Chunk* b = s.b.load(std::memory_order_relaxed);
      if (holds(b)) return b;
      return nullptr;
    }
    if (k == 0) return nullptr;
  }
}
}  // namespace

DmaPool::Chunk* DmaPool::find_chunk_probe(uintptr_t v) const {
  return probe(table_.load(std::memory_order_acquire), chunk_shift_, v,
               [v](const Chunk* c) { return v - c->lo < c->span; });
}

const DmaPool::Chunk* DmaPool::chunk_around(uintptr_t v) const {
  return probe(table_.load(std::memory_order_acquire), chunk_shift_, v,
               [v](const Chunk* c) { return v - c->base() < c->region.len; });
}

// ---------------------------------------------------------------------------
// Growth: one chunk from the backing, its blocks laid on the IOVA grid and
// pushed on the free stack, then the chunk published for free()'s lookup.

namespace {
// Walks a chunk's blocks in address order on the IOVA grid: size apart
// inside a segment, then the start of the next segment; no division per
// block.
struct GridWalk {
  uint64_t g = 0;  // grid offset of the current block
  uint64_t k = 0;  // its index inside its segment
  uint64_t size = 0, per_seg = 0;
  uint32_t seg_shift = 0;
  void next() {
    if (++k == per_seg) {
      k = 0;
      g = ((g >> seg_shift) + 1) << seg_shift;
    } else {
      g += size;
    }
  }
};
}  // namespace

// Growth in three steps, the pool lock held only for the short first and
// last ones: the backing call (a system call; for buffers, a whole
// allocation with its IOMMU mapping) and the carving of the chunk into
// magazines run without it, so other threads keep trading magazines, and
// two threads short of blocks grow side by side. Everything that needs host
// memory happens before the pool changes; when it fails the region goes
// back and the pool is as it was. On success the new blocks are on top of
// the depot (mags_added magazines) when this returns, the lock held.
Status DmaPool::grow_locked(std::unique_lock<std::mutex>& lock, uint64_t* mags_added) {
  const uint64_t len = chunk_bytes();
  if (at_max_chunks_locked()) {
    grow_failures_.fetch_add(1, std::memory_order_relaxed);
    return fail(Errc::no_space, "pool '{}': all {} blocks in use and the pool is at max_chunks {}", name_,
                blocks_, max_chunks_);
  }

  // 1. Locked: empty magazines for as many blocks as the chunk can hold.
  const uint64_t most = mag_cap_ == 0 ? 0 : (len / size_ + mag_cap_ - 1) / mag_cap_;
  std::vector<Magazine*> fresh;
  try {
    fresh.reserve(most);
    while (fresh.size() < most) fresh.push_back(take_empty_locked());
  } catch (const std::bad_alloc&) {
    for (Magazine* m : fresh) empty_.push_back(m);  // never allocates: see take_empty_locked
    grow_failures_.fetch_add(1, std::memory_order_relaxed);
    return std::unexpected(out_of_host_memory(name_, "for the magazines of a new chunk"));
  }
  ++growing_;  // counts against max_chunks until published or given up
  lock.unlock();
  auto give_up = [&](const Region* r) {  // unlocked on entry, locked on return
    if (r != nullptr) backing_->release(*r);
    lock.lock();
    for (Magazine* m : fresh) {
      m->count = 0;
      empty_.push_back(m);
    }
    --growing_;
    grow_failures_.fetch_add(1, std::memory_order_relaxed);
  };

  // 2. Unlocked: the region, the chunk's layout on the grid, its record,
  //    and its blocks carved into the magazines (nobody else sees the chunk
  //    yet). Each block's state byte turns free as its entry is made; block
  //    i goes into magazine i / mag_cap_, lowest address on top, so blocks
  //    come out in address order, and magazines of a line-multiple size
  //    share no state line, so neither do two threads' magazines.
  auto region = backing_->grow(len);
  if (!region) {
    give_up(nullptr);
    return std::unexpected(with_context(
        std::move(region).error(),
        fmt::format("pool '{}': cannot grow by {} bytes from {}", name_, len, backing_->describe())));
  }
  Chunk layout;  // the record, before its state bytes are allocated with it
  layout.region = *region;
  const uintptr_t base = layout.base();
  const uint64_t iova = region->iova;
  if (region->len != len || (base & 4095) != 0 || (iova & 4095) != 0 || ((base ^ iova) & (align_ - 1)) != 0) {
    give_up(&*region);
    return fail(Errc::internal,
                "pool '{}': {} gave a region vaddr {:#x} IOVA {:#x} len {} that cannot hold blocks of align {} "
                "(need len {}, page-aligned, vaddr and IOVA equal modulo the alignment)",
                name_, backing_->describe(), base, iova, region->len, align_, len);
  }
  const uint64_t grid = boundary_ != 0 ? seg_mask_ + 1 : align_;
  const uint64_t origin = iova & (grid - 1);  // grid offset of byte 0
  // Block 0: the first grid position at or after the origin whose block
  // fits its segment; then every block that ends inside the chunk.
  GridWalk first{.size = size_, .per_seg = per_seg_, .seg_shift = seg_shift_};
  first.k = ((origin & seg_mask_) + size_ - 1) / size_;
  first.g = ((origin >> seg_shift_) << seg_shift_) + first.k * size_;
  if (first.k >= per_seg_) {  // no block fits the rest of the origin's segment
    first.k = 0;
    first.g = ((origin >> seg_shift_) + 1) << seg_shift_;
  }
  uint64_t n = 0, last_g = first.g;
  for (GridWalk w = first; w.g + size_ <= origin + len; w.next(), ++n) last_g = w.g;
  layout.lo = base + (first.g - origin);
  layout.iova_lo = iova + (first.g - origin);
  layout.span = n == 0 ? 0 : last_g + size_ - first.g;
  layout.ngran = layout.span >> gran_shift_;
  const uint64_t mags = mag_cap_ == 0 ? 0 : (n + mag_cap_ - 1) / mag_cap_;  // <= most

  std::unique_ptr<Chunk, ChunkDeleter> owned;
  try {
    owned = Chunk::make(layout);
  } catch (const std::bad_alloc&) {
    give_up(&*region);
    return std::unexpected(out_of_host_memory(name_, "for the record of a new chunk"));
  }
  Chunk* ch = owned.get();
  if (debug_ & kPoison) std::memset(region->vaddr, kPoisonByte, len);
  auto entry = [&](const GridWalk& w) {
    const uint64_t off = w.g - first.g;
    ch->state()[off >> gran_shift_].store(kFree, std::memory_order_relaxed);
    return Entry{ch, static_cast<uint32_t>(off), static_cast<uint32_t>(off >> gran_shift_)};
  };
  GridWalk w = first;
  for (uint64_t j = 0; j < mags; ++j) {
    const uint64_t count = std::min<uint64_t>(mag_cap_, n - j * mag_cap_);
    Magazine* m = fresh[j];
    m->count = static_cast<uint32_t>(count);
    for (uint64_t i = count; i-- > 0; w.next()) m->slots[i] = entry(w);
  }

  // 3. Locked: room in the lists (other threads may have used what there
  //    was), a larger chunk table if needed; then the chunk is published
  //    and its blocks go to the depot (the lowest magazine on top).
  lock.lock();
  std::unique_ptr<ChunkTable> table;
  uint64_t table_used = table_used_;
  try {
    reserve_for(chunks_, chunks_.size() + 1);
    reserve_for(tables_, tables_.size() + 1);
    if (mag_cap_ == 0) reserve_for(loose_, loose_.size() + n);
    table = table_for_locked(ch, table_used);
  } catch (const std::bad_alloc&) {
    lock.unlock();
    give_up(&*region);
    return std::unexpected(out_of_host_memory(name_, "for the lists of a new chunk"));
  }
  if (mag_cap_ == 0) {  // without caches the entries are loose, block 0 last (on top)
    const size_t at = loose_.size();
    loose_.resize(at + n);  // room made above: no allocation
    for (uint64_t i = n; i-- > 0; w.next()) loose_[at + i] = entry(w);
  }
  for (uint64_t j = mags; j-- > 0;) full_.push_back(fresh[j]);
  for (uint64_t j = mags; j < fresh.size(); ++j) empty_.push_back(fresh[j]);  // more than the chunk needed
  if (mags_added != nullptr) *mags_added = mags;
  --growing_;
  depot_blocks_ += n;
  publish_chunk(ch, std::move(table), table_used);
  blocks_ += n;
  chunks_.push_back(std::move(owned));
  return ok();
}

namespace {
// Enters chunk c into table t (one key per 2^chunk_shift range it touches);
// returns how many keys it added.
uint64_t insert_chunk(DmaPool::ChunkTable& t, DmaPool::Chunk* c, uint32_t chunk_shift) {
  uint64_t added = 0;
  // Ranges counted modulo 2^(64 - chunk_shift), as lookups compute them
  // (an address below the bias wraps around).
  const uint64_t wrap = ~uint64_t{0} >> chunk_shift;
  const uint64_t last = (c->base() + c->region.len - 1 - t.bias) >> chunk_shift;
  for (uint64_t s = (c->base() - t.bias) >> chunk_shift;; s = (s + 1) & wrap) {
    const uint64_t key = s + 1;
    for (uint64_t i = s & t.mask;; i = (i + 1) & t.mask) {
      DmaPool::ChunkTable::Slot& slot = t.slots[i];
      const uint64_t k = slot.key.load(std::memory_order_relaxed);
      if (k == key) {  // a neighbour chunk shares this range: chunks are one range long, so at most two
        slot.b.store(c, std::memory_order_release);
        break;
      }
      if (k == 0) {
        slot.a.store(c, std::memory_order_release);
        slot.key.store(key, std::memory_order_release);
        ++added;
        break;
      }
    }
    if (s == last) break;
  }
  return added;
}
}  // namespace

// mu_ held. A new table holding every chunk and ch when the current one
// would pass a quarter full with ch in it (its key count in used), else
// null. Readers never see it until publish_chunk.
std::unique_ptr<DmaPool::ChunkTable> DmaPool::table_for_locked(Chunk* ch, uint64_t& used) const {
  const ChunkTable* t = chunks_.empty() ? nullptr : table_.load(std::memory_order_relaxed);
  // Each chunk adds at most two keys; keep the load factor at or below one
  // quarter, so that a lookup rarely probes past its first slot.
  if (t != nullptr && (table_used_ + 2) * 4 <= t->mask + 1) return nullptr;
  auto nt = std::make_unique<ChunkTable>();
  const uint64_t size = std::max<uint64_t>(16, std::bit_ceil((table_used_ + 2) * 8));
  nt->mask = size - 1;
  // Fixed by the first chunk, kept by every later table.
  nt->bias = t != nullptr ? t->bias : (chunks_.empty() ? ch : chunks_.front().get())->base() & (chunk_bytes() - 1);
  nt->slots = std::make_unique<ChunkTable::Slot[]>(size);
  used = 0;
  for (const auto& old : chunks_) used += insert_chunk(*nt, old.get(), chunk_shift_);
  used += insert_chunk(*nt, ch, chunk_shift_);
  return nt;
}

// mu_ held; never allocates (grow_locked made room). ch goes into the new
// table (already in it) or the current one.
void DmaPool::publish_chunk(Chunk* ch, std::unique_ptr<ChunkTable> nt, uint64_t used) {
  if (nt != nullptr) {
    table_used_ = used;
    table_.store(nt.get(), std::memory_order_release);
    tables_.push_back(std::move(nt));  // readers may still hold the old one
  } else {
    table_used_ += insert_chunk(*table_.load(std::memory_order_relaxed), ch, chunk_shift_);
  }
}

// ---------------------------------------------------------------------------
// Debug options, off the fast paths: debug pools have no caches, so every
// alloc takes take() and every free free_slow().

void DmaPool::debug_on_free(void* vaddr) { std::memset(vaddr, kPoisonByte, size_); }

void DmaPool::debug_on_alloc(void* vaddr, uint64_t iova) {
  if (debug_ & kPoison) {
    const auto* p = static_cast<const uint8_t*>(vaddr);
    for (size_t i = 0; i < size_; ++i) {
      if (p[i] != kPoisonByte) {
        poison_failures_.fetch_add(1, std::memory_order_relaxed);
        base::log().warn("pool '{}': free block {} (IOVA {:#x}) was written while free: byte {} is {:#04x}, "
                         "expected {:#04x} (device write or use after free)",
                         name_, vaddr, iova, i, p[i], kPoisonByte);
        break;
      }
    }
  }
  if (debug_ & kZero) std::memset(vaddr, 0, size_);
}

// ---------------------------------------------------------------------------
// Statistics.

PoolStats DmaPool::stats() const {
  PoolStats s;
  s.name = name_;
  s.size = size_;
  s.align = align_;
  s.boundary = boundary_;
  s.chunk_bytes = chunk_bytes();
  uint64_t cached = 0;
  std::lock_guard reg(registry().mutex());
  for (const Cache* c : caches_)
    cached += c->count(mag_cap_) + c->prev_count.load(std::memory_order_relaxed) +
              c->home_blocks.load(std::memory_order_relaxed);
  std::lock_guard lock(mu_);
  s.blocks = blocks_;
  s.chunks = chunks_.size();
  const uint64_t free_blocks = depot_blocks_ + cached;
  s.active = blocks_ > free_blocks ? blocks_ - free_blocks : 0;
  s.validation_failures = validation_failures_.load(std::memory_order_relaxed);
  s.poison_failures = poison_failures_.load(std::memory_order_relaxed);
  s.grow_failures = grow_failures_.load(std::memory_order_relaxed);
  s.steals = steals_.load(std::memory_order_relaxed);
  return s;
}

std::string format_pools(std::span<const PoolStats> pools) {
  std::string out = "poolinfo - 0.1\n";
  for (const PoolStats& p : pools)
    out += fmt::format("{:<25} {:>4} {:>4} {:>4} {:>2}  align={} boundary={} chunk_bytes={} "
                       "validation_failures={} poison_failures={} grow_failures={} steals={}\n",
                       p.name, p.active, p.blocks, p.size, p.chunks, p.align, p.boundary, p.chunk_bytes,
                       p.validation_failures, p.poison_failures, p.grow_failures, p.steals);
  return out;
}

}  // namespace dmakit::pool
