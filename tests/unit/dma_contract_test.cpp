// The DMA contract, statement by statement (docs/API.md, "The DMA contract",
// and the header comment of include/dmakit/dmakit.h): for each object and
// arena mode, whether the device can still reach memory after its free and
// when that memory can have a new owner. The device is played through the
// simulated IOMMU (SimDomain::translate), which reaches host memory only
// through live mappings, as DMA through an IOMMU does. One test per row of
// the table; a new row (another object or mode) is a new test here.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <vector>

#include "base/clock.hpp"
#include "core/context.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"
#include "pool/dma_pool.hpp"

using namespace dmakit;

namespace {

constexpr uint64_t K = 1024;
// A buffer with a mapping of its own: above buffer.slab_max (1 MiB by
// default), so it is recycled or retired on its own rather than carved
// from a slab. 2 MiB: one chunk, 512 pages of IOVA.
constexpr uint64_t kOwn = 2048 * K;

struct Mode {
  bool strict = false;
  uint64_t slab_max = 1024 * K;  // the default; 0: every buffer has its own mapping
  uint64_t recycle_high_mb = 256;  // 0: every freed buffer is retired at once
  uint64_t stale_max_pages = 8192;
  uint32_t stale_max_age_ms = 50;
};

class DmaContract : public ::testing::Test {
 protected:
  void make(const Mode& m) {
    core::Config c;
    c.iommu.backend = "sim";
    c.eal.mode = "nohuge";
    c.eal.memory_mb = 64;
    c.buffer.psi = false;
    c.buffer.prezero = false;
    c.buffer.recycle_high_mb = m.recycle_high_mb;
    c.buffer.slab_max = m.slab_max;
    c.arena.strict = m.strict;
    c.arena.stale_max_pages = m.stale_max_pages;
    c.arena.stale_max_age_ms = m.stale_max_age_ms;
    auto ctx = core::Context::create(c);
    ASSERT_TRUE(ctx) << ctx.error().what();
    ctx_ = std::move(*ctx);
    sim_ = dynamic_cast<iommu::SimDomain*>(&ctx_->domain());
    ASSERT_NE(sim_, nullptr);
  }
  // The device reads the byte at iova and finds `expect` there: it reaches
  // the host memory the test wrote through vaddr.
  bool device_reaches(uint64_t iova, const void* vaddr) {
    auto view = sim_->translate(iova, 1, iommu::kRead);
    return view && view->data() == static_cast<const std::byte*>(vaddr);
  }
  alloc_buffer::Buffer buffer(uint64_t len) {
    auto b = ctx_->buffers().alloc({.len = len});
    EXPECT_TRUE(b) << b.error().what();
    return b ? std::move(*b) : alloc_buffer::Buffer();
  }
  static void free_buffer(alloc_buffer::Buffer& b) { b = alloc_buffer::Buffer(); }

