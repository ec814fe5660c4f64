// DmaPool implementation. The data structure is described in dma_pool.hpp;
// this file is ordered: types, per-thread caches, create/destroy, the fast
// paths (alloc, free), their slow paths, growth, debug and statistics.
#include "pool/dma_pool.hpp"

#include <algorithm>
#include <bit>
#include <cstring>

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

// q = n / d for n < 2^32 with one multiply; n is a multiple of d iff n * M < M
// (Lemire, Kaser, Kurz: "Faster remainder by direct computation", 2019).
uint64_t div_magic(uint64_t d) { return UINT64_MAX / d + 1; }

bool is_pow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

}  // namespace

// ---------------------------------------------------------------------------
// Per-thread caches. Each pool owns a slot number; a thread keeps an array of
// Cache pointers indexed by slot. The array pointer and its length are plain
// initial-exec TLS, so the fast path finds its cache in a few loads without a
// TLS call. The registry mutex orders thread exit against pool destruction.

namespace {

struct Registry {
  std::mutex mu;
  std::vector<uint32_t> free_slots;
  uint32_t next_slot = 0;
  uint64_t next_uid = 1;
};

Registry& registry() {
  static Registry r;
  return r;
}

__thread bool tl_exiting __attribute__((tls_model("initial-exec"))) = false;

}  // namespace

namespace detail {
__thread DmaPool::Cache** tl_slots __attribute__((tls_model("initial-exec"))) = nullptr;
__thread uint32_t tl_nslots __attribute__((tls_model("initial-exec"))) = 0;
}  // namespace detail

using detail::tl_nslots;
using detail::tl_slots;

// Owns a thread's caches; its destructor (thread exit) gives every cache
// still attached to a live pool back to that pool.
struct ThreadCaches {
  std::vector<std::unique_ptr<DmaPool::Cache>> caches;  // by slot
  std::vector<DmaPool::Cache*> ptrs;                    // what tl_slots points at
  ~ThreadCaches() {
    tl_exiting = true;
    tl_slots = nullptr;
    tl_nslots = 0;
    std::lock_guard lock(registry().mu);
    for (auto& c : caches)
      if (c && c->pool != nullptr) c->pool->absorb_cache(*c);
  }
};

namespace {
thread_local ThreadCaches tl_caches;
}

DmaPool::Cache* DmaPool::attach_cache() {
  if (cache_cap_ == 0 || tl_exiting) return nullptr;
  ThreadCaches& tc = tl_caches;
  if (tc.caches.size() <= slot_) {
    tc.caches.resize(slot_ + 1);
    tc.ptrs.resize(slot_ + 1, nullptr);
  }
  auto& c = tc.caches[slot_];
  std::lock_guard lock(registry().mu);
  // A cache left in this slot by a destroyed pool was detached (pool == nullptr): reuse it.
  if (!c) c = std::make_unique<Cache>();
  if (c->cap != cache_cap_) {
    c->slots = std::make_unique<Entry[]>(cache_cap_);
    c->cap = cache_cap_;
  }
  c->pool = this;
  c->count.store(0, std::memory_order_relaxed);
  c->uid.store(uid_, std::memory_order_relaxed);
  caches_.push_back(c.get());
  tc.ptrs[slot_] = c.get();
  tl_slots = tc.ptrs.data();
  tl_nslots = static_cast<uint32_t>(tc.ptrs.size());
  return c.get();
}

// Registry mutex held. The thread is exiting: its cached blocks go back.
void DmaPool::absorb_cache(Cache& c) {
  {
    std::lock_guard lock(mu_);
    const uint32_t n = c.count.load(std::memory_order_relaxed);
    stack_.insert(stack_.end(), c.slots.get(), c.slots.get() + n);
  }
  c.count.store(0, std::memory_order_relaxed);
  c.uid.store(0, std::memory_order_relaxed);
  c.pool = nullptr;
  std::erase(caches_, &c);
}

// Registry mutex held. The pool dies: cached blocks die with it.
void DmaPool::detach_all_caches() {
  for (Cache* c : caches_) {
    c->count.store(0, std::memory_order_relaxed);
    c->uid.store(0, std::memory_order_relaxed);
    c->pool = nullptr;
  }
  caches_.clear();
}

void DmaPool::flush_thread_cache() {
  Cache* c = this_thread_cache();
  if (c != nullptr) flush(*c, c->count.load(std::memory_order_relaxed));
}

