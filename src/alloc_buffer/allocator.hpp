// Allocator: the one BufferAllocator, internal to src/alloc_buffer; the
// design is in buffer_allocator.hpp. It owns the memory sources, the slab
// tier, the recycled and flush-pending records, the zeroing and PSI threads
// and its flush listener registered with the arena; not the arena.
//
// Its parts, by file:
//   buffer_allocator.cpp  Buffer's methods, alloc (fast path,
//                         reclaim_and_retry), start/destruction, stats, the factory
//   builder.cpp           buffers and slabs built from the sources: order
//                         fallback (gather, gather_slab), IOVA, map_runs,
//                         give_back, enable_slabs
//   recycler.cpp          freed buffers: release, pop_recycled, trim and the
//                         shrinker's victims; retire, retire_slab, on_flushed
//   background.cpp        the zeroing thread (zero_loop, wait_prezeroed) and
//                         the memory-pressure thread (arm_psi, psi_loop)
//   slab.cpp              the slab tier, which calls back through SlabHost
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "alloc_buffer/buffer_allocator.hpp"
#include "alloc_buffer/buffer_impl.hpp"
#include "alloc_buffer/slab.hpp"

namespace dmakit::alloc_buffer {

// An intrusive LIFO list of records through Impl::next. Push and pop never
// allocate, so the free paths (Buffer destruction, trim, the flush report)
// always have somewhere to put a record, out of host memory or not.
class Chain {
 public:
  using Ptr = std::unique_ptr<Buffer::Impl>;
  Chain() = default;
  Chain(Chain&&) noexcept = default;
  Chain& operator=(Chain&& o) noexcept {
    clear();
    head_ = std::move(o.head_);
    return *this;
  }
  ~Chain() { clear(); }

  bool empty() const { return head_ == nullptr; }
  void push(Ptr b) {
    b->next = std::move(head_);
    head_ = std::move(b);
  }
  Ptr pop() {
    Ptr b = std::move(head_);
    if (b != nullptr) head_ = std::move(b->next);
    return b;
  }
  // Unlinks the most recent record that satisfies `pred`; null if none.
  template <class Pred>
  Ptr take_if(Pred&& pred) {
    for (Ptr* link = &head_; *link != nullptr; link = &(*link)->next) {
      if (!pred(**link)) continue;
      Ptr b = std::move(*link);
      *link = std::move(b->next);
      return b;
    }
    return nullptr;
  }
  size_t size() const {
    size_t n = 0;
    for (const Buffer::Impl* b = head_.get(); b != nullptr; b = b->next.get()) ++n;
    return n;
  }

 private:
  // One record at a time: a long chain must not recurse in its destructor.
  void clear() {
    while (pop() != nullptr) {
    }
  }
  Ptr head_;
};

// Appends to a message or an account of a request's orders. Out of host
// memory the text is shorter; the request goes on.
template <class Text>
inline void note(std::string& out, Text&& text) noexcept {
  try {
    out += text();
  } catch (const std::bad_alloc&) {
  }
}

class Allocator final : public BufferAllocator, public SlabHost {
 public:
  struct Order {
    uint64_t size = 0;
    MemorySource* src = nullptr;
    std::atomic<int64_t> retry_at{0};  // steady ns; the order is skipped before this
  };

  Allocator(iommu::IovaArena& arena, const BufferSettings& s,
            std::vector<std::unique_ptr<MemorySource>> sources, std::vector<std::pair<uint64_t, MemorySource*>> orders);

  ~Allocator() override;

  // Registers the flush listener and starts the threads (a thread that
  // cannot start is done without); fails only for the listener.
  Status start(bool psi);
  // Serves requests up to slab_max from slabs (not in isolation mode, and
  // only when a source can give slab memory: 2 MiB pages or runs). `runs`:
  // a source of whole hugepage runs tried first for each slab, or null.
  void enable_slabs(uint64_t slab_max, std::unique_ptr<MemorySource> runs);

