// Backing over the BufferAllocator: each chunk of a pool is one buffer that
// is a single virtually contiguous run, so the pool costs one IOMMU mapping
// per chunk at most (fewer when the allocator's runs are larger).
#include <algorithm>
#include <bit>
#include <mutex>
#include <new>
#include <unordered_map>

// LeakSanitizer builds: abandon()'s deliberate leak is marked as such.
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#include <sanitizer/lsan_interface.h>
#define DMAKIT_MARK_KEPT(p) __lsan_ignore_object(p)
#endif
#elif defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#define DMAKIT_MARK_KEPT(p) __lsan_ignore_object(p)
#endif
#ifndef DMAKIT_MARK_KEPT
#define DMAKIT_MARK_KEPT(p) ((void)(p))
#endif

#include "alloc_buffer/buffer_allocator.hpp"
#include "pool/dma_pool.hpp"

namespace dmakit::pool {

namespace {

class BufferBacking final : public Backing {
 public:
  BufferBacking(alloc_buffer::BufferAllocator& buffers, uint64_t dma_limit)
      : buffers_(buffers), dma_limit_(dma_limit) {}

  Result<Region> grow(uint64_t len) override {
    alloc_buffer::BufferRequest req;
    req.len = len;
    // Host address and IOVA must agree modulo the pool's alignment: the IOVA
    // gets the alignment the sources give a run of this size (the chunk's
    // size, up to 2 MiB: pieces of an order, anonymous runs) - see run_align.
    req.align = std::min<uint64_t>(std::bit_floor(len), alloc_buffer::kPage2M);
    req.dma_limit = dma_limit_;
    auto buf = buffers_.alloc(req);
    if (!buf) return std::unexpected(std::move(buf).error());
    if (!buf->virtually_contiguous() || buf->size() < len)
      return fail(Errc::no_memory,
                  "buffer allocator: a buffer of {} bytes came as {} chunks that are not one virtually "
                  "contiguous run",
                  len, buf->chunks().size());
    Region r{buf->vaddr(), buf->iova(), len};
    // Boxed now, so that abandon() can keep it forever without allocating.
    // Out of host memory the buffer goes back to the allocator as it unwinds.
    try {
      auto box = std::make_unique<alloc_buffer::Buffer>(std::move(*buf));
      std::lock_guard lock(mu_);
      held_.emplace(reinterpret_cast<uintptr_t>(r.vaddr), std::move(box));
    } catch (const std::bad_alloc&) {
      return fail(Errc::no_memory, "buffer allocator: no host memory to record a chunk of {} bytes", len);
    }
    return r;
  }

  void release(const Region& r) override {
    std::unique_ptr<alloc_buffer::Buffer> dying;  // returned to the allocator outside the lock
    std::lock_guard lock(mu_);
    auto it = held_.find(reinterpret_cast<uintptr_t>(r.vaddr));
    if (it == held_.end()) return;
    dying = std::move(it->second);
    held_.erase(it);
  }

  void abandon(const Region& r) override {
    std::lock_guard lock(mu_);
    auto it = held_.find(reinterpret_cast<uintptr_t>(r.vaddr));
    if (it == held_.end()) return;
    // Deliberate leak: the buffer is never destroyed, so its memory and IOVA
    // mapping are never given to another owner while a device may use them.
    DMAKIT_MARK_KEPT(it->second.release());
    held_.erase(it);
  }

  std::string describe() const override { return "the buffer allocator"; }

  uint64_t chunk_size(uint64_t want) const override {
    uint64_t best = 0;  // the smallest power-of-two order >= want
    for (uint64_t o : buffers_.orders())
      if (o >= want && (o & (o - 1)) == 0 && (best == 0 || o < best)) best = o;
    return best != 0 ? best : want;
  }

 private:
  alloc_buffer::BufferAllocator& buffers_;
  const uint64_t dma_limit_;
  std::mutex mu_;
  std::unordered_map<uintptr_t, std::unique_ptr<alloc_buffer::Buffer>> held_;
};

}  // namespace

std::unique_ptr<Backing> make_buffer_backing(alloc_buffer::BufferAllocator& buffers, uint64_t dma_limit) {
  return std::make_unique<BufferBacking>(buffers, dma_limit);
}

Result<std::unique_ptr<DmaPool>> DmaPool::create(alloc_buffer::BufferAllocator& buffers, std::string name,
                                                 size_t size, size_t align, size_t boundary,
                                                 const PoolOptions& opts) {
  // The backing and what it asks the allocator (its orders) allocate; all
  // of it is owned, so out of host memory nothing stays behind.
  try {
    return create(make_buffer_backing(buffers, opts.dma_limit), name, size, align, boundary, opts);
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_memory, "pool '{}': out of host memory for its backing", name);
  }
}

}  // namespace dmakit::pool
