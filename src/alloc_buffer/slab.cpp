// SlabTier implementation; the design is in slab.hpp.
#include "alloc_buffer/slab.hpp"

#include <bit>
#include <cstring>
#include <thread>
#include <vector>

#include "base/cache_slots.hpp"
#include "base/log.hpp"

namespace dmakit::alloc_buffer {

namespace {

constexpr uint64_t kFirstSlab = 4ull << 20;
constexpr uint64_t kMaxSlab = 1ull << 30;

// Prefixes context onto an error; out of host memory the error stays as it
// is (it already says what failed).
void prefix(Error& e, std::string_view context) noexcept {
  try {
    std::string m;
    m.reserve(context.size() + 2 + e.message.size());
    m.append(context).append(": ").append(e.message);
    e.message = std::move(m);
  } catch (const std::bad_alloc&) {
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Thread-cache registry: tier slots, uids, and each thread's caches. The
// registry mutex orders thread exit against tier teardown and attaching.

namespace {

base::CacheSlots& registry() {
  static base::CacheSlots r(kSlabCacheSlots);
  return r;
}

SlabCache g_idle_cache;  // uid 0: matches no tier; never written

constexpr std::array<SlabCache*, kSlabCacheSlots> idle_slots() {
  std::array<SlabCache*, kSlabCacheSlots> a{};
  a.fill(&g_idle_cache);
  return a;
}
constinit const std::array<SlabCache*, kSlabCacheSlots> g_idle_slots = idle_slots();

__thread bool tl_exiting __attribute__((tls_model("initial-exec"))) = false;

}  // namespace

namespace detail {
__thread SlabCache* const* tl_slab_caches __attribute__((tls_model("initial-exec"))) = g_idle_slots.data();
}  // namespace detail

// Owns a thread's caches; at thread exit every cache still attached goes
// back to its tier.
struct ThreadSlabCaches {
  std::vector<std::unique_ptr<SlabCache>> caches;  // by slot
  std::vector<SlabCache*> ptrs;                    // what tl_slab_caches points at, once sized
  ~ThreadSlabCaches() {
    tl_exiting = true;
    detail::tl_slab_caches = g_idle_slots.data();
    std::lock_guard lock(registry().mutex());
    for (auto& c : caches)
      if (c && c->tier != nullptr) c->tier->absorb_cache(*c);
  }
};

namespace {
thread_local ThreadSlabCaches tl_caches;
}

// This thread's cache for the tier, attached on first use; null when the
// tier has no slot, the thread is exiting or host memory is short.
SlabCache* SlabTier::own_cache() noexcept {
  if (cache_slot_ == 0 || tl_exiting) return nullptr;
  SlabCache* c = detail::tl_slab_caches[cache_slot_];
  if (c->uid.load(std::memory_order_relaxed) == uid_) return c;
  try {
    ThreadSlabCaches& t = tl_caches;
    if (t.caches.size() <= cache_slot_) t.caches.resize(cache_slot_ + 1);
    if (t.ptrs.empty()) t.ptrs.assign(kSlabCacheSlots, &g_idle_cache);
    auto& mine = t.caches[cache_slot_];
    if (!mine) mine = std::make_unique<SlabCache>();
    std::lock_guard lock(registry().mutex());
    caches_.reserve(caches_.size() + 1);
    // A cache left in this slot by a destroyed tier was emptied and detached.
    mine->tier = this;
    mine->gen = drain_gen();
    for (int i = 0; i < kSlabCachedClasses; ++i) {
      const uint64_t size = i < nclasses_ ? classes_[i].size : 0;
      mine->mags[i].n.store(0, std::memory_order_relaxed);
      mine->mags[i].cap = size != 0 && size <= kSlabCacheMaxClass
                              ? static_cast<uint32_t>(std::min<uint64_t>(kSlabMagazine, kSlabCacheBytes / size))
                              : 0;
    }
    mine->uid.store(uid_, std::memory_order_relaxed);
    caches_.push_back(mine.get());
    t.ptrs[cache_slot_] = mine.get();
    detail::tl_slab_caches = t.ptrs.data();
    return mine.get();
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}

// Every cached slot of c back to its block (this thread's cache, or one
// whose thread is gone).
void SlabTier::drain_cache(SlabCache& c) noexcept {
  for (int i = 0; i < kSlabCachedClasses && i < nclasses_; ++i) {
    SlabCache::Magazine& m = c.mags[i];
    const uint32_t n = m.n.load(std::memory_order_relaxed);
    if (n == 0) continue;
    Class& cl = classes_[i];
    cl.lock.lock();
    for (uint32_t k = 0; k < n; ++k) {
      give_back_locked(cl, ImplPtr(m.recs[k]));
    }
    m.n.store(0, std::memory_order_relaxed);
    cl.lock.unlock();
  }
  c.gen = drain_gen();
}

// Registry lock held: the cache's thread exits.
void SlabTier::absorb_cache(SlabCache& c) noexcept {
  drain_cache(c);
  c.uid.store(0, std::memory_order_relaxed);
  c.tier = nullptr;
  std::erase(caches_, &c);
}

// Under the class lock. A slot back to its block, its record to the pool;
// a block turning wholly free while the class keeps another empty one goes
// back to its slab (the tier's mutex under the class lock: the lock order).
void SlabTier::give_back_locked(Class& c, ImplPtr rec) noexcept {
  SlabBlock* b = rec->block;
  const uint32_t i = rec->slot;
  b->free_idx[b->nfree++] = static_cast<uint16_t>(i);
  if (!b->listed) link(c, b);
  --c.live;
  const bool spare = --b->used == 0 && ++c.empty > 1;
  if (spare) {
    unlink(c, b);
    --c.empty;
  }
  rec->block = nullptr;
  push_record(c, std::move(rec));  // a chain: allocates nothing
  if (spare) return_block(b);
}

// Teardown: no other thread uses the tier any more, so every thread's
// cached slots go back to their blocks (retire_free then finds every free
// slab) and every cache is detached.
void SlabTier::close_caches() noexcept {
  std::lock_guard lock(registry().mutex());
  while (!caches_.empty()) absorb_cache(*caches_.back());
}

uint64_t SlabTier::cached_count(int cls) const {
  if (cls >= kSlabCachedClasses) return 0;
  uint64_t n = 0;
  std::lock_guard lock(registry().mutex());
  for (const SlabCache* c : caches_) n += c->mags[cls].n.load(std::memory_order_relaxed);
  return n;
}

// ---------------------------------------------------------------------------

void SlabTier::SpinLock::lock_contended() {
  for (int spins = 0;; ++spins) {
    if (!held.load(std::memory_order_relaxed) && !held.exchange(true, std::memory_order_acquire)) return;
    // A holder that was preempted is let run rather than spun against
    // (two cores are shared with other work).
    if (spins > 64) std::this_thread::yield();
  }
}

SlabTier::SlabTier(SlabHost& host, std::shared_ptr<Anchor> anchor, uint64_t unit, uint64_t max_class)
    : host_(host),
      anchor_(std::move(anchor)),
      unit_(unit),
      unit_shift_(std::countr_zero(unit)),
      max_class_(max_class) {
  nclasses_ = std::countr_zero(max_class) - unit_shift_ + 1;
  classes_ = std::make_unique<Class[]>(static_cast<size_t>(nclasses_));
  for (int i = 0; i < nclasses_; ++i) {
    classes_[i].size = unit << i;
    classes_[i].slots = static_cast<uint32_t>(kSlabBlock / classes_[i].size);
  }
  std::lock_guard lock(registry().mutex());
  const auto t = registry().take_locked(true);  // slot 0 when all are taken: no thread caches
  uid_ = t.uid;
  cache_slot_ = t.slot;
}

SlabTier::~SlabTier() {
  // Called with no Buffer able to reach the tier (the anchor is cleared, and
  // detached caches match no record). Cached slots are not in use; their
  // records go with the tier. Slabs with slots in use keep their memory and
  // mapping: a device may still use them; only their records go.
  uint64_t cached = 0;
  {
    std::lock_guard lock(registry().mutex());
    for (SlabCache* c : caches_) {
      for (auto& m : c->mags) {
        const uint32_t n = m.n.load(std::memory_order_relaxed);
        cached += n;
        for (uint32_t k = 0; k < n; ++k) ImplPtr(m.recs[k]).reset();
        m.n.store(0, std::memory_order_relaxed);
      }
      c->uid.store(0, std::memory_order_relaxed);
      c->tier = nullptr;
    }
    caches_.clear();
    registry().give_back_locked(cache_slot_);
  }
  uint64_t live = 0;
  for (int i = 0; i < nclasses_; ++i) live += classes_[i].live;
  live -= cached;
  if (live != 0)
    base::log().warn("buffer slabs: {} slab buffers live at teardown; their slabs' memory and mappings are left "
                     "in place",
                     live);
  // The slab's record is host bookkeeping: dropping it returns nothing to a
  // source and unmaps nothing.
  for (auto& s : slabs_) s->mem.reset();
  // The record pools are chains: freed one by one, not recursively.
  for (int i = 0; i < nclasses_; ++i)
    while (ImplPtr r = pop_record(classes_[i])) r.reset();
}

ImplPtr SlabTier::pop_record(Class& c) {
  ImplPtr r = std::move(c.records);
  if (r != nullptr) c.records = std::move(r->next);
  return r;
}

void SlabTier::push_record(Class& c, ImplPtr rec) {
  rec->next = std::move(c.records);
  c.records = std::move(rec);
}

// A record for the pool, with room for its one chunk; null out of host memory.
ImplPtr SlabTier::new_record() noexcept {
  try {
    auto rec = std::make_unique<Buffer::Impl>();
    rec->anchor = anchor_;
    rec->chunks.resize(1);
    rec->contiguous = true;
    rec->prot = iommu::kReadWrite;
    rec->cache_slot = cache_slot_;
    rec->tier_uid = uid_;
    return rec;
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}

// Under the class lock. The block has a free slot.
uint32_t SlabTier::take_slot(Class& c, SlabBlock* b, bool& fresh) {
  uint32_t i;
  if (b->nfree != 0) {
    i = b->free_idx[--b->nfree];
    fresh = false;
  } else {
    i = b->bump++;
    fresh = b->virgin;
  }
  if (b->used++ == 0) --c.empty;
  if (b->used == b->slots) unlink(c, b);
  ++c.live;
  return i;
}

void SlabTier::link(Class& c, SlabBlock* b) {
  b->prev = nullptr;
  b->next = c.head;
  if (c.head != nullptr) c.head->prev = b;
  c.head = b;
  b->listed = true;
}

void SlabTier::unlink(Class& c, SlabBlock* b) {
  if (b->prev != nullptr) b->prev->next = b->next;
  else c.head = b->next;
  if (b->next != nullptr) b->next->prev = b->prev;
  b->prev = b->next = nullptr;
  b->listed = false;
}

// Outside any lock. A pooled record already carries the anchor and room
// for its one chunk, so filling it allocates nothing.
ImplPtr SlabTier::fill(ImplPtr rec, const BufferRequest& req, int cls, SlabBlock* b, uint32_t slot, bool fresh) {
  const uint64_t size = classes_[cls].size;
  char* va = b->va + uint64_t{slot} * size;
  const uint64_t iova = b->iova + uint64_t{slot} * size;
  rec->size = req.len;
  rec->span = iommu::IovaSpan{iova, size};
  rec->chunks[0] = BufferChunk{va, iova, size, size, "slab"};
  rec->block = b;
  rec->slot = slot;
  b->owner[slot] = rec.get();
  rec->zero = fresh;
  if (req.zeroed && !fresh) {
    std::memset(va, 0, size);
    rec->zero = true;
  }
  return rec;
}

// Fast path, budget: a TLS load, the uid and magazine tests, the top
// record's dma_limit test, a pop and five stores; no lock, no atomic read-
// modify-write, plus a memset for a zeroed request. An empty magazine (or
// no cache) takes the locked path.
Result<ImplPtr> SlabTier::alloc(const BufferRequest& req, int cls) {
  SlabCache* tc = detail::tl_slab_caches[cache_slot_];
  if (cls < kSlabCachedClasses && tc->uid.load(std::memory_order_relaxed) == uid_) {
    SlabCache::Magazine& m = tc->mags[cls];
    const uint32_t n = m.n.load(std::memory_order_relaxed);
    if (n != 0 && m.recs[n - 1]->span.end() - 1 <= req.dma_limit) [[likely]] {
      m.n.store(n - 1, std::memory_order_relaxed);
      return take_cached(m.recs[n - 1], req);
    }
  }
  return alloc_locked(req, cls);
}

// A cached slot handed out: still bound to its record, memory dirty.
ImplPtr SlabTier::take_cached(Buffer::Impl* r, const BufferRequest& req) {
  ImplPtr rec(r);
  rec->size = req.len;
  rec->block->owner[rec->slot] = r;
  rec->zero = req.zeroed;
  if (req.zeroed) std::memset(rec->chunks[0].vaddr, 0, rec->span.len);
  return rec;
}

// Locked path, budget: one uncontended spin lock, a list-head test and a
// dozen loads and stores of block state, no syscall, no ioctl, no heap
// allocation (the record comes from the class's pool); plus a memset of
// the slot for a zeroed request on reused memory. Everything else - no
// block with a free slot under the request's dma_limit, or no pooled
// record - is alloc_slow.
Result<ImplPtr> SlabTier::alloc_locked(const BufferRequest& req, int cls) {
  Class& c = classes_[cls];
  c.lock.lock();
  SlabBlock* b = c.head;
  while (b != nullptr && b->iova + kSlabBlock - 1 > req.dma_limit) b = b->next;
  if (b == nullptr || c.records == nullptr) [[unlikely]] {
    c.lock.unlock();
    return alloc_slow(req, cls);
  }
  bool fresh = false;
  const uint32_t slot = take_slot(c, b, fresh);
  ImplPtr rec = pop_record(c);
  c.lock.unlock();
  return fill(std::move(rec), req, cls, b, slot, fresh);
}

// The record first (allocated while nothing is taken), then a block for the
// class: one with a free slot, a free block of a slab under dma_limit, else
// a new slab. Then the slot is taken as on the fast path. On failure the
// record goes to the pool and nothing else has changed.
[[gnu::cold, gnu::noinline]] Result<ImplPtr> SlabTier::alloc_slow(const BufferRequest& req, int cls) {
  Class& c = classes_[cls];
  c.lock.lock();
  ImplPtr rec = pop_record(c);
  c.lock.unlock();
  if (rec == nullptr) rec = new_record();
  if (rec == nullptr)
    return fail(Errc::no_memory, "slab buffer of {} bytes: out of host memory for its record", req.len);
  c.lock.lock();
  SlabBlock* b = c.head;
  while (b != nullptr && b->iova + kSlabBlock - 1 > req.dma_limit) b = b->next;
  if (b == nullptr) {
    c.lock.unlock();
    auto got = take_block(req.dma_limit);
    if (!got) {
      c.lock.lock();
      push_record(c, std::move(rec));
      c.lock.unlock();
      return std::unexpected(std::move(got).error());
    }
    b = *got;
    b->cls = static_cast<uint32_t>(cls);
    b->slots = c.slots;
    b->used = b->nfree = b->bump = 0;
    c.lock.lock();
    link(c, b);
    ++c.empty;
  }
  bool fresh = false;
  const uint32_t slot = take_slot(c, b, fresh);
  c.lock.unlock();
  return fill(std::move(rec), req, cls, b, slot, fresh);
}

Result<SlabBlock*> SlabTier::take_block(uint64_t dma_limit) {
  uint64_t want = 0;
  {
    std::lock_guard lock(mu_);
    for (auto& s : slabs_) {
      for (size_t k = s->free_blocks.size(); k-- > 0;) {
        SlabBlock& b = s->blocks[s->free_blocks[k]];
        if (b.iova + kSlabBlock - 1 > dma_limit) continue;
        s->free_blocks.erase(s->free_blocks.begin() + static_cast<ptrdiff_t>(k));
        ++s->used_blocks;
        return &b;
      }
    }
    want = std::clamp(2 * total_, kFirstSlab, kMaxSlab);
    // Room in the slab list before a slab is built, so that publishing it
    // cannot fail for want of host memory.
    try {
      slabs_.reserve(slabs_.size() + 1);
    } catch (const std::bad_alloc&) {
      want = 0;
    }
  }
  if (want == 0) return fail(Errc::no_memory, "slab for small buffers: out of host memory for the slab list");
  std::unique_ptr<Slab> s = DMAKIT_TRY(grow(want, dma_limit));
  SlabBlock* mine = &s->blocks[0];
  const uint64_t len = s->len;
  bool published = false;
  {
    std::lock_guard lock(mu_);
    try {
      slabs_.push_back(std::move(s));  // reserved above; another grower may have taken the room
      total_ += len;
      published = true;
    } catch (const std::bad_alloc&) {
    }
  }
  if (!published) {
    host_.retire_slab(std::move(s->mem));
    return fail(Errc::no_memory, "slab of {} bytes: out of host memory for the slab list", len);
  }
  return mine;
}

// A new slab of `want` bytes, or smaller ones when that cannot be had, down
// to one block. Its metadata is allocated first, for the size wanted, so
// that nothing can fail once the slab is built and mapped. Block 0 is the
// caller's; the others wait in the free list, lowest IOVA on top.
Result<std::unique_ptr<Slab>> SlabTier::grow(uint64_t want, uint64_t dma_limit) {
  std::unique_ptr<Slab> s;
  try {
    s = std::make_unique<Slab>();
    s->blocks.resize(want / kSlabBlock);
    s->free_blocks.reserve(want / kSlabBlock);
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_memory, "slab of {} bytes: out of host memory for its block list", want);
  }
  // Outside the tier's lock (it maps).
  uint64_t len = want;
  Result<ImplPtr> mem = host_.build_slab(len, dma_limit);
  // Out of memory, of entries, or of IOVA space (under a dma_limit a large
  // slab may never fit where a smaller one does): try smaller.
  while (!mem && len > kSlabBlock &&
         (mem.error().code == Errc::no_memory || mem.error().code == Errc::no_space ||
          mem.error().code == Errc::invalid_argument)) {
    len /= 2;
    mem = host_.build_slab(len, dma_limit);
  }
  if (!mem) {
    Error e = std::move(mem).error();
    prefix(e, "slab for small buffers");
    return std::unexpected(std::move(e));
  }
  grows_.fetch_add(1, std::memory_order_relaxed);
  s->iova = (*mem)->span.iova;
  s->len = (*mem)->span.len;
  s->blocks.resize(s->len / kSlabBlock);  // at most the size wanted: shrinks, no allocation
  size_t k = 0;
  const auto& m = **mem;
  for (size_t ci = 0; ci < m.chunks.size(); ++ci) {
    const BufferChunk& ch = m.chunks[ci];
    const bool zero = ci < m.from.size() && m.from[ci]->fresh_zero();
    for (uint64_t off = 0; off + kSlabBlock <= ch.len && k < s->blocks.size(); off += kSlabBlock, ++k) {
      SlabBlock& b = s->blocks[k];
      b.slab = s.get();
      b.va = static_cast<char*>(ch.vaddr) + off;
      b.iova = ch.iova + off;
      b.virgin = zero;
    }
  }
  s->mem = std::move(*mem);
  for (size_t i = s->blocks.size(); i-- > 1;) s->free_blocks.push_back(static_cast<uint32_t>(i));  // reserved
  s->used_blocks = 1;
  return s;
}

// The block serves no class any more (unlinked, no slot in use).
void SlabTier::return_block(SlabBlock* b) {
  b->virgin = b->virgin && b->bump == 0;
  b->cls = SlabBlock::kNoClass;
  Slab* s = b->slab;
  std::lock_guard lock(mu_);
  s->free_blocks.push_back(static_cast<uint32_t>(b - s->blocks.data()));
  --s->used_blocks;
}

// The free path behind free_to_cache, under the anchor: one class lock.
// The record must own its slot (so two frees of one slot never make two
// owners). With this thread's cache attached the slot goes to its magazine
// - half of a full magazine first back to the blocks - else to its block.
// A drain asked for by retire_free() empties the whole cache afterwards.
void SlabTier::free(ImplPtr rec) {
  SlabBlock* b = rec->block;
  const uint32_t i = rec->slot;
  const uint32_t cls = b->cls;  // stable while this slot is taken; checked below when it is not
  if (cls >= static_cast<uint32_t>(nclasses_) || i >= SlabBlock::kMaxSlots) [[unlikely]] {
    refuse(std::move(rec));
    return;
  }
  Class& c = classes_[cls];
  SlabCache* tc = cls < static_cast<uint32_t>(kSlabCachedClasses) ? own_cache() : nullptr;
  SlabCache::Magazine* m = tc != nullptr && tc->mags[cls].cap != 0 ? &tc->mags[cls] : nullptr;
  c.lock.lock();
  if (b->cls != cls || b->owner[i] != rec.get()) [[unlikely]] {
    c.lock.unlock();
    refuse(std::move(rec));
    return;
  }
  b->owner[i] = nullptr;
  if (m == nullptr) {
    give_back_locked(c, std::move(rec));
    c.lock.unlock();
    return;
  }
  uint32_t n = m->n.load(std::memory_order_relaxed);
  if (n == m->cap) {  // the older half back to the blocks
    const uint32_t half = (n + 1) / 2;
    for (uint32_t k = 0; k < half; ++k) {
      give_back_locked(c, ImplPtr(m->recs[k]));
    }
    std::copy(m->recs.begin() + half, m->recs.begin() + n, m->recs.begin());
    n -= half;
  }
  m->recs[n] = rec.release();
  m->n.store(n + 1, std::memory_order_relaxed);
  c.lock.unlock();
  if (tc->gen != drain_gen()) drain_cache(*tc);
}

// A free by a record that does not own its slot (a second free, a stale
// copy): counted, logged, nothing changed.
// The record is left alone (never freed): another owner may hold it.
[[gnu::cold, gnu::noinline]] void SlabTier::refuse(ImplPtr rec) {
  double_frees_.fetch_add(1, std::memory_order_relaxed);
  base::log().error("buffer slabs: free of slot {} at IOVA {:#x} by a buffer that does not own it (freed "
                    "twice?); refused",
                    rec->slot, rec->span.iova);
  (void)rec.release();
}

// Allocates nothing: it runs on trim, under memory pressure and before an
// allocation fails for want of memory.
uint64_t SlabTier::retire_free() {
  // Other threads give their cached slots back at their next free.
  drain_gen_.fetch_add(1, std::memory_order_relaxed);
  if (cache_slot_ != 0) {
    SlabCache* tc = detail::tl_slab_caches[cache_slot_];
    if (tc->uid.load(std::memory_order_relaxed) == uid_) drain_cache(*tc);
  }
  for (int i = 0; i < nclasses_; ++i) {
    Class& c = classes_[i];
    c.lock.lock();
    for (SlabBlock* b = c.head; b != nullptr;) {
      SlabBlock* next = b->next;
      if (b->used == 0) {
        unlink(c, b);
        return_block(b);  // the tier's mutex under the class lock: the lock order
      }
      b = next;
    }
    c.empty = 0;
    c.lock.unlock();
  }
  uint64_t bytes = 0;
  while (std::unique_ptr<Slab> s = take_retirable()) {
    bytes += s->len;
    host_.retire_slab(std::move(s->mem));
  }
  return bytes;
}

// A wholly free slab taken off the list, or null.
std::unique_ptr<Slab> SlabTier::take_retirable() {
  std::lock_guard lock(mu_);
  for (auto it = slabs_.begin(); it != slabs_.end(); ++it) {
    if ((*it)->used_blocks != 0) continue;
    std::unique_ptr<Slab> s = std::move(*it);
    slabs_.erase(it);
    total_ -= s->len;
    return s;
  }
  return nullptr;
}

SlabStats SlabTier::stats() const {
  SlabStats st;
  for (int i = 0; i < nclasses_; ++i) {
    Class& c = classes_[i];
    c.lock.lock();
    const uint64_t taken = c.live;
    c.lock.unlock();
    // Slots in thread caches are taken from their blocks but not in use.
    const uint64_t live = taken - std::min(taken, cached_count(i));
    st.buffers_live += live;
    st.in_use_bytes += live * c.size;
  }
  {
    std::lock_guard lock(mu_);
    st.slabs = slabs_.size();
    st.slab_bytes = total_;
    for (const auto& s : slabs_)
      if (s->used_blocks == 0) st.free_bytes += s->len;
  }
  st.grows = grows_.load(std::memory_order_relaxed);
  st.double_frees = double_frees_.load(std::memory_order_relaxed);
  return st;
}

}  // namespace dmakit::alloc_buffer
