// SlabTier: small buffers (at most buffer.slab_max bytes) carved from large
// slabs mapped once, so live small buffers cost no mapping entry each.
//
// Slabs. A slab is memory the allocator builds like a buffer and maps once:
// one memzone of 2 MiB hugepages of exactly its size where the EAL has them
// (one virtual run, one map call), else hugepage pages of the buffer
// allocator's sources (a map call per virtual run), else one run of
// anonymous memory. Its length grows with the tier:
// max(4 MiB, 2 x the bytes of all slabs), capped at 1 GiB, halved down to
// 2 MiB when that much cannot be had. Entries therefore grow with the log of
// slab memory: ~7 for 1 GiB, ~10 for 4 GiB.
//
// Blocks and classes. A slab is cut into 2 MiB blocks (2 MiB-aligned in
// IOVA). A block serves one size class at a time: powers of two from the
// smallest order (4 KiB) to slab_max, so every slot is naturally aligned in
// IOVA. A request takes the class max(len rounded up to a power of two,
// align). A block whose slots are all free goes back to its slab (one empty
// block per class is kept), so blocks move between classes; a slab whose
// blocks are all back is wholly free and is retired by retire_free() (trim,
// memory pressure, and before an allocation fails).
//
// Metadata out of band: block and slot state (an index stack of free slots,
// the owner record of each slot) lives in host memory apart from the DMA
// memory, which a device may overwrite whole.
//
// Threads and locks. Each class has a spin lock guarding its blocks' slot
// state, its list of blocks with free slots and its pool of Buffer records;
// the tier's mutex guards the slab list and the slabs' free blocks. The
// class lock is taken before the tier's and never across a call out (build,
// retire, memset).
//
// Thread caches. A thread keeps the slots it freed, with their records, in
// a magazine per class of at most 64 KiB (up to 256 KiB per class: 64 slots
// of 4 KiB, 4 of 64 KiB), and its next allocation of that class takes one
// back: an alloc+free pair then takes no lock and no atomic read-modify-
// write. A cached slot stays taken from its block (its slab stays mapped)
// but is not in use. A full magazine gives half back under one class lock.
// retire_free() (trim, pressure, before a failure) gives back the calling
// thread's caches and asks every other thread to give back its own at its
// next free; a thread's caches go back when it exits, so what other threads
// hold is bounded by the sum above per thread. Records are matched to
// caches by the tier's uid, never reused, so a Buffer freed after its tier
// is gone never reaches a cache (it takes the anchor's slow path). At most
// kSlabCacheSlots tiers have caches at once; the others work without.
//
// Double frees. Each slot records the record it was handed to; a free whose
// record is not the slot's owner is refused, on every path.
//
// Owns: the slabs (their memory records) and their metadata, the pooled
// Buffer records. Retiring a slab hands its memory record to the host.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "alloc_buffer/buffer_impl.hpp"
#include "base/error.hpp"

namespace dmakit::alloc_buffer {

inline constexpr uint64_t kSlabBlock = 2ull << 20;

// What the tier needs from its allocator: slab memory mapped read-write as
// one IOVA range (every chunk a multiple of kSlabBlock), and a way to give
// it back (the IOVA freed, the memory held until the flush).
class SlabHost {
 public:
  virtual Result<ImplPtr> build_slab(uint64_t len, uint64_t dma_limit) = 0;
  virtual void retire_slab(ImplPtr mem) = 0;

