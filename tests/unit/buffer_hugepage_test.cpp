// BufferAllocator on real EAL hugepages (--in-memory), simulated domain.
// Needs root: reserves 2 MiB pages on demand through nr_overcommit_hugepages
// and puts the old value back at exit. The EAL starts once per process, so
// this is its own binary (the no-huge cases are in buffer_allocator_test).
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>

#include "alloc_buffer/buffer_allocator.hpp"
#include "base/fault_inject.hpp"
#include "base/eal.hpp"
#include "buffer_support.hpp"
#include "hugepage_reservation.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"

using namespace dmakit;
using namespace dmakit::alloc_buffer;

namespace {

constexpr uint64_t K = 1024, M = 1024 * 1024;
constexpr uint64_t kPages = 48;  // 96 MiB on demand

class HugepageEnv : public ::testing::Environment {
 public:
  void SetUp() override {
    ASSERT_EQ(::geteuid(), 0u) << "this test reserves hugepages and must run as root";
    reservation_ = std::make_unique<test::HugepageReservation>(kPages);
    ASSERT_TRUE(reservation_->ok()) << "could not set " << test::HugepageReservation::kOvercommit;
    base::EalSettings e;
    e.mode = "huge";
    auto r = base::ensure_eal(e);
    ASSERT_TRUE(r) << r.error().what();
    ASSERT_TRUE((*r)->hugepages);
  }
  void TearDown() override { reservation_.reset(); }

 private:
  std::unique_ptr<test::HugepageReservation> reservation_;
};

const auto* const g_env = ::testing::AddGlobalTestEnvironment(new HugepageEnv);

class HugeBufferTest : public buftest::RealSourcesTest {
 protected:
  void SetUp() override {
    alloc_buffer::BufferSettings s;
    s.psi = false;
    s.prezero = false;
    make(iommu::ArenaConfig{}, s);
  }
};

// The EAL refusing every memzone (fault point hugepage_memzone): the
// hugepage and carved orders fail, the request is served by the anonymous
// source, and nothing stays taken once the buffer is gone.
TEST_F(HugeBufferTest, MemzoneFailureFallsBackToAnonymousMemory) {
  {
    base::fault::Arm arm(base::fault::Point::hugepage_memzone, 0, ENOMEM, base::fault::Arm::kAlways);
    auto b = alloc_->alloc({.len = 4 * M});
    ASSERT_TRUE(b) << b.error().what();
    EXPECT_GT(arm.fired(), 0u);
    for (const auto& c : b->chunks()) EXPECT_EQ(c.source, "anon-4K");
    EXPECT_GT(alloc_->stats().order_fallbacks, 0u);
  }
  alloc_->trim(true);
  for (const auto* s : alloc_->sources()) EXPECT_EQ(s->stats().live_bytes, 0u) << s->name();
  EXPECT_EQ(sim_->stats().mappings, 0u);
}

TEST_F(HugeBufferTest, EveryOrderFromItsRealSource) {
  EXPECT_EQ(alloc_->orders(), (std::vector<uint64_t>{2 * M, M, 64 * K, 4 * K}));
  auto b = alloc_->alloc({.len = 4 * M + M + 64 * K + 4 * K, .zeroed = true});
  ASSERT_TRUE(b) << b.error().what();
  std::vector<std::string_view> src;
  for (auto& c : b->chunks()) src.push_back(c.source);
  EXPECT_EQ(src, (std::vector<std::string_view>{"hugepage-2M", "hugepage-2M", "carved-1M", "carved-64K", "anon-4K"}));
  uint64_t runs = 1;
  for (size_t i = 0; i < b->chunks().size(); ++i) {
    const BufferChunk& c = b->chunks()[i];
    EXPECT_EQ(c.iova % c.order, 0u);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(c.vaddr) % c.order, 0u);
    if (i > 0 && static_cast<char*>(b->chunks()[i - 1].vaddr) + b->chunks()[i - 1].len != c.vaddr) ++runs;
  }
  EXPECT_EQ(b->mappings(), runs);
  EXPECT_EQ(sim_->stats().mappings, runs);
  EXPECT_LT(runs, b->chunks().size()) << "consecutive pages of one slab share a mapping";
  std::vector<std::byte> out(b->size());
  ASSERT_TRUE(sim_->device_read(b->iova(), out));
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](std::byte x) { return x == std::byte{0}; }));
}

TEST_F(HugeBufferTest, RunsOutOfHugepagesAndFallsBackThenGivesThemBack) {
  std::vector<Buffer> held;
  bool fell_back = false;
  for (int i = 0; i < 64 && !fell_back; ++i) {
    auto b = alloc_->alloc({.len = 4 * M});
    ASSERT_TRUE(b) << b.error().what();
    fell_back = b->chunks().back().source == "anon-4K" && b->chunks().front().order == 4 * K;
    EXPECT_LE(b->attempts(), b->chunks().size() + alloc_->orders().size());
    held.push_back(std::move(*b));
  }
  ASSERT_TRUE(fell_back) << "hugepages never ran out within 256 MiB";
  EXPECT_GE(alloc_->stats().order_fallbacks, 1u);
  held.clear();
  alloc_->trim(true);
  for (const MemorySource* s : alloc_->sources()) {
    EXPECT_EQ(s->stats().live_bytes, 0u) << s->name();
    EXPECT_EQ(s->stats().reserved_bytes, 0u) << s->name() << ": slab not released";
  }
}

}  // namespace
