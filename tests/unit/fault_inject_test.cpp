// Every external call the library makes, failing: each fault point of
// base/fault_inject.hpp is armed with the errno the real call gives, and
// the test checks that the error reaches the caller naming the call and the
// errno's text, and that mappings, pinned (committed) memory, IOVA pages and
// file descriptors are back at their baseline. The EAL's own start is in
// eal_fault_test.cpp (a process starts the EAL once).
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>

#include "nohuge_eal.hpp"
#include "alloc_buffer/buffer_allocator.hpp"
#include "base/eal.hpp"
#include "base/fault_inject.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"

using namespace dmakit;
using base::fault::Arm;
using base::fault::Point;

namespace {

constexpr uint64_t K = 1024;

// "what() names every part".
::testing::AssertionResult names(const Error& e, std::initializer_list<std::string> parts) {
  const std::string m = e.what();
  for (const auto& p : parts)
    if (m.find(p) == std::string::npos) return ::testing::AssertionFailure() << "'" << p << "' not in: " << m;
  return ::testing::AssertionSuccess();
}

size_t open_fds() {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

TEST(FaultInject, NthCallFailsForTimesCallsAndDisarmsWithItsScope) {
  EXPECT_EQ(base::fault::inject(Point::sim_map), 0) << "nothing armed";
  {
    Arm a(Point::sim_map, 2, ENOMEM, 2);
    EXPECT_EQ(base::fault::inject(Point::sim_unmap), 0) << "another point";
    EXPECT_EQ(base::fault::inject(Point::sim_map), 0);
    EXPECT_EQ(base::fault::inject(Point::sim_map), 0);
    EXPECT_EQ(base::fault::inject(Point::sim_map), ENOMEM);
    EXPECT_EQ(base::fault::inject(Point::sim_map), ENOMEM);
    EXPECT_EQ(base::fault::inject(Point::sim_map), 0);
    EXPECT_EQ(a.calls(), 5u);
    EXPECT_EQ(a.fired(), 2u);
  }
  EXPECT_EQ(base::fault::inject(Point::sim_map), 0);
  EXPECT_EQ(base::fault::name(Point::anon_commit_mprotect), "anon_commit_mprotect");
}

// --- simulated type1 ioctls -------------------------

std::unique_ptr<iommu::SimDomain> sim() {
  auto d = iommu::SimDomain::create();
  EXPECT_TRUE(d) << d.error().what();
  return std::move(*d);
}

TEST(FaultInject, SimMapFailureIsTheCallersAndLeavesNothingMapped) {
  auto d = sim();
  alignas(4096) static char page[4096];
  {
    Arm a(Point::sim_map, 0, ENOMEM);
    auto st = d->map(page, 0x100000, 4096, iommu::kReadWrite);
    ASSERT_FALSE(st);
    EXPECT_EQ(st.error().code, Errc::no_memory);
    EXPECT_TRUE(names(st.error(), {"VFIO_IOMMU_MAP_DMA", "0x100000", std::strerror(ENOMEM)}));
  }
  EXPECT_EQ(d->stats().mappings, 0u);
  EXPECT_FALSE(d->translate_host(page)) << "a refused map must not translate";
  EXPECT_TRUE(d->map(page, 0x100000, 4096, iommu::kReadWrite)) << "the same map works once the fault is gone";
  EXPECT_TRUE(d->unmap(0x100000, 4096));
}

// A lazily freed range whose unmap fails stays stale (never handed out
// again); flush() reports the unmap, and a later flush unmaps it.
TEST(FaultInject, SimUnmapFailureKeepsTheRangeStaleUntilAFlushSucceeds) {
  for (bool strict : {false, true}) {
    SCOPED_TRACE(strict ? "strict" : "lazy");
    auto d = sim();
    iommu::ArenaConfig cfg;
    cfg.strict = strict;
    auto arena = iommu::IovaArena::create(*d, cfg);
    ASSERT_TRUE(arena);
    iommu::IovaArena& a = **arena;
    alignas(4096) static char page[4096];
    auto r = a.alloc({4096, 0, ~0ull});
    ASSERT_TRUE(r);
    ASSERT_TRUE(d->map(page, r->iova, 4096, iommu::kReadWrite));
    {
      Arm arm(Point::sim_unmap, 0, EBUSY);
      Status st = strict ? a.free(*r) : (a.free(*r) ? a.flush() : Status(fail(Errc::internal, "free refused")));
      ASSERT_FALSE(st);
      EXPECT_EQ(st.error().code, Errc::busy);
      EXPECT_TRUE(names(st.error(), {"VFIO_IOMMU_UNMAP_DMA", std::strerror(EBUSY)}));
      EXPECT_EQ(arm.fired(), 1u);
    }
    EXPECT_EQ(a.stats().stale_pages, 1u) << "kept reserved: the device may still reach it";
    EXPECT_EQ(a.stats().flush_errors, 1u);
    EXPECT_TRUE(d->translate(r->iova, 4096, iommu::kRead)) << "still mapped";
    EXPECT_TRUE(a.flush());
    EXPECT_EQ(a.stats().stale_pages, 0u);
    EXPECT_EQ(a.stats().pages_in_use, 0u);
    EXPECT_EQ(d->stats().mappings, 0u);
    EXPECT_TRUE(a.check());
  }
}

// --- the anonymous memory source -------------------------------------------

class AnonFaults : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { testing_support::start_nohuge_eal(); }
  void SetUp() override {
    domain_ = sim();
    auto a = iommu::IovaArena::create(*domain_, iommu::ArenaConfig{});
    ASSERT_TRUE(a);
    arena_ = std::move(*a);
  }
  // A fresh allocator whose only source is a fresh anonymous 4K source (so
  // its first take reserves a region). slab_max = 0: every buffer is built
  // from the source on its own; else small buffers come from slabs, built
  // from the source as one run each.
  void make(bool psi = false, uint64_t slab_max = 0) {
    std::vector<std::unique_ptr<alloc_buffer::MemorySource>> v;
    auto s = alloc_buffer::make_anon_source(4 * K, true);
    ASSERT_TRUE(s);
    source_ = s->get();
    v.push_back(std::move(*s));
    alloc_buffer::BufferSettings bs;
    bs.psi = psi;
    bs.prezero = false;
    bs.orders = "4K";
    bs.slab_max = slab_max;
    auto made = alloc_buffer::create_buffer_allocator(*arena_, bs, std::move(v));
    ASSERT_TRUE(made) << made.error().what();
    alloc_ = std::move(*made);
  }
  // Everything back: no live or recycled buffer, no committed memory, no IOVA, no mapping.
  void expect_baseline(uint64_t kept_bytes = 0) {
    alloc_->trim(true);
    EXPECT_EQ(alloc_->stats().bytes_live, 0u);
    EXPECT_EQ(source_->stats().live_bytes, kept_bytes);
    EXPECT_EQ(arena_->stats().pages_in_use, 0u);
    EXPECT_EQ(arena_->stats().stale_pages, 0u);
    EXPECT_EQ(domain_->stats().mappings, 0u);
  }
  // A buffer of 16K with `point` failing as errno `err`: the error names `call`.
  void expect_alloc_fails(Point point, int err, Errc code, std::initializer_list<std::string> call,
                          uint64_t times = 1) {
    make();
    Arm a(point, 0, err, times);
    auto b = alloc_->alloc({.len = 16 * K});
    ASSERT_FALSE(b) << base::fault::name(point);
    EXPECT_EQ(b.error().code, code) << b.error().what();
    EXPECT_TRUE(names(b.error(), call));
    EXPECT_TRUE(names(b.error(), {std::strerror(err)}));
    EXPECT_EQ(a.fired(), times == 1 ? 1u : a.calls());
    expect_baseline();
  }
  // The same point failing on every call while a slab for a 16K buffer is
  // built (each smaller slab tried fails too): the error says it was the
  // slab and names `call`, nothing stays taken; disarmed, the slab builds.
  void expect_slab_fails(Point point, int err, std::initializer_list<std::string> call) {
    make(false, 1024 * K);
    {
      Arm a(point, 0, err, Arm::kAlways);
      auto b = alloc_->alloc({.len = 16 * K});
      ASSERT_FALSE(b) << base::fault::name(point);
      EXPECT_EQ(b.error().code, Errc::no_memory) << b.error().what();
      EXPECT_TRUE(names(b.error(), {"slab"}));
      EXPECT_TRUE(names(b.error(), call));
      EXPECT_TRUE(names(b.error(), {std::strerror(err)}));
      EXPECT_GE(a.fired(), 1u);
      EXPECT_EQ(a.fired(), a.calls());
      EXPECT_EQ(alloc_->stats().slabs, 0u);
      expect_baseline();
    }
    auto b = alloc_->alloc({.len = 16 * K});
    ASSERT_TRUE(b) << b.error().what();
    EXPECT_TRUE(b->from_slab());
    b = Result<alloc_buffer::Buffer>(fail(Errc::internal, "freed"));
    expect_baseline();
    EXPECT_EQ(alloc_->stats().slabs, 0u) << "trim retires the wholly free slab";
  }
  std::unique_ptr<iommu::SimDomain> domain_;
  std::unique_ptr<iommu::IovaArena> arena_;
  std::unique_ptr<alloc_buffer::BufferAllocator> alloc_;
  alloc_buffer::MemorySource* source_ = nullptr;
};

TEST_F(AnonFaults, ReserveMmapFails) {
  // Every size down to the smallest region fails (the source halves it on each refusal).
  expect_alloc_fails(Point::anon_reserve_mmap, ENOMEM, Errc::no_memory, {"reserving", "address space"}, Arm::kAlways);
}
TEST_F(AnonFaults, CommitMprotectFails) {
  expect_alloc_fails(Point::anon_commit_mprotect, ENOMEM, Errc::no_memory, {"committing"});
}
TEST_F(AnonFaults, MadviseDontforkFails) {
  expect_alloc_fails(Point::anon_madvise_dontfork, EINVAL, Errc::no_memory, {"madvise(MADV_DONTFORK)"});
}
TEST_F(AnonFaults, MadvisePopulateFails) {
  expect_alloc_fails(Point::anon_madvise_populate, EFAULT, Errc::no_memory, {"populating"});
}

TEST_F(AnonFaults, SlabGrowthReserveMmapFails) {
  expect_slab_fails(Point::anon_reserve_mmap, ENOMEM, {"reserving", "address space"});
}
TEST_F(AnonFaults, SlabGrowthCommitMprotectFails) {
  expect_slab_fails(Point::anon_commit_mprotect, ENOMEM, {"committing"});
}
TEST_F(AnonFaults, SlabGrowthMadviseDontforkFails) {
  expect_slab_fails(Point::anon_madvise_dontfork, EINVAL, {"madvise(MADV_DONTFORK)"});
}
TEST_F(AnonFaults, SlabGrowthMadvisePopulateFails) {
  expect_slab_fails(Point::anon_madvise_populate, EFAULT, {"populating"});
}

TEST_F(AnonFaults, SimMapFailureGivesTheMemoryBack) {
  make();
  Arm a(Point::sim_map, 0, ENOMEM, Arm::kAlways);
  auto b = alloc_->alloc({.len = 16 * K});
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code, Errc::no_memory);
  EXPECT_TRUE(names(b.error(), {"VFIO_IOMMU_MAP_DMA", std::strerror(ENOMEM)}));
  expect_baseline();
}

