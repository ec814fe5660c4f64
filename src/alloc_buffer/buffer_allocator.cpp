// BufferAllocator implementation; the design is in buffer_allocator.hpp.
#include "alloc_buffer/buffer_allocator.hpp"
#include "alloc_buffer/buffer_impl.hpp"
#include "alloc_buffer/slab.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <sstream>
#include <system_error>
#include <thread>
#include <unordered_map>

#include "alloc_buffer/host_memory.hpp"
#include "base/clock.hpp"
#include "base/config.hpp"
#include "base/eal.hpp"
#include "base/fault_inject.hpp"
#include "base/log.hpp"

namespace dmakit::alloc_buffer {

class Allocator;

namespace {

int64_t steady_ns() { return base::mono_now_ns(); }

}  // namespace


namespace {

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

}  // namespace

// ---------------------------------------------------------------------------
// Buffer accessors: the chunk list is in IOVA order, so a byte offset finds
// its chunk by binary search on the IOVA.

// Out of line, where Impl is complete, as unique_ptr<Impl> requires.
Buffer::Buffer() noexcept = default;
Buffer::Buffer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Buffer::Buffer(Buffer&& o) noexcept = default;

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    Buffer old(std::move(*this));  // returns the previous buffer to its allocator
    impl_ = std::move(o.impl_);
  }
  return *this;
}

uint64_t Buffer::iova() const { return impl_->span.iova; }
uint64_t Buffer::size() const { return impl_->size; }
uint64_t Buffer::span() const { return impl_->span.len; }
std::span<const BufferChunk> Buffer::chunks() const { return impl_->chunks; }
void* Buffer::vaddr() const { return impl_->chunks.front().vaddr; }
bool Buffer::virtually_contiguous() const { return impl_->contiguous; }
uint32_t Buffer::mappings() const { return impl_->mappings; }
uint32_t Buffer::attempts() const { return impl_->attempts; }
bool Buffer::recycled() const { return impl_->recycled; }
bool Buffer::from_slab() const { return impl_->block != nullptr; }

void* Buffer::at(uint64_t offset) const {
  if (impl_ == nullptr || offset >= impl_->size) return nullptr;
  const uint64_t iova = impl_->span.iova + offset;
  auto& cs = impl_->chunks;
  auto it = std::upper_bound(cs.begin(), cs.end(), iova, [](uint64_t v, const BufferChunk& c) { return v < c.iova; });
  --it;  // chunks start at span.iova, so one precedes any offset inside
  return static_cast<char*>(it->vaddr) + (iova - it->iova);
}

Result<uint64_t> Buffer::iova_of(const void* p) const {
  if (impl_ == nullptr) return fail(Errc::invalid_argument, "iova_of({}): empty buffer", p);
  auto a = reinterpret_cast<uintptr_t>(p);
  for (const BufferChunk& c : impl_->chunks) {
    auto base = reinterpret_cast<uintptr_t>(c.vaddr);
    if (a >= base && a - base < c.len) {
      uint64_t iova = c.iova + (a - base);
      if (iova - impl_->span.iova >= impl_->size) break;  // in the rounding tail
      return iova;
    }
  }
  return fail(Errc::invalid_argument, "iova_of({}): not inside the buffer of {} bytes at IOVA {:#x}", p,
              impl_->size, impl_->span.iova);
}

// ---------------------------------------------------------------------------

class Allocator final : public BufferAllocator, public SlabHost {
 public:
  struct Order {
    uint64_t size = 0;
    MemorySource* src = nullptr;
    std::atomic<int64_t> retry_at{0};  // steady ns; the order is skipped before this
  };

  Allocator(iommu::IovaArena& arena, const BufferSettings& s,
            std::vector<std::unique_ptr<MemorySource>> sources, std::vector<std::pair<uint64_t, MemorySource*>> orders)
      : arena_(arena),
        domain_(arena.domain()),
        sources_(std::move(sources)),
        orders_(orders.size()),
        backoff_ns_(int64_t{s.backoff_ms} * 1000000),
        high_(s.recycle_high_mb << 20),
        prezero_(s.prezero),
        isolation_(s.isolation),
        anchor_(std::make_shared<Anchor>()) {
    for (size_t i = 0; i < orders.size(); ++i) {
      orders_[i].size = orders[i].first;
      orders_[i].src = orders[i].second;
    }
    anchor_->owner = this;
  }

  ~Allocator() override;

  // Starts the threads and joins the arena's flush listener.
  void start(bool psi);
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
  // From the arena, through the listener hub.
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
  bool subscribed_ = false;
};

// ---------------------------------------------------------------------------
// The arena has one flush listener; this hub lets several allocators share
// an arena. The hub's lock is held while a subscriber runs, so an allocator
// that unsubscribes is never called afterwards.

namespace {

struct Hub {
  std::mutex mu;
  std::unordered_map<iommu::IovaArena*, std::vector<Allocator*>> subs;
};

Hub& hub() {
  static Hub h;
  return h;
}

void subscribe(iommu::IovaArena& arena, Allocator* a) {
  bool first = false;
  {
    std::lock_guard lock(hub().mu);
    auto& v = hub().subs[&arena];
    first = v.empty();
    v.push_back(a);
  }
  // Outside the hub lock: the arena may hold its own lock while it calls out.
  if (first)
    (void)arena.add_flush_listener([key = &arena](std::span<const iommu::IovaSpan> ranges) {
      std::lock_guard lock(hub().mu);
      auto it = hub().subs.find(key);
      if (it == hub().subs.end()) return;
      for (Allocator* s : it->second) s->on_flushed(ranges);
    });
}

void unsubscribe(iommu::IovaArena& arena, Allocator* a) {
  std::lock_guard lock(hub().mu);
  auto it = hub().subs.find(&arena);
  if (it == hub().subs.end()) return;
  std::erase(it->second, a);
  // The dispatcher stays installed; with no subscribers it does nothing.
  if (it->second.empty()) hub().subs.erase(it);
}

}  // namespace