 protected:
  ~SlabHost() = default;
};

// Slab memory from 2 MiB hugepages, one memzone (one virtual run) per take
// of up to 1 GiB; Errc::unsupported when the EAL has no 2 MiB hugepages.
Result<std::unique_ptr<MemorySource>> make_hugepage_run_source();

struct SlabStats {
  uint64_t slabs = 0;
  uint64_t slab_bytes = 0;    // mapped for slabs
  uint64_t in_use_bytes = 0;  // slots handed out (class sizes)
  uint64_t free_bytes = 0;    // wholly free slabs, retirable
  uint64_t buffers_live = 0;  // slots handed out
  uint64_t grows = 0;         // slabs built
  uint64_t double_frees = 0;  // frees by a record that does not own its slot, refused
};

struct Slab;

// One 2 MiB block of a slab; serves one class while cls != kNoClass.
struct SlabBlock {
  static constexpr uint32_t kNoClass = ~0u;
  static constexpr uint32_t kMaxSlots = 512;  // 2 MiB / 4 KiB
  Slab* slab = nullptr;
  char* va = nullptr;
  uint64_t iova = 0;
  uint32_t cls = kNoClass;
  uint32_t slots = 0, used = 0, nfree = 0, bump = 0;  // bump: slots below it were handed out
  bool virgin = false;  // fresh zero memory, no slot handed out yet since the slab was built
  bool listed = false;  // in its class's list of blocks with free slots
  SlabBlock *prev = nullptr, *next = nullptr;
  // The record each slot is handed to; null while the slot is free or
  // cached. A free must bring the owner.
  std::array<Buffer::Impl*, kMaxSlots> owner{};
  // Stack of freed slot indices; in the block (1 KiB per 2 MiB) so that a
  // block taking a class allocates nothing.
  std::array<uint16_t, kMaxSlots> free_idx{};
};

class SlabTier;

inline constexpr uint32_t kSlabCacheSlots = 64;     // tiers with thread caches at once
inline constexpr uint64_t kSlabCacheMaxClass = 64 << 10;
inline constexpr uint64_t kSlabCacheBytes = 256 << 10;  // per class and thread
inline constexpr uint32_t kSlabMagazine = 64;       // slots per magazine, at most
inline constexpr int kSlabCachedClasses = 5;        // 4 KiB .. 64 KiB

// One thread's cache for one tier. Only its thread touches the magazines,
// except the tier's destructor and the thread's exit (registry lock held).
struct SlabCache {
  std::atomic<uint64_t> uid{0};  // the tier's uid while attached, else 0
  SlabTier* tier = nullptr;
  uint64_t gen = 0;              // the tier's drain request last honoured
  struct Magazine {
    std::atomic<uint32_t> n{0};  // written by its thread only; read by stats()
    uint32_t cap = 0;            // 0: the class is not cached
    std::array<Buffer::Impl*, kSlabMagazine> recs{};
  };
  std::array<Magazine, kSlabCachedClasses> mags;
};

namespace detail {
// This thread's caches by tier slot; slots it has not attached (and slot 0)
// point at an idle cache whose uid matches no tier.
extern __thread SlabCache* const* tl_slab_caches __attribute__((tls_model("initial-exec")));
}  // namespace detail

struct Slab {
  ImplPtr mem;
  uint64_t iova = 0, len = 0;
  std::vector<SlabBlock> blocks;
  std::vector<uint32_t> free_blocks;  // indices into blocks, not serving a class
  uint32_t used_blocks = 0;
};

class SlabTier {
 public:
  // Classes from `unit` to `max_class` (powers of two, max_class <= kSlabBlock).
  SlabTier(SlabHost& host, std::shared_ptr<Anchor> anchor, uint64_t unit, uint64_t max_class);
  ~SlabTier();
  SlabTier(const SlabTier&) = delete;
  SlabTier& operator=(const SlabTier&) = delete;

  // The class index for a request, or -1 when slabs do not serve it.
  int class_of(const BufferRequest& req) const {
    if (req.prot != iommu::kReadWrite) return -1;
    const uint64_t need = std::max({req.len, req.align, unit_});
    if (need > max_class_) return -1;
    return static_cast<int>(std::bit_width(need - 1)) - unit_shift_;
  }
  Result<ImplPtr> alloc(const BufferRequest& req, int cls);

