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

struct Mode {
  bool strict = false;
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
  auto b = buffer(16 * K);
  const uint64_t iova = b.iova();
  void* va = b.vaddr();
  free_buffer(b);
  EXPECT_TRUE(device_reaches(iova, va)) << "the recycler keeps the mapping";
  auto next = buffer(16 * K);
  EXPECT_TRUE(next.recycled());
  EXPECT_EQ(next.vaddr(), va) << "a new owner while the device can reach it";
  EXPECT_EQ(next.iova(), iova);
}

// buffer, retired: reachable until the arena flushes its IOVA range; the
// memory gets no new owner before that flush returned.
TEST_F(DmaContract, RetiredBufferIsReachableUntilTheFlushAndOnlyThenReused) {
  make({.recycle_high_mb = 0});
  auto b = buffer(16 * K);
  const uint64_t iova = b.iova();
  void* va = b.vaddr();
  free_buffer(b);
  EXPECT_TRUE(device_reaches(iova, va)) << "lazy: the stale range stays mapped";
  EXPECT_EQ(ctx_->buffers().stats().pending_flush_bytes, 16 * K) << "held until the flush";
  auto other = buffer(16 * K);
  EXPECT_NE(other.vaddr(), va) << "memory behind a stale IOVA went to a new owner";
  ASSERT_TRUE(ctx_->flush());
  EXPECT_FALSE(device_reaches(iova, va)) << "dmakit_ctx_flush unmaps every stale range";
  EXPECT_EQ(ctx_->buffers().stats().pending_flush_bytes, 0u);
}

// The stale window is bounded by arena.stale_max_pages ...
TEST_F(DmaContract, StaleWindowEndsAtTheStalePageBound) {
  make({.recycle_high_mb = 0, .stale_max_pages = 8});
  auto first = buffer(16 * K);  // 4 pages
  const uint64_t iova = first.iova();
  void* va = first.vaddr();
  // All buffers from one thread: one shard, whose stale pages count up.
  auto second = buffer(16 * K);
  free_buffer(first);
  EXPECT_TRUE(device_reaches(iova, va)) << "4 stale pages, below the bound";
  free_buffer(second);  // 8 stale pages: the bound
  EXPECT_FALSE(device_reaches(iova, va)) << "the shard flushed at stale_max_pages";
}

// ... and by arena.stale_max_age_ms, given kStaleAgeCheckEvery operations on
// the shard. The buffers below stay allocated, so that the freed memory and
// its IOVA cannot reappear under a new owner and fool the check.
TEST_F(DmaContract, StaleWindowEndsAtTheStaleAgeBound) {
  base::ManualClock clock;
  make({.recycle_high_mb = 0, .stale_max_age_ms = 50});
  auto b = buffer(16 * K);
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

// pool chunk (pool destroyed): an empty chunk is freed like a buffer
// (recycled: reachable, and the next buffer of its size may get it); a chunk
// that still holds an allocated block never gets a new owner and stays mapped.
TEST_F(DmaContract, DestroyedPoolsChunksAreFreedAsBuffersExceptThoseWithLiveBlocks) {
  make({});
  auto empty = ctx_->create_pool("empty", 64, 64, 0);
  auto busy = ctx_->create_pool("busy", 64, 64, 0);
  ASSERT_TRUE(empty && busy);
  auto e = (*empty)->alloc();
  auto live = (*busy)->alloc();
  ASSERT_TRUE(e && live);
  ASSERT_TRUE((*empty)->free(*e));
  const uint64_t chunk = (*empty)->chunk_bytes();
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
  auto b = buffer(16 * K);
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
  auto b = buffer(16 * K);
  const uint64_t iova = b.iova();
  void* va = b.vaddr();
  free_buffer(b);
  EXPECT_TRUE(device_reaches(iova, va));
  auto next = buffer(16 * K);
  EXPECT_EQ(next.vaddr(), va);
}

}  // namespace