Buffer::~Buffer() {
  if (impl_ == nullptr) return;
  // A slab buffer goes to this thread's slab cache without the anchor: a
  // cache attached to its tier proves the tier is alive.
  if (impl_->block != nullptr && SlabTier::free_to_cache(impl_.get())) [[likely]] {
    (void)impl_.release();
    return;
  }
  // The record keeps the anchor alive while the lock is held.
  Anchor* anchor = impl_->anchor.get();
  std::shared_lock lock(anchor->mu);
  // Without an owner the allocator is gone: the memory stays where it is,
  // because a device may still use it (the destructor reported it). Only
  // the record dies, with impl_; it frees no memory and unmaps nothing.
  if (anchor->owner != nullptr) anchor->owner->release(std::move(impl_));
}

// ---------------------------------------------------------------------------
// Allocation. Fast path: pop a recycled buffer of the same span (clean first
// for zeroed requests); else build one from the sources (slow path).

Result<Buffer> Allocator::alloc(const BufferRequest& req) {
  const uint64_t unit = orders_.back().size;
  if (req.len == 0) return fail(Errc::invalid_argument, "buffer of 0 bytes requested");
  if (req.len > ~0ull - unit) return fail(Errc::invalid_argument, "buffer of {} bytes: size overflows", req.len);
  if (req.align == 0 || (req.align & (req.align - 1)) != 0)
    return fail(Errc::invalid_argument, "buffer of {} bytes: alignment {} is not a power of two", req.len,
                req.align);
  if ((req.prot & iommu::kReadWrite) == 0 || (req.prot & ~uint32_t{iommu::kReadWrite}) != 0)
    return fail(Errc::invalid_argument, "buffer of {} bytes: prot {:#x} is not read and/or write", req.len,
                req.prot);
  const uint64_t span_len = (req.len + unit - 1) & ~(unit - 1);
  const int slab_class = slab_ != nullptr ? slab_->class_of(req) : -1;
  if (slab_class >= 0) [[likely]] {
    auto b = slab_->alloc(req, slab_class);
    if (b) [[likely]] return Buffer(std::move(*b));
    return reclaim_and_retry(req, span_len, slab_class, std::move(b).error());
  }
  auto once = alloc_once(req, span_len, slab_class);
  if (!once) [[unlikely]] return reclaim_and_retry(req, span_len, slab_class, std::move(once).error());
  return once;
}

Result<Buffer> Allocator::alloc_once(const BufferRequest& req, uint64_t span_len, int slab_class) {
  if (slab_class >= 0) {
    auto b = slab_->alloc(req, slab_class);
    if (!b) return std::unexpected(std::move(b).error());
    return Buffer(std::move(*b));
  }
  if (ImplPtr b = pop_recycled(span_len, req)) {
    if (req.zeroed && !b->zero) {
      memsets_.fetch_add(1, std::memory_order_relaxed);
      zero_memory(*b);
    }
    hits_.fetch_add(1, std::memory_order_relaxed);
    return Buffer(std::move(b));
  }
  auto built = build(req, span_len);
  if (!built) return std::unexpected(std::move(built).error());
  return Buffer(std::move(*built));
}

namespace {

// Appends to a message or an account of a request's orders. Out of host
// memory the text is shorter; the request goes on.
template <class Text>
void note(std::string& out, Text&& text) noexcept {
  try {
    out += text();
  } catch (const std::bad_alloc&) {
  }
}

}  // namespace

// An allocation failed for lack of IOVA space, mapping entries or memory:
// recycled buffers and wholly free slabs may be holding exactly what is
// missing (their IOVA ranges, their mappings, their memory). They are
// retired and the arena flushed, once, before the request is refused -
// recycling never turns into a failure. The refusal counts live, recycled,
// slab-free and flush-pending memory apart.
[[gnu::cold, gnu::noinline]] Result<Buffer> Allocator::reclaim_and_retry(const BufferRequest& req,
                                                                          uint64_t span_len, int slab_class,
                                                                          Error first) {
  const bool reclaimable = first.code == Errc::no_space || first.code == Errc::no_memory;
  if (!reclaimable) return std::unexpected(std::move(first));
  bool held = false;
  {
    std::lock_guard lock(mu_);
    held = recycled_bytes_ != 0 || pending_bytes_ != 0 || zeroing_ != nullptr;
  }
  if (slab_ != nullptr) {
    const SlabStats ss = slab_->stats();
    // Cached empty blocks count too: retire_free gives them back first.
    held = held || ss.free_bytes != 0 || ss.in_use_bytes < ss.slab_bytes;
  }
  const uint64_t stale_before = arena_.stats().stale_pages;
  if (held || stale_before != 0) {
    reclaims_.fetch_add(1, std::memory_order_relaxed);
    trim(true);
    auto again = alloc_once(req, span_len, slab_class);
    if (again) return again;
    first = std::move(again).error();
    if (first.code != Errc::no_space && first.code != Errc::no_memory) return std::unexpected(std::move(first));
  }
  uint64_t live = 0, live_bytes = 0, recycled = 0, pending = 0;
  {
    std::lock_guard lock(mu_);
    live = live_;
    live_bytes = live_bytes_;
    recycled = recycled_bytes_;
    pending = pending_bytes_;
  }
  SlabStats ss;
  if (slab_ != nullptr) ss = slab_->stats();
  // Out of host memory the refusal goes without the account.
  note(first.message, [&] {
    return fmt::format(
        "; {} live buffers hold {} bytes ({} slab buffers {} bytes), recycled {} bytes, slab memory free {} of {} "
        "bytes, waiting for the flush {} bytes{}",
        live + ss.buffers_live, live_bytes + ss.in_use_bytes, ss.buffers_live, ss.in_use_bytes, recycled,
        ss.slab_bytes - ss.in_use_bytes, ss.slab_bytes, pending,
        held || stale_before != 0 ? " (after retiring the recycled memory and free slabs)" : "");
  });
  return std::unexpected(std::move(first));
}