  Result<Buffer> alloc(const BufferRequest& req) override;
  void trim(bool all) override;
  BufferStats stats() const override;
  iommu::IovaArena& arena() override { return arena_; }
  std::vector<uint64_t> orders() const override {
    std::vector<uint64_t> v;
    for (const auto& o : orders_) v.push_back(o.size);
    return v;
  }
  std::vector<const MemorySource*> sources() const override {
    std::vector<const MemorySource*> v;
    for (const auto& s : sources_) v.push_back(s.get());
    return v;
  }
  bool wait_prezeroed(std::chrono::milliseconds timeout) override;

  // From Buffer's destructor, which hands over its record.
  void release(std::unique_ptr<Buffer::Impl> b);
  // From the arena's flush, through the listener start() registered.
  void on_flushed(std::span<const iommu::IovaSpan> ranges);

 private:
  using Impl = Buffer::Impl;
  struct SizeClass {
    Chain clean, dirty;  // LIFO: the most recently freed is warmest
  };

  ImplPtr pop_recycled(uint64_t span_len, const BufferRequest& req);
  Result<ImplPtr> build(const BufferRequest& req, uint64_t span_len);
  Result<Buffer> reclaim_and_retry(const BufferRequest& req, uint64_t span_len, int slab_class, Error first);
  Result<Buffer> alloc_once(const BufferRequest& req, uint64_t span_len, int slab_class);
  Status gather(Impl& b, uint64_t need);
  Status gather_slab(Impl& b, uint64_t need);
  Result<ImplPtr> build_slab(uint64_t len, uint64_t dma_limit) override;
  void retire_slab(ImplPtr mem) override;
  Status map_runs(ImplPtr& owned);
  void give_back(Impl& b);
  void retire(ImplPtr b);
  Chain collect_victims(uint64_t target);
  // An empty size class that the zeroing thread will not file a record
  // into, so it may be erased. Under mu_.
  bool idle(const std::map<uint64_t, SizeClass>::iterator& it) const;
  void zero_loop();
  void arm_psi();
  void psi_loop(int psi_fd);
  static void zero_memory(Impl& b);

  iommu::IovaArena& arena_;
  iommu::Domain& domain_;
  std::vector<std::unique_ptr<MemorySource>> sources_;
  std::vector<Order> orders_;
  const int64_t backoff_ns_;
  const uint64_t high_;
  const bool prezero_;
  const bool isolation_;  // no slabs, no recycling: a freed buffer's memory waits for the flush
  std::shared_ptr<Anchor> anchor_;
  std::unique_ptr<SlabTier> slab_;  // null: every buffer has its own mapping
  MemorySource* slab_runs_ = nullptr;  // in sources_; slab memory as one hugepage run

  // Guarded by mu_. Every Impl not handed out as a Buffer is owned by exactly
  // one of classes_, pending_, lost_ or zeroing_, or by a local moving it
  // between them outside the lock. Records left in pending_ or lost_ when
  // the allocator dies are freed with it; their memory stays in place.
  mutable std::mutex mu_;
  std::condition_variable work_cv_;   // zeroing thread: dirty work or stop
  std::condition_variable idle_cv_;   // trim/wait_prezeroed: zeroing finished
  std::map<uint64_t, SizeClass> classes_;
  std::map<uint64_t, ImplPtr> pending_;  // by IOVA: retired, waiting for the flush (disjoint)
  Chain pending_spill_;                 // the same, when pending_ had no memory for a node
  Chain lost_;                          // IOVA could not be freed: memory kept forever
  uint64_t live_ = 0, live_bytes_ = 0;
  uint64_t recycled_bytes_ = 0, clean_bytes_ = 0, dirty_bytes_ = 0, pending_bytes_ = 0;
  ImplPtr zeroing_;  // the buffer the zeroing thread is clearing, outside the lock
  uint32_t hold_zeroing_ = 0;
  bool stopping_ = false;

  // Statistics, updated without the lock.
  std::atomic<uint64_t> attempts_{0}, fallbacks_{0}, skips_{0}, map_calls_{0};
  std::atomic<uint64_t> fresh_{0}, hits_{0}, memsets_{0}, shrinks_{0}, psi_events_{0}, reclaims_{0};
  std::atomic<bool> psi_armed_{false};

  std::thread zero_thread_, psi_thread_;
  int stop_fd_ = -1;  // eventfd that wakes the PSI thread for shutdown
  iommu::IovaArena::ListenerId listener_ = 0;  // 0: not registered
};

}  // namespace dmakit::alloc_buffer
