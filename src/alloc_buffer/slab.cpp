// SlabTier implementation; the design is in slab.hpp.
#include "alloc_buffer/slab.hpp"

#include <bit>
#include <cstring>
#include <thread>

#include "base/log.hpp"

namespace dmakit::alloc_buffer {

namespace {

constexpr uint64_t kFirstSlab = 4ull << 20;
constexpr uint64_t kMaxSlab = 1ull << 30;

}  // namespace

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
}

SlabTier::~SlabTier() {
  // Called with no Buffer able to reach the tier (the anchor is cleared).
  // Slabs with slots in use keep their memory and mapping: a device may
  // still use them; only their records go.
  uint64_t live = 0;
  for (int i = 0; i < nclasses_; ++i) live += classes_[i].live;
  if (live != 0)
    base::log().warn("buffer slabs: {} slab buffers live at teardown; their slabs' memory and mappings are left "
                     "in place",
                     live);
  for (auto& s : slabs_) (void)s->mem.release();
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
  b->allocated[i / 64] |= 1ull << (i % 64);
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
  if (rec == nullptr) {
    rec = std::make_unique<Buffer::Impl>();  // only while the record pool grows
    rec->anchor = anchor_;
    rec->chunks.resize(1);
    rec->contiguous = true;
    rec->prot = iommu::kReadWrite;
  }
  char* va = b->va + uint64_t{slot} * size;
  const uint64_t iova = b->iova + uint64_t{slot} * size;
  rec->size = req.len;
  rec->span = iommu::IovaSpan{iova, size};
  rec->chunks[0] = BufferChunk{va, iova, size, size, "slab"};
  rec->block = b;
  rec->slot = slot;
  rec->zero = fresh;
  if (req.zeroed && !fresh) {
    std::memset(va, 0, size);
    rec->zero = true;
  }
  return rec;
}

// Fast path, budget: one uncontended spin lock, a list-head test and a
// dozen loads and stores of block state, no syscall, no ioctl, no heap
// allocation (the record comes from the class's pool); plus a memset of
// the slot for a zeroed request on reused memory. Everything else - no
// block with a free slot under the request's dma_limit - is alloc_slow.
Result<ImplPtr> SlabTier::alloc(const BufferRequest& req, int cls) {
  Class& c = classes_[cls];
  c.lock.lock();
  SlabBlock* b = c.head;
  while (b != nullptr && b->iova + kSlabBlock - 1 > req.dma_limit) b = b->next;
  if (b == nullptr) [[unlikely]] {
    c.lock.unlock();
    return alloc_slow(req, cls);
  }
  bool fresh = false;
  const uint32_t slot = take_slot(c, b, fresh);
  ImplPtr rec;
  if (!c.records.empty()) {
    rec = std::move(c.records.back());
    c.records.pop_back();
  }
  c.lock.unlock();
  return fill(std::move(rec), req, cls, b, slot, fresh);
}

// A block for the class: a free block of a slab under dma_limit, else a new
// slab. Then the slot is taken as on the fast path.
[[gnu::cold, gnu::noinline]] Result<ImplPtr> SlabTier::alloc_slow(const BufferRequest& req, int cls) {
  Class& c = classes_[cls];
  SlabBlock* b = DMAKIT_TRY(take_block(req.dma_limit));
  b->cls = static_cast<uint32_t>(cls);
  b->slots = c.slots;
  b->used = b->nfree = b->bump = 0;
  b->allocated.fill(0);
  if (b->free_idx == nullptr) b->free_idx = std::make_unique<uint16_t[]>(SlabBlock::kMaxSlots);
  c.lock.lock();
  link(c, b);
  ++c.empty;
  bool fresh = false;
  const uint32_t slot = take_slot(c, b, fresh);
  ImplPtr rec;
  if (!c.records.empty()) {
    rec = std::move(c.records.back());
    c.records.pop_back();
  }
  c.lock.unlock();
  return fill(std::move(rec), req, cls, b, slot, fresh);
}