ImplPtr Allocator::pop_recycled(uint64_t span_len, const BufferRequest& req) {
  std::lock_guard lock(mu_);
  auto it = classes_.find(span_len);
  if (it == classes_.end()) return nullptr;
  auto fits = [&](const Impl& b) {
    return b.prot == req.prot && b.span.end() - 1 <= req.dma_limit && (b.span.iova & (req.align - 1)) == 0;
  };
  auto take = [&](Chain& list, uint64_t& bytes) -> ImplPtr {
    ImplPtr b = list.take_if(fits);
    if (b != nullptr) bytes -= b->span.len;
    return b;
  };
  // Zeroed requests want clean buffers; others leave those for them.
  ImplPtr b = req.zeroed ? take(it->second.clean, clean_bytes_) : take(it->second.dirty, dirty_bytes_);
  if (b == nullptr) b = req.zeroed ? take(it->second.dirty, dirty_bytes_) : take(it->second.clean, clean_bytes_);
  if (b == nullptr) return nullptr;
  if (idle(it)) classes_.erase(it);
  recycled_bytes_ -= b->span.len;
  ++live_;
  live_bytes_ += b->span.len;
  b->recycled = true;
  b->attempts = 0;
  b->size = req.len;
  return b;
}

// Slow path: chunks by order fallback, one IOVA range, one map per run.
// Whatever fails, everything taken so far is given back.
Result<ImplPtr> Allocator::build(const BufferRequest& req, uint64_t span_len) {
  ImplPtr b;
  try {
    b = std::make_unique<Impl>();
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_memory, "buffer of {} bytes: out of host memory for its record", req.len);
  }
  b->anchor = anchor_;
  b->size = req.len;
  b->prot = req.prot;
  // Mapping pins every byte (RLIMIT_MEMLOCK): refused before anything is taken.
  // (admit_pin reads /proc and names the buffer: it allocates, and counts only as its last step.)
  Status pin = ok();
  try {
    pin = HostMemoryGuard::process().admit_pin(span_len, fmt::format("buffer of {} bytes", req.len));
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_memory, "buffer of {} bytes: out of host memory checking RLIMIT_MEMLOCK", req.len);
  }
  DMAKIT_TRY(std::move(pin));
  b->pinned = span_len;
  if (auto st = gather(*b, span_len); !st) return std::unexpected(st.error());

  // Largest chunk first: each chunk's offset is then a multiple of its size.
  const uint64_t align = std::max(b->chunks.front().order, req.align);
  auto span = arena_.alloc(iommu::IovaRequest{span_len, align, req.dma_limit});
  if (!span) {
    give_back(*b);
    return std::unexpected(with_context(std::move(span).error(),
                                        fmt::format("buffer of {} bytes: IOVA range of {} aligned to {}", req.len,
                                                    span_len, size_name(align))));
  }
  b->span = *span;
  uint64_t off = 0;
  for (BufferChunk& c : b->chunks) {
    c.iova = b->span.iova + off;
    off += c.len;
  }
  if (auto st = map_runs(b); !st) {
    return std::unexpected(with_context(st.error(), fmt::format("buffer of {} bytes", req.len)));
  }

  if (req.zeroed && !b->zero) {
    for (size_t i = 0; i < b->chunks.size(); ++i)
      if (!b->from[i]->fresh_zero()) std::memset(b->chunks[i].vaddr, 0, b->chunks[i].len);
    b->zero = true;
  }
  fresh_.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard lock(mu_);
  ++live_;
  live_bytes_ += span_len;
  return b;
}

namespace {

// Room for one more chunk in b's lists, so the push that follows cannot
// throw; false out of host memory.
bool reserve_chunk(Buffer::Impl& b) noexcept {
  try {
    b.chunks.reserve(b.chunks.size() + 1);
    b.from.reserve(b.chunks.size() + 1);
    return true;
  } catch (const std::bad_alloc&) {
    return false;
  }
}

}  // namespace

