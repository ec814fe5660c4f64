// The public C++ API (include/dmakit/dmakit.hpp) as a driver uses it: only
// the public header is included here.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstring>
#include <vector>

#include "dmakit/dmakit.hpp"

namespace {

dmakit::Result<dmakit::Context> sim_context() {
  dmakit_settings s;
  dmakit_settings_init(&s);
  s.backend = "sim";
  s.eal_mode = "nohuge";
  return dmakit::Context::create(s);
}

}  // namespace

TEST(CxxApi, BuffersPoolsTranslationAndCallerMemory) {
  auto ctx = sim_context();
  ASSERT_TRUE(ctx) << ctx.error().what();
  EXPECT_EQ(ctx->backend(), "sim");

  auto buf = ctx->alloc_buffer(3 << 20, {.align = 2 << 20, .zeroed = true, .dma_limit = 0xffffffff});
  ASSERT_TRUE(buf) << buf.error().what();
  EXPECT_EQ(buf->iova() % (2 << 20), 0u);
  EXPECT_EQ(buf->size(), 3u << 20);
  auto segs = buf->segments();
  ASSERT_TRUE(segs) << segs.error().what();
  uint64_t covered = 0;
  for (const auto& s : *segs) {
    EXPECT_EQ(static_cast<unsigned char*>(s.vaddr)[s.len - 1], 0);
    auto t = ctx->vtophys(s.vaddr);
    ASSERT_TRUE(t) << t.error().what();
    EXPECT_EQ(t->iova, s.iova);
    EXPECT_GE(t->len, s.len);
    covered += s.len;
  }
  EXPECT_EQ(covered, 3u << 20);

  auto pool = ctx->create_pool("sgl", 68, 32, 4096);
  ASSERT_TRUE(pool) << pool.error().what();
  std::vector<dmakit::Block> blocks;
  for (int i = 0; i < 1000; ++i) {
    auto b = pool->alloc();
    ASSERT_TRUE(b) << b.error().what();
    EXPECT_EQ(b->iova % 32, 0u);
    EXPECT_EQ(b->iova / 4096, (b->iova + 67) / 4096) << "crosses a 4096 boundary";
    blocks.push_back(*b);
  }
  for (const auto& b : blocks) ASSERT_TRUE(pool->free(b));
  auto again = pool->free(blocks.front());
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, dmakit::Errc::corrupted);
  EXPECT_FALSE(again.error().message.empty());
  auto zero = pool->alloc_zeroed();
  ASSERT_TRUE(zero);
  EXPECT_EQ(static_cast<unsigned char*>(zero->vaddr)[67], 0);
  ASSERT_TRUE(pool->free(*zero));
  auto ps = pool->stats();
  ASSERT_TRUE(ps);
  EXPECT_EQ(ps->active, 0u);
  EXPECT_EQ(ps->validation_failures, 1u);

  void* mem = ::mmap(nullptr, 1 << 16, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  auto iova = ctx->map_memory(mem, 1 << 16);
  ASSERT_TRUE(iova) << iova.error().what();
  auto t = ctx->vtophys(static_cast<char*>(mem) + 12345);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->iova, *iova + 12345);
  ASSERT_TRUE(ctx->unmap_memory(mem));
  EXPECT_FALSE(ctx->vtophys(mem));
  ::munmap(mem, 1 << 16);

  auto st = ctx->stats();
  ASSERT_TRUE(st);
  EXPECT_EQ(st->buffers_live, 1u + ps->chunks) << "the buffer and one buffer per pool chunk";
  EXPECT_EQ(st->pools, 1u);
  ASSERT_TRUE(buf->free());
  ASSERT_TRUE(ctx->flush());
}

TEST(CxxApi, ErrorsAreValuesWithMessages) {
  auto ctx = sim_context();
  ASSERT_TRUE(ctx) << ctx.error().what();
  auto bad = ctx->alloc_buffer(4096, {.align = 3});
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, dmakit::Errc::invalid_argument);
  EXPECT_NE(bad.error().what().find("alignment 3"), std::string::npos) << bad.error().what();
  auto none = ctx->alloc_buffer(4096, {.device_read = false, .device_write = false});
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, dmakit::Errc::invalid_argument);

  const std::vector<std::string> overrides = {"--arena.strict", "maybe"};
  auto c2 = dmakit::Context::create("", overrides);
  ASSERT_FALSE(c2);
  EXPECT_NE(c2.error().message.find("arena.strict"), std::string::npos) << c2.error().message;

  // A Pool that outlives its Context holds a stale handle: refused, no crash.
  dmakit::Pool orphan;
  {
    auto ctx2 = sim_context();
    ASSERT_TRUE(ctx2);
    auto p = ctx2->create_pool("orphan", 64, 64);
    ASSERT_TRUE(p);
    orphan = std::move(*p);
  }
  auto b = orphan.alloc();
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code, dmakit::Errc::invalid_argument);
}

// Pools honour every power-of-two alignment they accept: a block's host
// address and IOVA are both multiples of it, from the first allocation on
// (on 4 KiB pages, where every chunk is anonymous memory).
TEST(CxxApi, PoolsAlignedAbovePageSizeWorkFromTheFirstBlock) {
  auto ctx = sim_context();
  ASSERT_TRUE(ctx) << ctx.error().what();
  // Odd-sized buffers first, so host memory and IOVAs start off any alignment.
  std::vector<dmakit::Buffer> skew;
  for (uint64_t len : {12288u, 4096u, 20480u}) {
    auto b = ctx->alloc_buffer(len);
    ASSERT_TRUE(b) << b.error().what();
    skew.push_back(std::move(*b));
  }
  for (size_t align = 8 << 10; align <= (1 << 20); align <<= 1) {
    auto pool = ctx->create_pool("aligned-" + std::to_string(align), 512, align);
    ASSERT_TRUE(pool) << pool.error().what();
    std::vector<dmakit::Block> got;
    for (int i = 0; i < 10; ++i) {
      auto b = pool->alloc();
      ASSERT_TRUE(b) << "align " << align << ", block " << i << ": " << b.error().what();
      EXPECT_EQ(reinterpret_cast<uintptr_t>(b->vaddr) % align, 0u);
      EXPECT_EQ(b->iova % align, 0u);
      got.push_back(*b);
    }
    for (const auto& b : got) ASSERT_TRUE(pool->free(b));
  }
}

// The exposure model through the C++ header: small buffers share a slab
// mapping by default; with buffer_isolation each has its own.
TEST(CxxApi, IsolationSettingGivesEachBufferItsMapping) {
  for (int isolation : {0, 1}) {
    dmakit_settings s;
    dmakit_settings_init(&s);
    s.backend = "sim";
    s.eal_mode = "nohuge";
    s.buffer_isolation = isolation;
    auto ctx = dmakit::Context::create(s);
    ASSERT_TRUE(ctx) << ctx.error().what();
    auto before = ctx->stats();
    ASSERT_TRUE(before);
    std::vector<dmakit::Buffer> held;
    for (int i = 0; i < 4; ++i) {
      auto b = ctx->alloc_buffer(4096);
      ASSERT_TRUE(b) << b.error().what();
      held.push_back(std::move(*b));
    }
    auto after = ctx->stats();
    ASSERT_TRUE(after);
    EXPECT_EQ(after->mappings - before->mappings, isolation != 0 ? 4u : 1u) << "isolation " << isolation;
    EXPECT_EQ(after->buffer_slabs, isolation != 0 ? 0u : 1u);
  }
}
