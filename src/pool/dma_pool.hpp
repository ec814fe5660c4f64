// DmaPool: fixed-size DMA blocks (size, align, boundary) with the semantics
// of the kernel's dma_pool, carved from buffers of the BufferAllocator.
//
// No allocator metadata lives in DMA memory (the device may overwrite every
// byte); block state is in host memory and a block's address and IOVA are
// computed from its chunk. Alloc and free are O(1); every free is validated.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "alloc_buffer/buffer_allocator.hpp"
#include "dmakit/error.hpp"

namespace dmakit::pool {

struct DmaBlock {
  void* vaddr = nullptr;
  uint64_t iova = 0;
};

struct PoolOptions {
  uint32_t cache_size = 32;   // per-thread cache, blocks
  bool poison = false;        // poison on free, check on alloc
  bool zero = false;          // zero every block on alloc
};

struct PoolStats {
  std::string name;
  uint64_t size = 0, align = 0, boundary = 0;
  uint64_t blocks = 0;        // total carved
  uint64_t active = 0;        // allocated now
  uint64_t chunks = 0;        // buffers taken from the allocator
  uint64_t validation_failures = 0;
  uint64_t poison_failures = 0;
};

class DmaPool;

}  // namespace dmakit::pool