// ---------------------------------------------------------------------------
// Create and destroy.

DmaPool::DmaPool(Key) {}

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
    chunk = std::clamp<uint64_t>(std::bit_ceil(uint64_t{rsize}) * 64, 64 << 10, 2 << 20);
  } else if (!is_pow2(chunk) || chunk < 4096 || chunk > kMaxChunk) {
    return fail(Errc::invalid_argument, "pool '{}': chunk_bytes {} is not a power of two in 4 KiB..1 GiB",
                name, chunk);
  }
  if (rsize > chunk / 2)
    return fail(Errc::invalid_argument, "pool '{}': block size {} does not fit twice in a chunk of {} bytes",
                name, rsize, chunk);

  auto p = std::make_unique<DmaPool>(Key{});
  p->name_ = std::move(name);
  p->size_ = rsize;
  p->align_ = align;
  p->boundary_ = boundary;
  p->backing_ = std::move(backing);
  p->max_chunks_ = opts.max_chunks;
  p->cache_cap_ = opts.cache_size;
  p->batch_ = std::max<uint32_t>(1, opts.cache_size / 2);
  p->chunk_shift_ = static_cast<uint32_t>(std::countr_zero(chunk));
  // A block that crosses no multiple of the chunk size crosses no multiple of
  // a larger boundary, so the segment is at most one chunk.
  if (boundary != 0) {
    const uint64_t seg = std::min<uint64_t>(boundary, chunk);
    p->seg_shift_ = static_cast<uint32_t>(std::countr_zero(seg));
    p->seg_mask_ = seg - 1;
    p->per_seg_ = seg / rsize;
  }
  p->div_magic_ = div_magic(rsize);
  p->debug_ = (opts.poison ? kPoison : 0) | (opts.zero ? kZero : 0);
  {
    Registry& r = registry();
    std::lock_guard lock(r.mu);
    p->uid_ = r.next_uid++;
    if (!r.free_slots.empty()) {
      p->slot_ = r.free_slots.back();
      r.free_slots.pop_back();
    } else {
      p->slot_ = r.next_slot++;
    }
  }
  return p;
}