// Slab memory: every chunk a multiple of kSlabBlock, so no 2 MiB block
// straddles two chunks. Orders of 2 MiB and up (hugepages) first, then the
// smallest order's source when it serves runs (anonymous memory) - one
// take for the rest. On failure nothing stays taken.
Status Allocator::gather_slab(Impl& b, uint64_t need) {
  if (slab_runs_ != nullptr && need <= slab_runs_->max_run()) {
    ++b.attempts;
    attempts_.fetch_add(1, std::memory_order_relaxed);
    if (auto p = slab_runs_->take(need)) {
      if (!reserve_chunk(b)) {
        slab_runs_->give(*p, need);
        give_back(b);  // the pin admitted for the slab
        return fail(Errc::no_memory, "slab of {} bytes: out of host memory for its chunk list", need);
      }
      b.chunks.push_back(BufferChunk{*p, 0, need, kSlabBlock, slab_runs_->name()});
      b.from.push_back(slab_runs_);
      return ok();
    }
  }
  uint64_t remaining = need;
  const int64_t now = steady_ns();
  std::string tried;
  for (size_t i = 0; i < orders_.size() && remaining != 0; ++i) {
    Order& o = orders_[i];
    const bool last = i + 1 == orders_.size();
    const bool huge = o.size >= kSlabBlock && o.size <= remaining;
    const bool runs = last && o.src->max_run() >= kSlabBlock;
    if (!huge && !runs) continue;
    if (!last && o.retry_at.load(std::memory_order_relaxed) > now) {
      skips_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    while (remaining != 0) {
      const uint64_t want = std::min(remaining & ~(std::max(o.size, kSlabBlock) - 1),
                                     o.src->max_run() & ~(kSlabBlock - 1));
      if (want == 0) break;
      ++b.attempts;
      attempts_.fetch_add(1, std::memory_order_relaxed);
      auto p = o.src->take(want);
      if (!p) {
        if (!last) {
          o.retry_at.store(now + backoff_ns_, std::memory_order_relaxed);
          fallbacks_.fetch_add(1, std::memory_order_relaxed);
        }
        note(tried, [&] { return fmt::format("{}: {}; ", size_name(o.size), p.error().what()); });
        break;
      }
      if (!reserve_chunk(b)) {
        o.src->give(*p, want);
        give_back(b);
        return fail(Errc::no_memory, "slab of {} bytes: out of host memory for its chunk list", need);
      }
      b.chunks.push_back(BufferChunk{*p, 0, want, o.size, o.src->name()});  // reserved: no allocation
      b.from.push_back(o.src);
      remaining -= want;
    }
  }
  if (remaining != 0) {
    give_back(b);
    if (!tried.empty()) tried.resize(tried.size() - 2);
    return fail(Errc::no_memory, "slab of {} bytes: out of memory with {} bytes still needed{}{}", need, remaining,
                tried.empty() ? "" : "; ", tried);
  }
  return ok();
}

// A slab: built like a buffer, but from gather_slab, read-write, on an IOVA
// aligned to at least a block, and not counted as a live buffer.
Result<ImplPtr> Allocator::build_slab(uint64_t len, uint64_t dma_limit) {
  ImplPtr b;
  Status pin = ok();
  try {
    b = std::make_unique<Impl>();
    // Mapping pins every byte of the slab (RLIMIT_MEMLOCK), as for a buffer.
    pin = HostMemoryGuard::process().admit_pin(len, fmt::format("slab of {} bytes", len));
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_memory, "slab of {} bytes: out of host memory for its record", len);
  }
  DMAKIT_TRY(std::move(pin));
  b->anchor = anchor_;
  b->size = len;
  b->prot = iommu::kReadWrite;
  b->pinned = len;
  DMAKIT_TRY(gather_slab(*b, len));
  const uint64_t align = std::max(b->chunks.front().order, kSlabBlock);
  auto span = arena_.alloc(iommu::IovaRequest{len, align, dma_limit});
  if (!span) {
    give_back(*b);
    Error e = std::move(span).error();
    std::string msg;
    note(msg, [&] { return fmt::format("slab: IOVA range of {} bytes aligned to {}: {}", len, size_name(align), e.message); });
    if (!msg.empty()) e.message = std::move(msg);
    return std::unexpected(std::move(e));
  }
  b->span = *span;
  uint64_t off = 0;
  for (BufferChunk& c : b->chunks) {
    c.iova = b->span.iova + off;
    off += c.len;
  }
  DMAKIT_TRY(map_runs(b));
  base::log().debug("buffer slabs: slab of {} at IOVA {:#x}, {} mapping entries", size_name(len), b->span.iova,
                    b->mappings);
  return b;
}

void Allocator::retire_slab(ImplPtr mem) { retire(std::move(mem)); }

void Allocator::enable_slabs(uint64_t slab_max, std::unique_ptr<MemorySource> run_source) {
  const uint64_t unit = orders_.back().size;
  if (isolation_ || slab_max < unit) return;
  if (run_source != nullptr) {
    slab_runs_ = run_source.get();
    sources_.push_back(std::move(run_source));
  }
  const bool huge = slab_runs_ != nullptr || orders_.front().size >= kSlabBlock;
  const bool runs = orders_.back().src->max_run() >= kSlabBlock;
  if (!huge && !runs) {
    base::log().debug("buffer slabs: off (no source gives 2 MiB pages or runs)");
    return;
  }
  slab_ = std::make_unique<SlabTier>(*this, anchor_, unit, std::min(slab_max, kSlabBlock));
}

// Order fallback (see the header). On failure nothing stays taken.
Status Allocator::gather(Impl& b, uint64_t need) {
  uint64_t remaining = need;
  const int64_t now = steady_ns();
  std::string tried;
  bool all_fresh_zero = true;
  for (size_t i = 0; i < orders_.size() && remaining != 0; ++i) {
    Order& o = orders_[i];
    if (o.size > remaining) continue;
    const bool last = i + 1 == orders_.size();
    if (!last && o.retry_at.load(std::memory_order_relaxed) > now) {
      skips_.fetch_add(1, std::memory_order_relaxed);
      note(tried, [&] {
        return fmt::format("{}: skipped (failed within {} ms); ", size_name(o.size), backoff_ns_ / 1000000);
      });
      continue;
    }
    uint64_t got = 0;
    while (remaining >= o.size) {
      const uint64_t want = std::min(remaining & ~(o.size - 1), o.src->max_run());
      ++b.attempts;
      attempts_.fetch_add(1, std::memory_order_relaxed);
      auto p = o.src->take(want);
      if (!p) {
        // Drop to the next order for the rest of this request; later
        // requests skip this one until the back-off expires.
        o.retry_at.store(now + backoff_ns_, std::memory_order_relaxed);
        if (!last) fallbacks_.fetch_add(1, std::memory_order_relaxed);
        note(tried, [&] { return fmt::format("{}: failed after {} chunks ({}); ", size_name(o.size), got, p.error().what()); });
        break;
      }
      if (!reserve_chunk(b)) {
        o.src->give(*p, want);
        give_back(b);
        return fail(Errc::no_memory, "buffer of {} bytes: out of host memory for its chunk list", b.size);
      }
      b.chunks.push_back(BufferChunk{*p, 0, want, o.size, o.src->name()});  // reserved: no allocation
      b.from.push_back(o.src);
      all_fresh_zero = all_fresh_zero && o.src->fresh_zero();
      remaining -= want;
      ++got;
    }
    if (got != 0 && remaining == 0) break;
  }
  if (remaining != 0) {
    give_back(b);
    if (!tried.empty()) tried.resize(tried.size() - 2);
    return fail(Errc::no_memory, "buffer of {} bytes: out of memory with {} bytes still needed; {}", b.size,
                remaining, tried);
  }
  b.zero = all_fresh_zero;
  return ok();
}

