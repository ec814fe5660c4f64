// BufferAllocator implementation; the design is in buffer_allocator.hpp.
// This file: Buffer's methods, allocation (alloc and the reclaim before a
// refusal), start and destruction, stats and the factory.
// allocator.hpp names the files of the other parts.
#include "alloc_buffer/buffer_allocator.hpp"
#include "alloc_buffer/allocator.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <sstream>
#include <system_error>

#include "base/config.hpp"
#include "base/eal.hpp"
#include "base/log.hpp"

namespace dmakit::alloc_buffer {

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

Buffer::~Buffer() {
  if (impl_ == nullptr) return;
  // A slab buffer goes to this thread's slab cache without the anchor: a
  // cache attached to its tier proves the tier is alive.
  if (impl_->block != nullptr && SlabTier::free_to_cache(impl_.get())) [[likely]] {
    (void)impl_.release();
    return;
  }
  std::shared_ptr<Anchor> anchor = impl_->anchor;
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

// ---------------------------------------------------------------------------
// Lifecycle.

Allocator::Allocator(iommu::IovaArena& arena, const BufferSettings& s,
                     std::vector<std::unique_ptr<MemorySource>> sources,
                     std::vector<std::pair<uint64_t, MemorySource*>> orders)
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

Status Allocator::start(bool psi) {
  // One listener per allocator: the arena reports every flush to each
  // allocator sharing it, and the records waiting for an unmap are found by
  // the allocator that retired them.
  listener_ = DMAKIT_TRY(arena_.add_flush_listener([this](std::span<const iommu::IovaSpan> ranges) {
    on_flushed(ranges);
  }));
  // A thread that cannot start (std::system_error: EAGAIN, RLIMIT_NPROC)
  // costs only its service: zeroed requests are then memset by the caller.
  if (prezero_) {
    try {
      zero_thread_ = std::thread([this] { zero_loop(); });
    } catch (const std::exception& e) {  // system_error, or bad_alloc for the thread's state
      base::log().warn("buffer allocator: no pre-zeroing thread: {}", e.what());
    }
  }
  if (psi) arm_psi();
  return ok();
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
  // After this the arena never calls on_flushed again.
  if (listener_ != 0) arena_.remove_flush_listener(listener_);
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
  DMAKIT_TRY(a->start(s.psi));
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
