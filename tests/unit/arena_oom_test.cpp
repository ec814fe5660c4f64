// IovaArena when memory for its bitmaps runs out: the bitmaps grow on first
// use of a part of the IOVA space, and a request that needs them to grow
// when no memory is left fails with Errc::no_memory and changes nothing;
// parts already in use keep working, and the same request succeeds once
// memory is there again.
#include <gtest/gtest.h>

#include <vector>

#include "failing_new.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"

namespace dmakit::iommu {
namespace {

constexpr uint64_t K4 = 4096;

TEST(IovaArenaOom, GrowingTheBitmapsFailsCleanly) {
  SimConfig sc;
  sc.address_bits = 48;
  auto d = SimDomain::create(sc);
  ASSERT_TRUE(d) << d.error().what();
  // One shard and no large one, so the request has one place to go.
  ArenaConfig cfg;
  cfg.shards = 1;
  cfg.large_share = 0;
  cfg.iova_start = 1ull << 40;
  cfg.iova_end = (1ull << 40) + (1ull << 44) - 1;
  cfg.stale_max_pages = 0;
  cfg.stale_max_age = std::chrono::milliseconds(0);
  auto a = IovaArena::create(**d, cfg);
  ASSERT_TRUE(a) << a.error().what();
  IovaArena& arena = **a;
  auto first = arena.alloc(IovaRequest{K4});
  ASSERT_TRUE(first) << first.error().what();
  const ArenaStats before = arena.stats();

  // 1 GiB aligned to 1 TiB: a part of the space no allocation touched yet.
  const IovaRequest far{1ull << 30, 1ull << 40};
  oomtest::fail_allocation(0);
  auto refused = arena.alloc(far);
  const bool fired = oomtest::disarm();
  ASSERT_TRUE(fired) << "the request allocated nothing: its bitmaps were there already";
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::no_memory) << refused.error().what();
  EXPECT_NE(refused.error().message.find("bitmaps"), std::string::npos) << refused.error().message;
  const ArenaStats after = arena.stats();
  EXPECT_EQ(after.pages_in_use, before.pages_in_use);
  EXPECT_EQ(after.bitmap_bytes, before.bitmap_bytes);
  EXPECT_EQ(after.failures, before.failures + 1);
  ASSERT_TRUE(arena.check());

  // The part in use needs no memory; the far range comes once memory does.
  oomtest::fail_allocation(0);
  auto near = arena.alloc(IovaRequest{K4});
  oomtest::disarm();
  ASSERT_TRUE(near) << near.error().what();
  auto later = arena.alloc(far);
  ASSERT_TRUE(later) << later.error().what();
  EXPECT_EQ(later->iova % (1ull << 40), 0u);
  EXPECT_GT(arena.stats().bitmap_bytes, before.bitmap_bytes);
  for (const IovaSpan& s : {*first, *near, *later}) ASSERT_TRUE(arena.free(s));
  ASSERT_TRUE(arena.flush());
  ASSERT_TRUE(arena.check());
  EXPECT_EQ(arena.stats().pages_in_use, 0u);
}

}  // namespace
}  // namespace dmakit::iommu