// One Domain::map per virtually contiguous run. On failure the runs mapped
// so far are unmapped and the memory and the IOVA range are given back; if
// that unmap fails, the buffer is retired instead and `owned` left empty.
Status Allocator::map_runs(ImplPtr& owned) {
  Impl& b = *owned;
  uint64_t mapped = 0;  // bytes from span.iova that are mapped
  size_t i = 0;
  uint32_t runs = 0;
  while (i < b.chunks.size()) {
    char* va = static_cast<char*>(b.chunks[i].vaddr);
    uint64_t len = b.chunks[i].len;
    size_t j = i + 1;
    while (j < b.chunks.size() && va + len == b.chunks[j].vaddr) len += b.chunks[j++].len;
    auto st = domain_.map(va, b.chunks[i].iova, len, b.prot);
    if (!st) {
      Error err = with_context(st.error(), fmt::format("map of run {} ({} bytes at IOVA {:#x})", runs, len,
                                                       b.chunks[i].iova));
      bool unmapped = mapped == 0 || static_cast<bool>(domain_.unmap(b.span.iova, mapped));
      if (unmapped) {
        if (auto fr = arena_.free(b.span); !fr)
          base::log().error("buffer IOVA {:#x}+{:#x}: free after failed map: {}", b.span.iova, b.span.len,
                            fr.error().what());
        give_back(b);
      } else {
        // Still mapped: hold the memory until the arena's flush unmaps it.
        base::log().error("buffer IOVA {:#x}: unmap after failed map failed; memory held until flush", b.span.iova);
        retire(std::move(owned));
      }
      return std::unexpected(std::move(err));
    }
    map_calls_.fetch_add(1, std::memory_order_relaxed);
    mapped += len;
    ++runs;
    i = j;
  }
  b.mappings = runs;
  b.contiguous = runs == 1;
  if (!b.contiguous) {
    // Runs can also break where the IOMMU maps no differently; check VA only.
    b.contiguous = true;
    for (size_t k = 1; k < b.chunks.size() && b.contiguous; ++k)
      b.contiguous = static_cast<char*>(b.chunks[k - 1].vaddr) + b.chunks[k - 1].len == b.chunks[k].vaddr;
  }
  return ok();
}

void Allocator::give_back(Impl& b) {
  for (size_t i = 0; i < b.chunks.size(); ++i) b.from[i]->give(b.chunks[i].vaddr, b.chunks[i].len);
  b.chunks.clear();
  b.from.clear();
  HostMemoryGuard::process().unpin(b.pinned);
  b.pinned = 0;
}

void Allocator::zero_memory(Impl& b) {
  for (const BufferChunk& c : b.chunks) std::memset(c.vaddr, 0, c.len);
  b.zero = true;
}

// ---------------------------------------------------------------------------
// Free: into the recycler (mapping kept), or retired when the recycler is
// off or the buffer alone exceeds the watermark.

void Allocator::release(ImplPtr b) {
  if (b->block != nullptr) {
    slab_->free(std::move(b));
    return;
  }
  Chain victims;
  bool keep = false;
  {
    std::lock_guard lock(mu_);
    const uint64_t len = b->span.len;
    --live_;
    live_bytes_ -= len;
    keep = !stopping_ && !isolation_ && len <= high_;
    auto it = keep ? classes_.find(len) : classes_.end();
    if (keep && it == classes_.end()) {
      try {
        it = classes_.try_emplace(len).first;
      } catch (const std::bad_alloc&) {
        keep = false;  // no memory for a new size class: retired instead of recycled
      }
    }
    if (keep) {
      b->zero = false;  // the owner may have written it
      it->second.dirty.push(std::move(b));
      recycled_bytes_ += len;
      dirty_bytes_ += len;
      if (recycled_bytes_ > high_) victims = collect_victims(high_);
    }
  }
  if (!keep) {
    retire(std::move(b));
    return;
  }
  if (prezero_) work_cv_.notify_one();
  while (ImplPtr v = victims.pop()) retire(std::move(v));
}

// Under mu_: takes recycled buffers out until recycled_bytes_ <= target,
// largest sizes first (fewest retirements), dirty before clean.
Chain Allocator::collect_victims(uint64_t target) {
  Chain out;
  uint64_t n = 0;
  for (auto it = classes_.rbegin(); it != classes_.rend() && recycled_bytes_ > target;) {
    SizeClass& sc = it->second;
    while (recycled_bytes_ > target && (!sc.dirty.empty() || !sc.clean.empty())) {
      bool dirty = !sc.dirty.empty();
      ImplPtr b = (dirty ? sc.dirty : sc.clean).pop();
      (dirty ? dirty_bytes_ : clean_bytes_) -= b->span.len;
      recycled_bytes_ -= b->span.len;
      out.push(std::move(b));
      ++n;
    }
    if (auto fwd = std::next(it).base(); idle(fwd))
      it = std::make_reverse_iterator(classes_.erase(fwd));
    else
      ++it;
  }
  shrinks_.fetch_add(n, std::memory_order_relaxed);
  return out;
}