Result<SlabBlock*> SlabTier::take_block(uint64_t dma_limit) {
  auto from_slabs = [&]() -> SlabBlock* {
    for (auto& s : slabs_) {
      for (size_t k = s->free_blocks.size(); k-- > 0;) {
        SlabBlock& b = s->blocks[s->free_blocks[k]];
        if (b.iova + kSlabBlock - 1 > dma_limit) continue;
        s->free_blocks.erase(s->free_blocks.begin() + static_cast<ptrdiff_t>(k));
        ++s->used_blocks;
        return &b;
      }
    }
    return nullptr;
  };
  uint64_t want = 0;
  {
    std::lock_guard lock(mu_);
    if (SlabBlock* b = from_slabs()) return b;
    want = std::clamp(2 * total_, kFirstSlab, kMaxSlab);
  }
  // A new slab, outside the lock (it maps). Smaller ones when the size
  // wanted cannot be had, down to one block.
  Result<ImplPtr> mem = fail(Errc::no_memory, "no slab built");
  for (uint64_t len = want; len >= kSlabBlock; len /= 2) {
    mem = host_.build_slab(len, dma_limit);
    // Out of memory, of entries, or of IOVA space (under a dma_limit a
    // large slab may never fit where a smaller one does): try smaller.
    if (mem || (mem.error().code != Errc::no_memory && mem.error().code != Errc::no_space &&
                mem.error().code != Errc::invalid_argument))
      break;
  }
  if (!mem) return std::unexpected(with_context(std::move(mem).error(), "slab for small buffers"));
  grows_.fetch_add(1, std::memory_order_relaxed);
  auto s = std::make_unique<Slab>();
  s->iova = (*mem)->span.iova;
  s->len = (*mem)->span.len;
  s->blocks.resize(s->len / kSlabBlock);
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
  // Block 0 is this caller's; the others wait in the free list, lowest
  // IOVA on top.
  for (size_t i = s->blocks.size(); i-- > 1;) s->free_blocks.push_back(static_cast<uint32_t>(i));
  s->used_blocks = 1;
  SlabBlock* mine = &s->blocks[0];
  std::lock_guard lock(mu_);
  total_ += s->len;
  slabs_.push_back(std::move(s));
  return mine;
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

// Fast path, the same budget as alloc: one spin lock, the slot's bit
// checked and cleared (a slot that is not allocated is refused, so two
// frees of one slot never make two owners), its index pushed, the record
// pooled. Only a block turning wholly free, with another empty block
// already kept for the class, goes back to its slab (the tier's mutex).
void SlabTier::free(ImplPtr rec) {
  SlabBlock* b = rec->block;
  const uint32_t i = rec->slot;
  const uint32_t cls = b->cls;  // stable while this slot is allocated; checked below when it is not
  if (cls >= static_cast<uint32_t>(nclasses_) || i >= SlabBlock::kMaxSlots) [[unlikely]] {
    refuse(std::move(rec));
    return;
  }
  Class& c = classes_[cls];
  SlabBlock* spare = nullptr;
  c.lock.lock();
  const uint64_t bit = 1ull << (i % 64);
  if (b->cls != cls || (b->allocated[i / 64] & bit) == 0) [[unlikely]] {
    c.lock.unlock();
    refuse(std::move(rec));
    return;
  }
  b->allocated[i / 64] &= ~bit;
  b->free_idx[b->nfree++] = static_cast<uint16_t>(i);
  if (!b->listed) link(c, b);
  --c.live;
  if (--b->used == 0 && ++c.empty > 1) {
    unlink(c, b);
    --c.empty;
    spare = b;
  }
  rec->block = nullptr;
  c.records.push_back(std::move(rec));  // grows only past the peak of live buffers
  c.lock.unlock();
  if (spare != nullptr) [[unlikely]] return_block(spare);
}

// A free of a slot that is not allocated: counted, logged, nothing changed.
// The record is left alone (never freed): another owner may hold it.
[[gnu::cold, gnu::noinline]] void SlabTier::refuse(ImplPtr rec) {
  double_frees_.fetch_add(1, std::memory_order_relaxed);
  base::log().error("buffer slabs: free of slot {} at IOVA {:#x}, which is not allocated; refused", rec->slot,
                    rec->span.iova);
  (void)rec.release();
}

uint64_t SlabTier::retire_free() {
  for (int i = 0; i < nclasses_; ++i) {
    Class& c = classes_[i];
    std::vector<SlabBlock*> empty;
    c.lock.lock();
    for (SlabBlock* b = c.head; b != nullptr;) {
      SlabBlock* next = b->next;
      if (b->used == 0) {
        unlink(c, b);
        empty.push_back(b);
      }
      b = next;
    }
    c.empty = 0;
    c.lock.unlock();
    for (SlabBlock* b : empty) return_block(b);
  }
  std::vector<std::unique_ptr<Slab>> done;
  {
    std::lock_guard lock(mu_);
    for (auto it = slabs_.begin(); it != slabs_.end();) {
      if ((*it)->used_blocks == 0) {
        total_ -= (*it)->len;
        done.push_back(std::move(*it));
        it = slabs_.erase(it);
      } else {
        ++it;
      }
    }
  }
  uint64_t bytes = 0;
  for (auto& s : done) {
    bytes += s->len;
    host_.retire_slab(std::move(s->mem));
  }
  return bytes;
}

SlabStats SlabTier::stats() const {
  SlabStats st;
  for (int i = 0; i < nclasses_; ++i) {
    Class& c = classes_[i];
    c.lock.lock();
    st.buffers_live += c.live;
    st.in_use_bytes += c.live * c.size;
    c.lock.unlock();
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
