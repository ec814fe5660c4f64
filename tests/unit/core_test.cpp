// The top floor: Context wiring and the C API, on the
// simulated IOMMU with real EAL memory (4 KiB pages: this process does not
// reserve hugepages).
#include <gtest/gtest.h>

#include <cstring>

#include "alloc_buffer/buffer_allocator.hpp"
#include "child_process.hpp"
#include "core/context.hpp"
#include "sim_config.hpp"
#include "dmakit/dmakit.h"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"
#include "pool/dma_pool.hpp"

using namespace dmakit;

using testing_support::sim_config;

// A Context on a 48-bit IOMMU in a process whose address space is capped
// (RLIMIT_AS counts every mapping, as strict overcommit charges every
// writable one): the arena's bookkeeping follows use, so the context starts,
// and buffers and pool blocks work, with 1 GiB to spare for everything.
TEST(Context, StartsOnA48BitIommuWithLittleAddressSpace) {
  using R = std::pair<int, std::string>;
  auto [code, msg] = testing_child::run_in_child([]() -> R {
    core::Config c = sim_config();
    c.iommu.sim_address_bits = 48;
    c.eal.memory_mb = 64;
    if (!testing_child::limit_address_space(1ull << 30)) return R(1, "setrlimit");
    auto ctx = core::Context::create(c);
    if (!ctx) return R(2, ctx.error().what());
    alloc_buffer::BufferRequest req;
    req.len = 1 << 20;
    req.zeroed = true;
    auto buf = (*ctx)->buffers().alloc(req);
    if (!buf) return R(3, buf.error().what());
    auto pool = (*ctx)->create_pool("sqe", 64, 64, 0);
    if (!pool) return R(4, pool.error().what());
    auto blk = (*pool)->alloc();
    if (!blk) return R(5, blk.error().what());
    if (auto st = (*pool)->free(blk->vaddr, blk->iova); !st) return R(6, st.error().what());
    const auto arena = (*ctx)->buffers().arena().stats();
    if (arena.total_pages < (1ull << 35)) return R(7, "the arena does not cover the 48-bit window");
    return R(0, std::to_string(arena.bitmap_bytes));
  });
  ASSERT_EQ(code, 0) << msg;
  EXPECT_LT(std::stoull(msg), 4ull << 20) << "bytes of arena bookkeeping";
}

TEST(Context, WiresTheLayersOnTheSimulatedIommu) {
  auto ctx = core::Context::create(sim_config());
  ASSERT_TRUE(ctx) << ctx.error().what();
  EXPECT_EQ((*ctx)->backend(), "sim");
  auto* sim = dynamic_cast<iommu::SimDomain*>(&(*ctx)->domain());
  ASSERT_NE(sim, nullptr);

  alloc_buffer::BufferRequest req;
  req.len = 3 * 4096 + 100;
  req.zeroed = true;
  auto buf = (*ctx)->buffers().alloc(req);
  ASSERT_TRUE(buf) << buf.error().what();
  ASSERT_GE(buf->size(), req.len);
  std::memset(buf->at(0), 0xab, 64);
  // The device reaches the buffer's first bytes at its IOVA.
  auto view = sim->translate(buf->iova(), 64, iommu::kRead);
  ASSERT_TRUE(view) << view.error().what();
  EXPECT_EQ(std::to_integer<int>((*view)[63]), 0xab);

  auto pool = (*ctx)->create_pool("sqe", 64, 64, 0);
  ASSERT_TRUE(pool) << pool.error().what();
  auto dup = (*ctx)->create_pool("sqe", 64, 64, 0);
  ASSERT_FALSE(dup);
  EXPECT_EQ(dup.error().code, Errc::exists);
  auto blk = (*pool)->alloc();
  ASSERT_TRUE(blk);
  EXPECT_EQ(blk->iova % 64, 0u);
  ASSERT_TRUE((*pool)->free(blk->vaddr, blk->iova));
  auto stats = (*ctx)->pool_stats();
  ASSERT_EQ(stats.size(), 1u);
  EXPECT_EQ(stats[0].name, "sqe");
  EXPECT_EQ(stats[0].active, 0u);
}

TEST(Context, BadBackendSettingsAreClearErrors) {
  auto c = sim_config();
  c.iommu.backend = "vfio";
  auto ctx = core::Context::create(c);
  ASSERT_FALSE(ctx);
  EXPECT_NE(ctx.error().message.find("iommu.devices"), std::string::npos) << ctx.error().message;

  c.iommu.devices = "0000:00:03.0";  // this host has no VFIO
  ctx = core::Context::create(c);
  ASSERT_FALSE(ctx);
  EXPECT_NE(ctx.error().what().find("0000:00:03.0"), std::string::npos) << ctx.error().what();

  c = sim_config();
  c.iommu.sim_page_sizes = "4K,3K";
  ctx = core::Context::create(c);
  ASSERT_FALSE(ctx);
  EXPECT_NE(ctx.error().message.find("iommu.sim_page_sizes"), std::string::npos) << ctx.error().message;
}

TEST(CApi, BuffersAndPoolsWithErrorsAsCodes) {
  const char* args[] = {"--iommu.backend", "sim", "--eal.mode", "nohuge", "--eal.memory_mb", "256"};
  dmakit_ctx* ctx = nullptr;
  ASSERT_EQ(dmakit_ctx_create(nullptr, 6, args, &ctx), DMAKIT_OK) << dmakit_last_error();

  dmakit_buffer* buf = nullptr;
  ASSERT_EQ(dmakit_buffer_alloc(ctx, 65536, 0, DMAKIT_BUF_ZEROED, UINT64_MAX, &buf), DMAKIT_OK) << dmakit_last_error();
  EXPECT_GE(dmakit_buffer_size(buf), 65536u);
  auto* p = static_cast<unsigned char*>(dmakit_buffer_at(buf, 65535));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(*p, 0);
  dmakit_buffer_free(buf);

  dmakit_pool* pool = nullptr;
  ASSERT_EQ(dmakit_pool_create(ctx, "prp", 4096, 4096, 0, &pool), DMAKIT_OK) << dmakit_last_error();
  void* va = nullptr;
  uint64_t iova = 0;
  ASSERT_EQ(dmakit_pool_alloc(pool, &va, &iova), DMAKIT_OK);
  EXPECT_EQ(iova % 4096, 0u);
  EXPECT_EQ(dmakit_pool_free(pool, va, iova), DMAKIT_OK);
  EXPECT_EQ(dmakit_pool_free(pool, va, iova), DMAKIT_ECORRUPTED) << "double free must be refused";
  EXPECT_NE(std::strlen(dmakit_last_error()), 0u);
  dmakit_pool_destroy(pool);

  EXPECT_EQ(dmakit_pool_create(ctx, "bad", 100, 3, 0, &pool), DMAKIT_EINVAL);
  EXPECT_NE(std::string(dmakit_last_error()).find("3"), std::string::npos) << dmakit_last_error();
  dmakit_ctx_destroy(ctx);

  const char* bad[] = {"--arena.shards", "7"};
  EXPECT_EQ(dmakit_ctx_create(nullptr, 2, bad, &ctx), DMAKIT_EINVAL);
  EXPECT_NE(std::string(dmakit_last_error()).find("arena.shards"), std::string::npos) << dmakit_last_error();
  EXPECT_EQ(ctx, nullptr);
}