bool Allocator::idle(const std::map<uint64_t, SizeClass>::iterator& it) const {
  return it->second.clean.empty() && it->second.dirty.empty() &&
         (zeroing_ == nullptr || zeroing_->span.len != it->first);
}

// Frees the IOVA range (stale in the arena, still mapped); the memory waits
// in pending_ until on_flushed. Registered before the free, because a strict
// arena flushes (and calls the listener) inside free(). The span is copied
// first: once in pending_, on_flushed may free the record at any time.
void Allocator::retire(ImplPtr b) {
  const iommu::IovaSpan span = b->span;
  {
    std::lock_guard lock(mu_);
    try {
      pending_.try_emplace(span.iova, std::move(b));  // moves b only once the node exists
    } catch (const std::bad_alloc&) {
      pending_spill_.push(std::move(b));
    }
    pending_bytes_ += span.len;
  }
  if (auto st = arena_.free(span); !st) {
    base::log().error("buffer IOVA {:#x}+{:#x}: arena refused the free ({}); its memory is kept", span.iova,
                      span.len, st.error().what());
    std::lock_guard lock(mu_);
    ImplPtr rec;
    if (auto it = pending_.find(span.iova); it != pending_.end()) {
      rec = std::move(it->second);
      pending_.erase(it);
    } else {
      rec = pending_spill_.take_if([&](const Impl& r) { return r.span.iova == span.iova; });
    }
    if (rec != nullptr) {
      pending_bytes_ -= span.len;
      lost_.push(std::move(rec));
    }
  }
}

// The arena reports a flushed range after its unmap returned and before its
// IOVAs can be handed out again, so every pending buffer inside the range is
// unreachable by the device and its memory can go back to the sources.
void Allocator::on_flushed(std::span<const iommu::IovaSpan> ranges) {
  Chain done;  // owned by pending_ until the flush, then by done
  {
    std::lock_guard lock(mu_);
    for (const auto& r : ranges) {
      auto inside = [&](const Impl& b) { return b.span.iova >= r.iova && b.span.end() <= r.end(); };
      for (auto it = pending_.lower_bound(r.iova); it != pending_.end() && it->first < r.end();) {
        if (it->second->span.end() <= r.end()) {
          pending_bytes_ -= it->second->span.len;
          done.push(std::move(it->second));
          it = pending_.erase(it);
        } else {
          ++it;
        }
      }
      while (ImplPtr b = pending_spill_.take_if(inside)) {
        pending_bytes_ -= b->span.len;
        done.push(std::move(b));
      }
    }
  }
  while (ImplPtr b = done.pop()) give_back(*b);
}

void Allocator::trim(bool all) {
  Chain victims;
  {
    std::unique_lock lock(mu_);
    // Let a buffer being zeroed come back so it can be counted and taken.
    ++hold_zeroing_;
    idle_cv_.wait(lock, [&] { return zeroing_ == nullptr; });
    victims = collect_victims(all ? 0 : high_);
    --hold_zeroing_;
  }
  work_cv_.notify_one();
  while (ImplPtr v = victims.pop()) retire(std::move(v));
  if (all && slab_ != nullptr) slab_->retire_free();
  if (auto st = arena_.flush(); !st) base::log().warn("buffer trim: arena flush: {}", st.error().what());
}

// ---------------------------------------------------------------------------
// Background threads.

void Allocator::zero_loop() {
  ::pthread_setname_np(::pthread_self(), "dmakit-zero");
  std::unique_lock lock(mu_);
  for (;;) {
    work_cv_.wait(lock, [&] { return stopping_ || (hold_zeroing_ == 0 && dirty_bytes_ != 0); });
    if (stopping_) return;
    for (auto& [len, sc] : classes_) {
      if (sc.dirty.empty()) continue;
      zeroing_ = sc.dirty.pop();
      break;
    }
    // zeroing_ owns it while the lock is dropped; only this thread touches
    // the record, and others only test zeroing_ for null under the lock.
    Impl& b = *zeroing_;
    dirty_bytes_ -= b.span.len;
    lock.unlock();
    zero_memory(b);
    lock.lock();
    // The class is still there (idle() spares it while zeroing_ is
    // of its size), so filing the record back allocates nothing.
    classes_.find(b.span.len)->second.clean.push(std::move(zeroing_));  // leaves zeroing_ null
    clean_bytes_ += b.span.len;
    idle_cv_.notify_all();
  }
}

bool Allocator::wait_prezeroed(std::chrono::milliseconds timeout) {
  if (!prezero_) return false;
  std::unique_lock lock(mu_);
  return idle_cv_.wait_for(lock, timeout, [&] { return dirty_bytes_ == 0 && zeroing_ == nullptr; });
}

// Memory pressure: a PSI trigger (150 ms of stall in a 2 s window) wakes
// this thread, which retires every recycled buffer and flushes the arena.
void Allocator::psi_loop(int psi_fd) {
  ::pthread_setname_np(::pthread_self(), "dmakit-psi");
  pollfd fds[2] = {{psi_fd, POLLPRI, 0}, {stop_fd_, POLLIN, 0}};
  for (;;) {
    int n = ::poll(fds, 2, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || (fds[1].revents & POLLIN) != 0) break;
    if ((fds[0].revents & POLLERR) != 0) {
      base::log().warn("buffer allocator: PSI trigger stopped (the monitor went away)");
      break;
    }
    if ((fds[0].revents & POLLPRI) != 0) {
      psi_events_.fetch_add(1, std::memory_order_relaxed);
      base::log().info("buffer allocator: memory pressure, releasing recycled memory");
      trim(true);
    }
  }
  psi_armed_.store(false);
  ::close(psi_fd);
}