DmaPool::~DmaPool() {
  {
    Registry& r = registry();
    std::lock_guard lock(r.mu);
    detach_all_caches();
    r.free_slots.push_back(slot_);
  }
  // The state bytes are the truth: a chunk holding an allocated block may
  // still be written by a device, so it is abandoned rather than released.
  uint64_t live = 0, kept = 0;
  for (auto& ch : chunks_) {
    uint64_t in_chunk = 0;
    for (uint32_t i = 0; i < ch->nblocks; ++i)
      in_chunk += ch->state[i].load(std::memory_order_relaxed) == kAllocated;
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

bool DmaPool::take(const Entry& e, DmaBlock& out) {
  std::atomic<uint8_t>& st = e.chunk->state[e.index];
  out = DmaBlock{reinterpret_cast<void*>(e.chunk->base + e.off), e.chunk->iova + e.off};
  if (st.load(std::memory_order_relaxed) != kFree) {
    // Only two frees of one block racing each other get past the free-time
    // check; the second copy is found here while the block is in use.
    validation_failures_.fetch_add(1, std::memory_order_relaxed);
    base::log().warn("pool '{}': block {} (IOVA {:#x}) was on the free lists twice (racing double free); "
                     "dropped the duplicate",
                     name_, out.vaddr, out.iova);
    return false;
  }
  st.store(kAllocated, std::memory_order_relaxed);
  if (debug_ != 0) debug_on_alloc(out.vaddr, out.iova);
  return true;
}

Result<DmaBlock> DmaPool::alloc_slow() {
  Cache* c = this_thread_cache();
  if (c == nullptr) c = attach_cache();
  DmaBlock b;
  if (c == nullptr) {  // no cache (cache_size 0 or thread exiting): straight from the stack
    for (;;) {
      Entry e;
      {
        std::lock_guard lock(mu_);
        if (stack_.empty()) DMAKIT_TRY(grow_locked());
        e = stack_.back();
        stack_.pop_back();
      }
      if (take(e, b)) return b;
    }
  }
  for (;;) {
    const uint32_t n = c->count.load(std::memory_order_relaxed);
    if (n == 0) {
      DMAKIT_TRY(refill(*c));
      continue;
    }
    const Entry e = c->slots[n - 1];
    c->count.store(n - 1, std::memory_order_relaxed);
    if (take(e, b)) return b;
  }
}

Status DmaPool::free_slow(Chunk* ch, uint32_t off, uint32_t index) {
  const Entry e{ch, off, index};
  Cache* c = this_thread_cache();
  if (c == nullptr) c = attach_cache();
  if (c == nullptr) {
    std::lock_guard lock(mu_);
    stack_.push_back(e);
    return ok();
  }
  uint32_t n = c->count.load(std::memory_order_relaxed);
  if (n >= c->cap) {
    flush(*c, batch_);
    n = c->count.load(std::memory_order_relaxed);
  }
  c->slots[n] = e;
  c->count.store(n + 1, std::memory_order_relaxed);
  return ok();
}

Status DmaPool::refuse_free(const void* vaddr, uint64_t iova, const char* why) {
  validation_failures_.fetch_add(1, std::memory_order_relaxed);
  std::string msg = fmt::format("pool '{}': free of {} (IOVA {:#x}) refused: {}", name_, vaddr, iova, why);
  if (Chunk* ch = find_chunk(reinterpret_cast<uintptr_t>(vaddr)); ch != nullptr)
    msg += fmt::format(" [chunk {:#x} IOVA {:#x}, offset {:#x}]", ch->base, ch->iova,
                       reinterpret_cast<uintptr_t>(vaddr) - ch->base);
  base::log().warn("{}", msg);
  return fail(Errc::corrupted, std::move(msg));
}

Status DmaPool::refill(Cache& c) {
  std::lock_guard lock(mu_);
  if (stack_.empty()) DMAKIT_TRY(grow_locked());
  const size_t n = std::min<size_t>(batch_, stack_.size());
  // The top of the stack becomes the top of the cache: recently freed blocks go out first.
  std::copy(stack_.end() - static_cast<ptrdiff_t>(n), stack_.end(), c.slots.get());
  stack_.resize(stack_.size() - n);
  c.count.store(static_cast<uint32_t>(n), std::memory_order_relaxed);
  return ok();
}

void DmaPool::flush(Cache& c, uint32_t n) {
  const uint32_t count = c.count.load(std::memory_order_relaxed);
  n = std::min(n, count);
  std::lock_guard lock(mu_);
  stack_.insert(stack_.end(), c.slots.get() + (count - n), c.slots.get() + count);
  c.count.store(count - n, std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------
// Growth: one chunk from the backing, its blocks laid on the IOVA grid and
// pushed on the free stack, then the chunk published for free()'s lookup.

Status DmaPool::grow_locked() {
  const uint64_t len = chunk_bytes();
  if (max_chunks_ != 0 && chunks_.size() >= max_chunks_) {
    grow_failures_.fetch_add(1, std::memory_order_relaxed);
    return fail(Errc::no_space, "pool '{}': all {} blocks in use and the pool is at max_chunks {}", name_,
                blocks_, max_chunks_);
  }
  auto region = backing_->grow(len);
  if (!region) {
    grow_failures_.fetch_add(1, std::memory_order_relaxed);
    return std::unexpected(with_context(
        std::move(region).error(),
        fmt::format("pool '{}': cannot grow by {} bytes from {}", name_, len, backing_->describe())));
  }
  auto ch = std::make_unique<Chunk>();
  ch->region = *region;
  ch->base = reinterpret_cast<uintptr_t>(region->vaddr);
  ch->iova = region->iova;
  ch->len = region->len;
  if (ch->len != len || (ch->base & 4095) != 0 || (ch->iova & 4095) != 0 ||
      ((ch->base ^ ch->iova) & (align_ - 1)) != 0) {
    backing_->release(*region);
    grow_failures_.fetch_add(1, std::memory_order_relaxed);
    return fail(Errc::internal,
                "pool '{}': {} gave a region vaddr {:#x} IOVA {:#x} len {} that cannot hold blocks of align {} "
                "(need len {}, page-aligned, vaddr and IOVA equal modulo the alignment)",
                name_, backing_->describe(), ch->base, ch->iova, ch->len, align_, len);
  }
  const uint64_t grid = boundary_ != 0 ? seg_mask_ + 1 : align_;
  ch->origin = ch->iova & (grid - 1);
  // First block at or after the origin on the grid; then every block that ends inside the chunk.
  auto grid_off = [this](uint64_t j) { return (j / per_seg_ << seg_shift_) + j % per_seg_ * size_; };
  const uint64_t seg0 = ch->origin >> seg_shift_;
  const uint64_t k0 = ((ch->origin & seg_mask_) + size_ - 1) / size_;
  ch->first = k0 < per_seg_ ? seg0 * per_seg_ + k0 : (seg0 + 1) * per_seg_;
  uint64_t n = 0;
  while (grid_off(ch->first + n) + size_ <= ch->origin + ch->len) ++n;
  ch->nblocks = static_cast<uint32_t>(n);
  ch->state = std::make_unique<std::atomic<uint8_t>[]>(n);  // value-initialised: all kFree
  if (debug_ & kPoison) std::memset(region->vaddr, kPoisonByte, len);

  stack_.reserve(stack_.size() + n);
  for (uint64_t i = n; i-- > 0;)  // lowest address on top
    stack_.push_back(Entry{ch.get(), static_cast<uint32_t>(grid_off(ch->first + i) - ch->origin),
                           static_cast<uint32_t>(i)});
  publish_chunk(ch.get());
  blocks_ += n;
  chunks_.push_back(std::move(ch));
  return ok();
}

void DmaPool::publish_chunk(Chunk* ch) {
  auto insert = [this](ChunkTable& t, Chunk* c) {
    for (uint64_t s = c->base >> chunk_shift_; s <= (c->base + c->len - 1) >> chunk_shift_; ++s) {
      const uint64_t key = s + 1;
      for (uint64_t i = key & t.mask;; i = (i + 1) & t.mask) {
        ChunkTable::Slot& slot = t.slots[i];
        const uint64_t k = slot.key.load(std::memory_order_relaxed);
        if (k == key) {  // a neighbour chunk shares this range: chunks are one range long, so at most two
          slot.b.store(c, std::memory_order_release);
          break;
        }
        if (k == 0) {
          slot.a.store(c, std::memory_order_relaxed);
          slot.key.store(key, std::memory_order_release);
          ++table_used_;
          break;
        }
      }
    }
  };
  ChunkTable* t = table_.load(std::memory_order_relaxed);
  // Each chunk adds at most two keys; keep the load factor at or below one half.
  if (t == nullptr || (table_used_ + 2) * 2 > t->mask + 1) {
    auto nt = std::make_unique<ChunkTable>();
    const uint64_t size = std::max<uint64_t>(16, std::bit_ceil((table_used_ + 2) * 4));
    nt->mask = size - 1;
    nt->slots = std::make_unique<ChunkTable::Slot[]>(size);
    table_used_ = 0;
    for (auto& old : chunks_) insert(*nt, old.get());
    insert(*nt, ch);
    table_.store(nt.get(), std::memory_order_release);
    tables_.push_back(std::move(nt));  // readers may still hold the old one
  } else {
    insert(*t, ch);
  }
}

// ---------------------------------------------------------------------------
// Debug options, fenced off the fast path by one test of debug_.

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
  std::lock_guard reg(registry().mu);
  for (const Cache* c : caches_) cached += c->count.load(std::memory_order_relaxed);
  std::lock_guard lock(mu_);
  s.blocks = blocks_;
  s.chunks = chunks_.size();
  const uint64_t free_blocks = stack_.size() + cached;
  s.active = blocks_ > free_blocks ? blocks_ - free_blocks : 0;
  s.validation_failures = validation_failures_.load(std::memory_order_relaxed);
  s.poison_failures = poison_failures_.load(std::memory_order_relaxed);
  s.grow_failures = grow_failures_.load(std::memory_order_relaxed);
  return s;
}

std::string format_pools(std::span<const PoolStats> pools) {
  std::string out = "poolinfo - 0.1\n";
  for (const PoolStats& p : pools)
    out += fmt::format("{:<25} {:>4} {:>4} {:>4} {:>2}  align={} boundary={} chunk_bytes={} "
                       "validation_failures={} poison_failures={} grow_failures={}\n",
                       p.name, p.active, p.blocks, p.size, p.chunks, p.align, p.boundary, p.chunk_bytes,
                       p.validation_failures, p.poison_failures, p.grow_failures);
  return out;
}

}  // namespace dmakit::pool
