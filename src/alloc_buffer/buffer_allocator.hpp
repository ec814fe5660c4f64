// BufferAllocator: large DMA buffers from order-fallback host memory, each
// mapped as one contiguous IOVA range from the arena.
//
// A request for N bytes takes chunks of the largest order on the order list
// (default 2M, 1M, 64K, 4K, adjusted to the IOMMU's page sizes) that still
// fits the remaining size; the first failure of an order drops to the next
// order for the rest of the request; an order that failed recently is skipped
// for a back-off period. Attempts per request <= chunks + orders.
// 2 MiB chunks come from DPDK hugepages, 1M/64K chunks are carved from EAL
// hugepage memory, 4K chunks are ordinary anonymous pages (pinned by the map).
// Virtually contiguous runs are mapped with one Domain::map each.
//
// Freed buffers go to a recycling pool keyed by size that keeps their IOVA
// mapping; a background thread zeroes them so zeroed requests are served
// without a memset; a shrinker releases memory above a high watermark, on
// trim() and on memory pressure. Memory behind IOVAs that are stale in the
// arena is not reused before the arena reports their flush.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "dmakit/error.hpp"
#include "iommu/iova_arena.hpp"

namespace dmakit::alloc_buffer {

struct Chunk {
  void* vaddr = nullptr;
  uint64_t iova = 0;
  uint64_t len = 0;      // the chunk's order size
  std::string_view source;  // "hugepage", "hugepage-carved", "anon", or a test source's name
};

struct BufferRequest {
  uint64_t len = 0;
  bool zeroed = false;
  uint64_t dma_limit = ~0ull;          // highest IOVA any byte may have
  uint32_t prot = iommu::kReadWrite;
};

class BufferAllocator;

// A DMA buffer. Move-only; destroying it returns it to its allocator (which
// must outlive it). The IOVA range is contiguous; the host memory is the
// chunk list, contiguous only where virtually_contiguous() says so.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Buffer&&) noexcept;
  Buffer& operator=(Buffer&&) noexcept;
  ~Buffer();

  explicit operator bool() const { return impl_ != nullptr; }
  uint64_t iova() const;
  uint64_t size() const;                // requested bytes
  std::span<const Chunk> chunks() const;
  void* vaddr() const;                  // first chunk
  bool virtually_contiguous() const;    // all chunks form one VA run
  // Host address of byte `offset` of the buffer, or nullptr past the end.
  void* at(uint64_t offset) const;
  // IOVA of a host address inside the buffer.
  Result<uint64_t> iova_of(const void* p) const;

  struct Impl;
  explicit Buffer(Impl* impl) : impl_(impl) {}
  Impl* impl() const { return impl_; }

 private:
  Impl* impl_ = nullptr;  // owned by the allocator; returned on destruction
};

struct BufferStats {
  uint64_t buffers_live = 0;
  uint64_t bytes_live = 0;
  uint64_t recycled_bytes = 0;       // in the recycling pool
  uint64_t prezeroed_bytes = 0;
  uint64_t chunk_attempts = 0;       // source calls, all requests
  uint64_t order_fallbacks = 0;
  uint64_t map_calls = 0;
};

class BufferAllocator {
 public:
  virtual ~BufferAllocator() = default;
  virtual Result<Buffer> alloc(const BufferRequest& req) = 0;
  // Releases recycled memory (all of it, or down to the high watermark).
  virtual void trim(bool all) = 0;
  virtual BufferStats stats() const = 0;
  virtual iommu::IovaArena& arena() = 0;
};

}  // namespace dmakit::alloc_buffer