void Allocator::start(bool psi) {
  subscribed_ = true;  // first: an empty hub entry left by a failed subscribe is removed too
  subscribe(arena_, this);
  // A thread that cannot start (std::system_error: EAGAIN, RLIMIT_NPROC)
  // costs only its service: zeroed requests are then memset by the caller.
  if (prezero_) {
    try {
      zero_thread_ = std::thread([this] { zero_loop(); });
    } catch (const std::exception& e) {  // system_error, or bad_alloc for the thread's state
      base::log().warn("buffer allocator: no pre-zeroing thread: {}", e.what());
    }
  }
  if (!psi) return;
  int fd = ::open("/proc/pressure/memory", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  static std::once_flag logged;
  if (fd < 0) {
    int err = errno;
    std::call_once(logged, [err] {
      base::log().debug("buffer allocator: no memory-pressure trigger (/proc/pressure/memory: {})",
                        std::strerror(err));
    });
    return;
  }
  const char trig[] = "some 150000 2000000";
  if (::write(fd, trig, sizeof trig) < 0) {
    int err = errno;
    std::call_once(logged, [err] {
      base::log().debug("buffer allocator: PSI trigger refused: {}", std::strerror(err));
    });
    ::close(fd);
    return;
  }
  if (const int err = base::fault::inject(base::fault::Point::allocator_eventfd))
    errno = err;
  else
    stop_fd_ = ::eventfd(0, EFD_CLOEXEC);
  if (stop_fd_ < 0) {
    base::log().warn("buffer allocator: eventfd: {}; no memory-pressure trigger", std::strerror(errno));
    ::close(fd);
    return;
  }
  try {
    psi_thread_ = std::thread([this, fd] { psi_loop(fd); });
  } catch (const std::exception& e) {  // system_error, or bad_alloc for the thread's state
    base::log().warn("buffer allocator: no memory-pressure thread: {}", e.what());
    ::close(fd);
    return;
  }
  psi_armed_.store(true);
}

Allocator::~Allocator() {
  // Buffers still alive from here on keep their memory and mapping.
  {
    std::unique_lock lock(anchor_->mu);
    anchor_->owner = nullptr;
  }
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  if (zero_thread_.joinable()) zero_thread_.join();
  if (psi_thread_.joinable()) {
    uint64_t one = 1;
    if (::write(stop_fd_, &one, sizeof one) < 0) base::log().error("buffer allocator: waking the PSI thread failed");
    psi_thread_.join();
  }
  if (stop_fd_ >= 0) ::close(stop_fd_);
  if (slab_ != nullptr) slab_->close_caches();  // other threads' cached slots too, so their slabs retire
  trim(true);
  slab_.reset();  // after the flush above, so retired slabs went back to their sources
  if (subscribed_) unsubscribe(arena_, this);
  std::lock_guard lock(mu_);
  if (live_ != 0)
    base::log().warn("buffer allocator destroyed with {} live buffers ({} bytes): their memory and IOVA "
                     "mappings are left in place",
                     live_, live_bytes_);
  if (!pending_.empty() || !pending_spill_.empty() || !lost_.empty())
    base::log().warn("buffer allocator destroyed with {} buffers ({} bytes) whose IOVA was never unmapped: "
                     "their memory is left in place",
                     pending_.size() + pending_spill_.size() + lost_.size(), pending_bytes_);
  // Sources last, most derived first (carved sources hold their parent's pages).
  while (!sources_.empty()) sources_.pop_back();
}

BufferStats Allocator::stats() const {
  BufferStats s;
  {
    std::lock_guard lock(mu_);
    s.buffers_live = live_;
    s.bytes_live = live_bytes_;
    s.recycled_bytes = recycled_bytes_;
    s.prezeroed_bytes = clean_bytes_;
    s.pending_flush_bytes = pending_bytes_;
  }
  if (slab_ != nullptr) {
    const SlabStats ss = slab_->stats();
    s.buffers_live += ss.buffers_live;
    s.bytes_live += ss.in_use_bytes;
    s.slabs = ss.slabs;
    s.slab_bytes = ss.slab_bytes;
    s.slab_bytes_in_use = ss.in_use_bytes;
    s.slab_free_bytes = ss.free_bytes;
    s.slab_grows = ss.grows;
    s.slab_double_frees = ss.double_frees;
  }
  s.chunk_attempts = attempts_.load(std::memory_order_relaxed);
  s.order_fallbacks = fallbacks_.load(std::memory_order_relaxed);
  s.backoff_skips = skips_.load(std::memory_order_relaxed);
  s.map_calls = map_calls_.load(std::memory_order_relaxed);
  s.fresh_allocs = fresh_.load(std::memory_order_relaxed);
  s.recycle_hits = hits_.load(std::memory_order_relaxed);
  s.reclaims = reclaims_.load(std::memory_order_relaxed);
  s.memset_fallbacks = memsets_.load(std::memory_order_relaxed);
  s.shrinks = shrinks_.load(std::memory_order_relaxed);
  s.psi_events = psi_events_.load(std::memory_order_relaxed);
  s.psi_armed = psi_armed_.load(std::memory_order_relaxed);
  return s;
}

// ---------------------------------------------------------------------------
// Factory.

Result<std::vector<uint64_t>> parse_orders(const std::string& list) {
  std::vector<uint64_t> out;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    auto sz = base::parse_size(item);
    if (!sz) return fail(Errc::invalid_argument, "buffer.orders '{}': {}", list, sz.error().message);
    if (*sz < kPage4K || (*sz & (*sz - 1)) != 0)
      return fail(Errc::invalid_argument, "buffer.orders '{}': '{}' is not a power of two >= 4K", list, item);
    out.push_back(*sz);
  }
  if (out.empty()) return fail(Errc::invalid_argument, "buffer.orders '{}': empty list", list);
  std::sort(out.begin(), out.end(), std::greater<>());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

namespace {

// The real sources for the orders: hugepages for >= 2M, pieces carved from
// 2M hugepages below that, anonymous memory for the smallest order.
Status default_sources(const BufferSettings& s, std::vector<uint64_t> orders,
                       std::vector<std::unique_ptr<MemorySource>>& out,
                       std::vector<std::pair<uint64_t, MemorySource*>>& chosen) {
  const base::EalInfo* eal = base::eal_info();
  const bool huge = eal != nullptr && eal->hugepages;
  if (s.hugepage_1g && huge && eal_has_page_size(kPage1G) && orders.front() < kPage1G)
    orders.insert(orders.begin(), kPage1G);
  MemorySource* parent2m = nullptr;
  auto hp2m = [&]() -> Result<MemorySource*> {
    if (parent2m == nullptr) {
      out.push_back(DMAKIT_TRY(make_hugepage_source(kPage2M, 16)));
      parent2m = out.back().get();
    }
    return parent2m;
  };
  for (size_t i = 0; i < orders.size(); ++i) {
    const uint64_t o = orders[i];
    const bool smallest = i + 1 == orders.size();
    if (o == kPage1G && huge && s.hugepage_1g && eal_has_page_size(kPage1G)) {
      out.push_back(DMAKIT_TRY(make_hugepage_source(kPage1G, 1)));
      chosen.emplace_back(o, out.back().get());
    } else if (o == kPage2M && huge) {
      chosen.emplace_back(o, DMAKIT_TRY(hp2m()));
    } else if (smallest) {
      out.push_back(DMAKIT_TRY(make_anon_source(o, true)));
      chosen.emplace_back(o, out.back().get());
    } else if (o < kPage2M && huge) {
      MemorySource* parent = DMAKIT_TRY(hp2m());
      out.push_back(DMAKIT_TRY(make_carved_source(*parent, o)));
      chosen.emplace_back(o, out.back().get());
    } else {
      base::log().debug("buffer allocator: no {} source ({}); order left out", size_name(o),
                        huge ? "no source serves this size" : "EAL runs without hugepages");
    }
  }
  return ok();
}

}  // namespace

namespace {

Result<std::unique_ptr<BufferAllocator>> create_allocator(iommu::IovaArena& arena, const BufferSettings& s,
                                                          std::vector<std::unique_ptr<MemorySource>> sources) {
  const uint64_t min_page = arena.domain().info().min_page();
  std::vector<std::pair<uint64_t, MemorySource*>> chosen;
  const bool default_sources_used = sources.empty();
  if (sources.empty()) {
    std::vector<uint64_t> orders = DMAKIT_TRY(parse_orders(s.orders));
    std::erase_if(orders, [&](uint64_t o) { return o < min_page; });
    if (orders.empty())
      return fail(Errc::invalid_argument, "buffer.orders '{}': every order is below the IOMMU page {}", s.orders,
                  size_name(min_page));
    DMAKIT_TRY(default_sources(s, std::move(orders), sources, chosen));
  } else {
    for (auto& src : sources) {
      if (src == nullptr) return fail(Errc::invalid_argument, "buffer allocator: null memory source");
      if (src->order() < min_page) continue;
      for (auto& c : chosen)
        if (c.first == src->order())
          return fail(Errc::invalid_argument, "buffer allocator: sources '{}' and '{}' both serve order {}",
                      c.second->name(), src->name(), size_name(src->order()));
      chosen.emplace_back(src->order(), src.get());
    }
    std::sort(chosen.begin(), chosen.end(), [](auto& a, auto& b) { return a.first > b.first; });
  }
  if (chosen.empty())
    return fail(Errc::invalid_argument, "buffer allocator: no memory source serves an order >= the IOMMU page {}",
                size_name(min_page));
  std::string list;
  for (auto& c : chosen) list += fmt::format("{}{}={}", list.empty() ? "" : ", ", size_name(c.first), c.second->name());
  base::log().debug("buffer allocator: orders {}", list);

  auto a = std::make_unique<Allocator>(arena, s, std::move(sources), std::move(chosen));
  // Slab memory from whole hugepage runs where the EAL has hugepages (with
  // the real sources only: given sources define all the memory there is).
  std::unique_ptr<MemorySource> runs;
  if (default_sources_used && !s.isolation && s.slab_max != 0) {
    if (auto r = make_hugepage_run_source()) runs = std::move(*r);
  }
  a->enable_slabs(s.slab_max, std::move(runs));
  a->start(s.psi);
  return std::unique_ptr<BufferAllocator>(std::move(a));
}

}  // namespace

Result<std::unique_ptr<BufferAllocator>> create_buffer_allocator(iommu::IovaArena& arena,
                                                                 const BufferSettings& s,
                                                                 std::vector<std::unique_ptr<MemorySource>> sources) {
  // Whatever was made before host memory ran out is owned (sources, the
  // allocator and its subscription) and goes with the exception.
  try {
    return create_allocator(arena, s, std::move(sources));
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_memory, "buffer allocator: out of host memory while creating it (orders '{}')", s.orders);
  }
}

}  // namespace dmakit::alloc_buffer
