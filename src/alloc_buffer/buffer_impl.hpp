// The record behind a Buffer handle, shared by the allocator's parts (the
// files allocator.hpp names: buffer_allocator.cpp, builder.cpp, recycler.cpp,
// background.cpp) and the slab tier in slab.cpp.
// Internal: nothing outside src/alloc_buffer includes it.
#pragma once

#include <memory>
#include <shared_mutex>
#include <vector>

#include "alloc_buffer/buffer_allocator.hpp"

namespace dmakit::alloc_buffer {

class Allocator;
struct SlabBlock;

// Lets a Buffer outlive its allocator safely: releases take it shared, the
// allocator's destructor takes it exclusively and clears `owner`.
struct Anchor {
  std::shared_mutex mu;
  Allocator* owner = nullptr;
};

struct Buffer::Impl {
  std::shared_ptr<Anchor> anchor;
  uint64_t size = 0;            // requested bytes
  iommu::IovaSpan span;         // the whole IOVA range
  uint32_t prot = 0;
  uint32_t mappings = 0;
  uint32_t attempts = 0;
  bool contiguous = false;
  bool zero = false;            // contents known to be zero
  bool recycled = false;
  uint64_t pinned = 0;          // bytes admitted as pinned (HostMemoryGuard), given back with the chunks
  std::vector<BufferChunk> chunks;  // IOVA order
  std::vector<MemorySource*> from;  // source of each chunk
  // Slab buffers: the block the slot is carved from and the slot's index;
  // nullptr for buffers with a mapping of their own.
  SlabBlock* block = nullptr;
  uint32_t slot = 0;
  // The slab tier the record belongs to (set when the tier makes it): its
  // thread-cache slot and its uid.
  uint32_t cache_slot = 0;
  uint64_t tier_uid = 0;
  // Link while the record sits in one of the recycler's chains (buffer
  // allocator); pushing and popping a chain never allocates.
  std::unique_ptr<Impl> next;
};

using ImplPtr = std::unique_ptr<Buffer::Impl>;

}  // namespace dmakit::alloc_buffer