  std::unique_ptr<core::Context> ctx_;
  iommu::SimDomain* sim_ = nullptr;
};

// buffer, recycled (default): still reachable after free; the next buffer
// of that size in the context gets the same memory at once.
TEST_F(DmaContract, RecycledBufferStaysReachableAndGoesToTheNextOwnerAtOnce) {
  make({});
  auto b = buffer(kOwn);
  ASSERT_FALSE(b.from_slab());
  const uint64_t iova = b.iova();
  void* va = b.vaddr();
  free_buffer(b);
  EXPECT_TRUE(device_reaches(iova, va)) << "the recycler keeps the mapping";
  auto next = buffer(kOwn);
  EXPECT_TRUE(next.recycled());
  EXPECT_EQ(next.vaddr(), va) << "a new owner while the device can reach it";
  EXPECT_EQ(next.iova(), iova);
}

// buffer, retired: reachable until the arena flushes its IOVA range; the
// memory gets no new owner before that flush returned.
TEST_F(DmaContract, RetiredBufferIsReachableUntilTheFlushAndOnlyThenReused) {
  make({.recycle_high_mb = 0});
  auto b = buffer(kOwn);
  ASSERT_FALSE(b.from_slab());
  const uint64_t iova = b.iova();
  void* va = b.vaddr();
  free_buffer(b);
  EXPECT_TRUE(device_reaches(iova, va)) << "lazy: the stale range stays mapped";
  EXPECT_EQ(ctx_->buffers().stats().pending_flush_bytes, kOwn) << "held until the flush";
  auto other = buffer(kOwn);
  EXPECT_NE(other.vaddr(), va) << "memory behind a stale IOVA went to a new owner";
  ASSERT_TRUE(ctx_->flush());
  EXPECT_FALSE(device_reaches(iova, va)) << "dmakit_ctx_flush unmaps every stale range";
  EXPECT_EQ(ctx_->buffers().stats().pending_flush_bytes, 0u);
}

// The stale window is bounded by arena.stale_max_pages ...
TEST_F(DmaContract, StaleWindowEndsAtTheStalePageBound) {
  make({.recycle_high_mb = 0, .stale_max_pages = 2 * kOwn / 4096});
  auto first = buffer(kOwn);  // 512 pages
  ASSERT_FALSE(first.from_slab());
  const uint64_t iova = first.iova();
  void* va = first.vaddr();
  // All buffers from one thread: one shard, whose stale pages count up.
  auto second = buffer(kOwn);
  free_buffer(first);
  EXPECT_TRUE(device_reaches(iova, va)) << "512 stale pages, below the bound";
  free_buffer(second);  // 1024 stale pages: the bound
  EXPECT_FALSE(device_reaches(iova, va)) << "the shard flushed at stale_max_pages";
}

// ... and by arena.stale_max_age_ms, given kStaleAgeCheckEvery operations on
// the shard. The buffers below stay allocated, so that the freed memory and
// its IOVA cannot reappear under a new owner and fool the check. Small
// buffers with mappings of their own (slab_max = 0): each alloc is an
// operation on the shard, as a slab buffer's is not.
TEST_F(DmaContract, StaleWindowEndsAtTheStaleAgeBound) {
  base::ManualClock clock;
  make({.slab_max = 0, .recycle_high_mb = 0, .stale_max_age_ms = 50});
  auto b = buffer(16 * K);
  ASSERT_FALSE(b.from_slab());
  const uint64_t iova = b.iova();
  void* va = b.vaddr();
  free_buffer(b);
  std::vector<alloc_buffer::Buffer> held;
  const uint64_t flushes = ctx_->arena().stats().flushes;
  clock.advance(std::chrono::milliseconds(49));
  for (uint32_t i = 0; i < 2 * iommu::kStaleAgeCheckEvery; ++i) held.push_back(buffer(16 * K));
  EXPECT_EQ(ctx_->arena().stats().flushes, flushes) << "flushed before the age bound";
  EXPECT_TRUE(device_reaches(iova, va));
  clock.advance(std::chrono::milliseconds(1));
  for (uint32_t i = 0; i < iommu::kStaleAgeCheckEvery && ctx_->arena().stats().flushes == flushes; ++i)
    held.push_back(buffer(16 * K));
  EXPECT_EQ(ctx_->arena().stats().flushes, flushes + 1) << "no flush within kStaleAgeCheckEvery operations";
  EXPECT_FALSE(device_reaches(iova, va)) << "flushed once the oldest stale range is stale_max_age old";
}

// pool block: the chunk stays mapped while the pool lives; the next block
// allocated from the pool may be the one just freed.
TEST_F(DmaContract, PoolBlockStaysReachableAndGoesToTheNextAllocAtOnce) {
  make({});
  auto p = ctx_->create_pool("contract", 64, 64, 0);
  ASSERT_TRUE(p) << p.error().what();
  auto blk = (*p)->alloc();
  ASSERT_TRUE(blk);
  ASSERT_TRUE((*p)->free(*blk));
  EXPECT_TRUE(device_reaches(blk->iova, blk->vaddr));
  auto again = (*p)->alloc();
  ASSERT_TRUE(again);
  EXPECT_EQ(again->vaddr, blk->vaddr) << "the freed block is the next one handed out";
  EXPECT_TRUE((*p)->free(*again));
}

// pool chunk (pool destroyed), chunks of at most slab_max (the default for
// small blocks): an empty chunk is freed like a slab buffer (the slab stays
// mapped, and the next buffer of its size class gets the memory at once); a
// chunk that still holds an allocated block never gets a new owner and
// stays mapped, through trim and flush too.
TEST_F(DmaContract, DestroyedPoolsSlabChunksAreFreedAsSlabBuffersExceptThoseWithLiveBlocks) {
  make({});
  auto empty = ctx_->create_pool("empty", 64, 64, 0);
  auto busy = ctx_->create_pool("busy", 64, 64, 0);
  ASSERT_TRUE(empty && busy);
  const uint64_t chunk = (*empty)->chunk_bytes();
  ASSERT_LE(chunk, 1024 * K) << "the default chunk of a 64-byte pool is carved from a slab";
  auto e = (*empty)->alloc();
  auto live = (*busy)->alloc();
  ASSERT_TRUE(e && live);
  ASSERT_TRUE((*empty)->free(*e));
  const uint64_t in_use = ctx_->buffers().stats().slab_bytes_in_use;
  ASSERT_GE(in_use, 2 * chunk) << "both chunks are slab buffers";
  ASSERT_TRUE(ctx_->destroy_pool(*empty));
  ASSERT_TRUE(ctx_->destroy_pool(*busy));
  EXPECT_EQ(ctx_->buffers().stats().slab_bytes_in_use, in_use - chunk) << "only the empty chunk was freed";
  EXPECT_TRUE(device_reaches(e->iova, e->vaddr)) << "the slab stays mapped";
  EXPECT_TRUE(device_reaches(live->iova, live->vaddr));
  auto in = [&](const alloc_buffer::Buffer& b, const void* p) {
    const auto* lo = static_cast<const char*>(b.vaddr());
    const auto* c = static_cast<const char*>(p);
    return c >= lo && c < lo + b.size();
  };
  auto next = buffer(chunk);
  ASSERT_TRUE(next.from_slab());
  EXPECT_TRUE(in(next, e->vaddr)) << "the freed chunk is the next slot of its class handed out";
  EXPECT_TRUE(device_reaches(e->iova, e->vaddr));
  ctx_->buffers().trim(true);
  ASSERT_TRUE(ctx_->flush());
  EXPECT_TRUE(device_reaches(live->iova, live->vaddr)) << "a chunk with a live block is never unmapped";
  // Nor handed out again.
  std::vector<alloc_buffer::Buffer> more;
  for (int i = 0; i < 8; ++i) {
    more.push_back(buffer(chunk));
    EXPECT_FALSE(in(more.back(), live->vaddr)) << "the abandoned chunk went to a new owner";
  }
}

// pool chunk (pool destroyed), chunks above slab_max: an empty chunk is
// freed like a buffer (recycled: reachable, and the next buffer of its size
// may get it; retired by trim and unmapped by the flush); a chunk that still
// holds an allocated block never gets a new owner and stays mapped.
TEST_F(DmaContract, DestroyedPoolsChunksAreFreedAsBuffersExceptThoseWithLiveBlocks) {
  make({});
  pool::PoolOptions o;
  o.chunk_bytes = kOwn;
  auto empty = ctx_->create_pool("empty", 64, 64, 0, o);
  auto busy = ctx_->create_pool("busy", 64, 64, 0, o);
  ASSERT_TRUE(empty && busy);
  auto e = (*empty)->alloc();
  auto live = (*busy)->alloc();
  ASSERT_TRUE(e && live);
  ASSERT_TRUE((*empty)->free(*e));
  const uint64_t chunk = (*empty)->chunk_bytes();
  ASSERT_EQ(chunk, kOwn);
  ASSERT_EQ(ctx_->buffers().stats().slab_bytes_in_use, 0u) << "chunks above slab_max have mappings of their own";
  ASSERT_TRUE(ctx_->destroy_pool(*empty));
  ASSERT_TRUE(ctx_->destroy_pool(*busy));
  EXPECT_TRUE(device_reaches(e->iova, e->vaddr)) << "a recycled chunk keeps its mapping";
  EXPECT_TRUE(device_reaches(live->iova, live->vaddr));
  ctx_->buffers().trim(true);
  ASSERT_TRUE(ctx_->flush());
  EXPECT_FALSE(device_reaches(e->iova, e->vaddr)) << "retired and flushed like a buffer";
  EXPECT_TRUE(device_reaches(live->iova, live->vaddr)) << "a chunk with a live block is never unmapped";
  // Nor handed out again: new buffers of the chunk's size land elsewhere.
  for (int i = 0; i < 4; ++i) {
    auto b = buffer(chunk);
    const auto* lo = static_cast<const char*>(b.vaddr());
    const auto* blk = static_cast<const char*>(live->vaddr);
    EXPECT_FALSE(blk >= lo && blk < lo + chunk) << "the abandoned chunk went to a new owner";
  }
}

// caller mapping: unmapped before dmakit_mem_unmap returns.
TEST_F(DmaContract, CallerMappingIsUnreachableWhenUnmapReturns) {
  make({});
  alignas(4096) static char region[8192];
  auto iova = ctx_->map_memory(region, sizeof region, iommu::kReadWrite);
  ASSERT_TRUE(iova) << iova.error().what();
  EXPECT_TRUE(device_reaches(*iova, region));
  ASSERT_TRUE(ctx_->unmap_memory(region));
  EXPECT_FALSE(device_reaches(*iova, region));
}

// any, strict arena: a retired range is unmapped inside the free, and its
// memory may have a new owner after the free.
TEST_F(DmaContract, StrictArenaUnmapsRetiredRangesInsideTheFree) {
  make({.strict = true, .recycle_high_mb = 0});
  auto b = buffer(kOwn);
  ASSERT_FALSE(b.from_slab());
  const uint64_t iova = b.iova();
  void* va = b.vaddr();
  free_buffer(b);
  EXPECT_FALSE(device_reaches(iova, va));
  EXPECT_EQ(ctx_->buffers().stats().pending_flush_bytes, 0u) << "back to its source at the free";
  EXPECT_EQ(ctx_->arena().stats().stale_pages, 0u);
}

// ... while recycled buffers, in strict mode too, keep their mapping (the
// recycler is above the arena).
TEST_F(DmaContract, StrictArenaStillRecyclesBuffersMapped) {
  make({.strict = true});
  auto b = buffer(kOwn);
  ASSERT_FALSE(b.from_slab());
  const uint64_t iova = b.iova();
  void* va = b.vaddr();
  free_buffer(b);
  EXPECT_TRUE(device_reaches(iova, va));
  auto next = buffer(kOwn);
  EXPECT_TRUE(next.recycled());
  EXPECT_EQ(next.vaddr(), va);
}

}  // namespace
