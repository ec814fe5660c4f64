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
// an allocated bit per slot) lives in host memory apart from the DMA memory,
// which a device may overwrite whole.
//
// Threads and locks. Each class has a spin lock guarding its blocks' slot
// state, its list of blocks with free slots and its pool of Buffer records;
// the tier's mutex guards the slab list and the slabs' free blocks. The
// class lock is taken before the tier's and never across a call out (build,
// retire, memset).
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
  uint64_t double_frees = 0;  // frees of a slot that was not allocated, refused
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
  std::array<uint64_t, kMaxSlots / 64> allocated{};
  // Stack of freed slot indices; in the block (1 KiB per 2 MiB) so that a
  // block taking a class allocates nothing.
  std::array<uint16_t, kMaxSlots> free_idx{};
};

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
  // Takes back a slab buffer's record (b->block set). A slot that is not
  // allocated is refused (logged, counted) and nothing changes.
  void free(ImplPtr b);
  // Returns the cached empty blocks to their slabs and retires every wholly
  // free slab through the host. Returns the bytes retired.
  uint64_t retire_free();
  SlabStats stats() const;

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

  Result<ImplPtr> alloc_slow(const BufferRequest& req, int cls);
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

  mutable std::mutex mu_;  // slabs_, total_, Slab::free_blocks, Slab::used_blocks
  std::vector<std::unique_ptr<Slab>> slabs_;
  uint64_t total_ = 0;
  std::atomic<uint64_t> grows_{0}, double_frees_{0};
};

}  // namespace dmakit::alloc_buffer