// give() cannot put PROT_NONE over the run: the memory stays committed and
// taken (never handed out again), the rest of the free goes on.
TEST_F(AnonFaults, ReleaseMmapFailureKeepsTheRunCommitted) {
  make();
  {
    auto b = alloc_->alloc({.len = 16 * K});
    ASSERT_TRUE(b);
    Arm a(Point::anon_release_mmap, 0, ENOMEM);
    b = Result<alloc_buffer::Buffer>(fail(Errc::internal, "freed"));
    alloc_->trim(true);
    EXPECT_EQ(a.fired(), 1u);
  }
  expect_baseline(16 * K);
}

TEST_F(AnonFaults, PressureEventfdFailureCostsOnlyThePressureTrigger) {
  const bool psi_here = std::filesystem::exists("/proc/pressure/memory");
  const size_t fds = open_fds();
  {
    Arm a(Point::allocator_eventfd, 0, EMFILE);
    make(true);
    EXPECT_FALSE(alloc_->stats().psi_armed);
    EXPECT_EQ(a.fired(), psi_here ? 1u : 0u) << "reached only where the kernel offers PSI";
    auto b = alloc_->alloc({.len = 16 * K});
    EXPECT_TRUE(b) << "the allocator works without the trigger";
  }
  alloc_.reset();
  EXPECT_EQ(open_fds(), fds) << "the PSI file is closed";
}

}  // namespace