  // Free fast path, budget: a TLS load, the uid, magazine, owner and drain
  // tests, three stores; no lock, no atomic read-modify-write. Takes the record of
  // a slab buffer (b->block set) into this thread's cache and returns true;
  // false sends the caller to free() under the anchor (no cache attached,
  // magazine full, a drain asked for, or a slot this record does not own).
  static bool free_to_cache(Buffer::Impl* b) noexcept {
    SlabCache* tc = detail::tl_slab_caches[b->cache_slot];
    if (tc->uid.load(std::memory_order_relaxed) != b->tier_uid) return false;
    SlabBlock* blk = b->block;
    const uint32_t cls = blk->cls;
    if (cls >= kSlabCachedClasses || b->slot >= SlabBlock::kMaxSlots) return false;
    SlabCache::Magazine& m = tc->mags[cls];
    const uint32_t n = m.n.load(std::memory_order_relaxed);
    if (n >= m.cap || blk->owner[b->slot] != b || tc->gen != tc->tier->drain_gen()) return false;
    blk->owner[b->slot] = nullptr;
    m.recs[n] = b;
    m.n.store(n + 1, std::memory_order_relaxed);
    return true;
  }

  // Takes back a slab buffer's record (b->block set). A slot the record does
  // not own is refused (logged, counted) and nothing changes.
  void free(ImplPtr b);
  // Returns the cached empty blocks to their slabs and retires every wholly
  // free slab through the host. Returns the bytes retired.
  uint64_t retire_free();
  SlabStats stats() const;
  uint64_t drain_gen() const { return drain_gen_.load(std::memory_order_relaxed); }

  // Before teardown, with no other thread using the tier: every thread's
  // cached slots back to their blocks, every cache detached.
  void close_caches() noexcept;
  // A thread's exit (registry lock held).
  void absorb_cache(SlabCache& c) noexcept;

 private:
  struct SpinLock {
    std::atomic<bool> held{false};
    void lock() {
      if (!held.exchange(true, std::memory_order_acquire)) [[likely]] return;
      lock_contended();
    }
    void lock_contended();
    void unlock() { held.store(false, std::memory_order_release); }
  };
  struct alignas(64) Class {
    SpinLock lock;
    uint64_t size = 0;
    uint32_t slots = 0;             // per block
    SlabBlock* head = nullptr;      // blocks with a free slot
    uint32_t empty = 0;             // listed blocks with no slot in use
    uint64_t live = 0;
    ImplPtr records;                // pooled Buffer records, chained through Impl::next
  };

  Result<ImplPtr> alloc_locked(const BufferRequest& req, int cls);
  Result<ImplPtr> alloc_slow(const BufferRequest& req, int cls);
  ImplPtr take_cached(Buffer::Impl* rec, const BufferRequest& req);
  SlabCache* own_cache() noexcept;
  void drain_cache(SlabCache& c) noexcept;
  void give_back_locked(Class& c, ImplPtr rec) noexcept;
  uint64_t cached_count(int cls) const;
  Result<SlabBlock*> take_block(uint64_t dma_limit);
  Result<std::unique_ptr<Slab>> grow(uint64_t want, uint64_t dma_limit);
  ImplPtr new_record() noexcept;
  static ImplPtr pop_record(Class& c);
  static void push_record(Class& c, ImplPtr rec);
  void return_block(SlabBlock* b);
  void refuse(ImplPtr rec);
  static uint32_t take_slot(Class& c, SlabBlock* b, bool& fresh);
  static void link(Class& c, SlabBlock* b);
  static void unlink(Class& c, SlabBlock* b);
  ImplPtr fill(ImplPtr rec, const BufferRequest& req, int cls, SlabBlock* b, uint32_t slot, bool fresh);
  std::unique_ptr<Slab> take_retirable();

  SlabHost& host_;
  std::shared_ptr<Anchor> anchor_;
  const uint64_t unit_;
  const int unit_shift_;
  const uint64_t max_class_;
  std::unique_ptr<Class[]> classes_;
  int nclasses_ = 0;

  // Thread caches: the registry slot (0: none) and the uid records carry.
  uint32_t cache_slot_ = 0;
  uint64_t uid_ = 0;
  std::atomic<uint64_t> drain_gen_{0};
  std::vector<SlabCache*> caches_;  // attached; registry lock

  mutable std::mutex mu_;  // slabs_, total_, Slab::free_blocks, Slab::used_blocks
  std::vector<std::unique_ptr<Slab>> slabs_;
  uint64_t total_ = 0;
  std::atomic<uint64_t> grows_{0}, double_frees_{0};
};

}  // namespace dmakit::alloc_buffer
