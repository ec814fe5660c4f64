// BufferAllocator on the simulated type1 domain, EAL in --no-huge mode.
// Orders are served by real anonymous memory of each size (2M/1M/64K chunks
// aligned to their size, 4K runs) behind fault-injecting wrappers, so order
// fallback, layout, recycling and every failure path can be driven exactly.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>
#include <unistd.h>

#include "nohuge_eal.hpp"
#include "alloc_buffer/buffer_allocator.hpp"
#include "base/eal.hpp"
#include "buffer_support.hpp"
#include "fault_source.hpp"
#include "child_process.hpp"
#include "alloc_buffer/host_memory.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"
#include "pool/dma_pool.hpp"
#include "base/clock.hpp"

using namespace dmakit;
using namespace dmakit::alloc_buffer;

namespace {

constexpr uint64_t K = 1024, M = 1024 * 1024;

class BufferTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { testing_support::start_nohuge_eal(); }

  void SetUp() override {
    auto d = iommu::SimDomain::create();
    ASSERT_TRUE(d) << d.error().what();
    sim_ = std::move(*d);
    domain_ = std::make_unique<buftest::FailingDomain>(*sim_);
    auto a = iommu::IovaArena::create(*domain_, iommu::ArenaConfig{});
    ASSERT_TRUE(a) << a.error().what();
    arena_ = std::move(*a);
    settings_.psi = false;
    settings_.prezero = false;
    // These tests drive the builder and the recycler (every buffer its own
    // range and mapping); small buffers from slabs are buffer_slab_test's.
    settings_.slab_max = 0;
  }

  void TearDown() override { buftest::destroy_and_expect_nothing_left(alloc_, arena_, sim_); }

  // Sources 2M, 1M, 64K (one chunk per take) and 4K (runs), each wrapped.
  void make(bool scatter4k = false) {
    std::vector<std::unique_ptr<MemorySource>> v;
    for (uint64_t o : {2 * M, 1 * M, 64 * K}) {
      auto s = make_anon_source(o, false);
      ASSERT_TRUE(s);
      v.push_back(std::make_unique<FaultSource>(std::move(*s)));
      fault_.push_back(static_cast<FaultSource*>(v.back().get()));
    }
    if (scatter4k) {
      v.push_back(std::make_unique<FaultSource>(std::make_unique<buftest::ScatterSource>(64)));
    } else {
      auto s = make_anon_source(4 * K, true);
      ASSERT_TRUE(s);
      v.push_back(std::make_unique<FaultSource>(std::move(*s)));
    }
    fault_.push_back(static_cast<FaultSource*>(v.back().get()));
    auto a = create_buffer_allocator(*arena_, settings_, std::move(v));
    ASSERT_TRUE(a) << a.error().what();
    alloc_ = std::move(*a);
  }

  // Source calls on every order so far.
  uint64_t source_calls() const {
    uint64_t n = 0;
    for (auto* f : fault_) n += f->attempts();
    return n;
  }
  uint64_t live() const { return buftest::live_bytes(*alloc_); }

  // Flushes the arena and checks that every chunk went back.
  void expect_all_returned() {
    ASSERT_TRUE(arena_->flush());
    EXPECT_EQ(live(), 0u);
    EXPECT_EQ(alloc_->stats().pending_flush_bytes, 0u);
  }

  std::unique_ptr<iommu::SimDomain> sim_;
  std::unique_ptr<buftest::FailingDomain> domain_;
  std::unique_ptr<iommu::IovaArena> arena_;
  alloc_buffer::BufferSettings settings_;
  std::vector<FaultSource*> fault_;  // 2M, 1M, 64K, 4K
  std::unique_ptr<BufferAllocator> alloc_;
};

// Checks the layout rules: chunks in IOVA order, contiguous from iova(),
// largest first, each chunk on an IOVA aligned to its order.
void expect_layout(const Buffer& b) {
  uint64_t off = 0, prev_order = ~0ull;
  for (const BufferChunk& c : b.chunks()) {
    EXPECT_EQ(c.iova, b.iova() + off) << "IOVA range not contiguous";
    EXPECT_EQ(c.iova % c.order, 0u) << "chunk of order " << c.order << " at IOVA " << c.iova;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(c.vaddr) % c.order, 0u);
    EXPECT_LE(c.order, prev_order) << "larger chunk placed after a smaller one";
    EXPECT_EQ(c.len % c.order, 0u);
    prev_order = c.order;
    off += c.len;
  }
  EXPECT_EQ(off, b.span());
  EXPECT_GE(b.span(), b.size());
}

TEST_F(BufferTest, LargestOrderThatFitsAndLayout) {
  make();
  const uint64_t len = 3 * 2 * M + 1 * M + 2 * 64 * K + 3 * 4 * K - 100;  // tail rounds up to 4K
  auto b = alloc_->alloc({.len = len});
  ASSERT_TRUE(b) << b.error().what();
  ASSERT_EQ(b->chunks().size(), 3u + 1 + 2 + 1);
  const uint64_t orders[] = {2 * M, 2 * M, 2 * M, 1 * M, 64 * K, 64 * K, 4 * K};
  for (size_t i = 0; i < 7; ++i) EXPECT_EQ(b->chunks()[i].order, orders[i]) << i;
  EXPECT_EQ(b->chunks()[6].len, 12 * K) << "the 4K remainder is one run";
  EXPECT_EQ(b->chunks()[0].source, "fault(anon-2M)");
  EXPECT_EQ(b->iova() % (2 * M), 0u);
  expect_layout(*b);
  EXPECT_EQ(b->attempts(), 7u) << "no failure: one call per chunk";
  EXPECT_EQ(source_calls(), 7u);
  EXPECT_EQ(sim_->stats().mappings, b->mappings());
  EXPECT_GE(b->mappings(), 1u);
  EXPECT_LE(b->mappings(), 7u);

  // The device writes at an offset in the fourth chunk; the CPU reads it
  // there, and iova_of maps the host address back.
  const uint64_t off = 6 * M + 12345;
  const char msg[] = "dma-at-offset";
  ASSERT_TRUE(sim_->device_write(b->iova() + off, std::as_bytes(std::span(msg))));
  char* p = static_cast<char*>(b->at(off));
  ASSERT_EQ(p, static_cast<char*>(b->chunks()[3].vaddr) + 12345);
  EXPECT_EQ(std::memcmp(p, msg, sizeof msg), 0);
  EXPECT_EQ(*b->iova_of(p), b->iova() + off);
  EXPECT_EQ(b->at(len), nullptr);
  EXPECT_FALSE(b->iova_of(&len));
}

TEST_F(BufferTest, HugeOrderExhaustedFallsBackWithinBound) {
  make();
  fault_[0]->fail_after(2);  // two 2M chunks, then 2M is exhausted
  const uint64_t len = 9 * M + 64 * K + 8 * K;
  auto b = alloc_->alloc({.len = len});
  ASSERT_TRUE(b) << b.error().what();
  // 2 x 2M, then 2M fails once, 5 x 1M, 1 x 64K, one 8K run.
  std::vector<uint64_t> got;
  for (auto& c : b->chunks()) got.push_back(c.len);
  EXPECT_EQ(got, (std::vector<uint64_t>{2 * M, 2 * M, M, M, M, M, M, 64 * K, 8 * K}));
  EXPECT_EQ(fault_[0]->attempts(), 3u) << "2M never retried after its failure";
  EXPECT_LE(b->attempts(), b->chunks().size() + alloc_->orders().size());
  EXPECT_EQ(b->attempts(), b->chunks().size() + 1);
  EXPECT_EQ(alloc_->stats().order_fallbacks, 1u);
  expect_layout(*b);
  EXPECT_EQ(sim_->stats().mappings, b->mappings());
}

TEST_F(BufferTest, BackoffSkipsAFailedOrder) {
  settings_.backoff_ms = 600000;  // far longer than the test
  make();
  fault_[0]->fail_after(0);
  auto a = alloc_->alloc({.len = 4 * M});
  ASSERT_TRUE(a);
  EXPECT_EQ(a->chunks()[0].order, M);
  EXPECT_EQ(fault_[0]->attempts(), 1u);
  fault_[0]->heal();
  auto b = alloc_->alloc({.len = 4 * M});
  ASSERT_TRUE(b);
  EXPECT_EQ(fault_[0]->attempts(), 1u) << "2M is in back-off: not even asked";
  EXPECT_EQ(b->chunks()[0].order, M);
  EXPECT_EQ(alloc_->stats().backoff_skips, 1u);
  EXPECT_EQ(b->attempts(), 4u);
}

TEST_F(BufferTest, BackoffExpiresAndTheOrderIsProbedAgain) {
  base::ManualClock clock;
  settings_.backoff_ms = 1;
  make();
  fault_[0]->fail_after(0);
  auto a = alloc_->alloc({.len = 4 * M});
  ASSERT_TRUE(a);
  EXPECT_EQ(a->chunks()[0].order, M);
  fault_[0]->heal();
  clock.advance(std::chrono::microseconds(999));
  auto held = alloc_->alloc({.len = 4 * M});
  ASSERT_TRUE(held);
  EXPECT_EQ(fault_[0]->attempts(), 1u) << "2M is still in back-off";
  clock.advance(std::chrono::microseconds(1));  // the 1 ms back-off is over
  auto b = alloc_->alloc({.len = 4 * M});
  ASSERT_TRUE(b);
  EXPECT_EQ(fault_[0]->attempts(), 3u) << "probed again and served";
  EXPECT_EQ(b->chunks().size(), 2u);
  EXPECT_EQ(b->chunks()[0].order, 2 * M);
}

TEST_F(BufferTest, OutOfMemoryEverywhereNamesSizeAndOrders) {
  make();
  for (auto* f : fault_) f->fail_after(0);
  fault_[1]->fail_after(1);  // one 1M chunk is taken, then given back
  auto b = alloc_->alloc({.len = 3 * M + 4 * K});
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code, Errc::no_memory);
  const std::string& m = b.error().message;
  EXPECT_NE(m.find(std::to_string(3 * M + 4 * K)), std::string::npos) << m;
  for (const char* o : {"2M: failed after 0", "1M: failed after 1", "64K: failed after 0", "4K: failed"})
    EXPECT_NE(m.find(o), std::string::npos) << o << " missing in: " << m;
  EXPECT_LE(source_calls(), 1u + 4u);
  EXPECT_EQ(live(), 0u);
  EXPECT_EQ(sim_->stats().mappings, 0u);
  EXPECT_EQ(arena_->stats().pages_in_use, 0u);
}

TEST_F(BufferTest, IovaFailureGivesMemoryBack) {
  make();
  auto b = alloc_->alloc({.len = 4 * M, .dma_limit = 0xfffff});  // 4 MiB below 1 MiB cannot fit
  ASSERT_FALSE(b);
  EXPECT_NE(b.error().message.find("IOVA range"), std::string::npos) << b.error().message;
  EXPECT_EQ(live(), 0u);
  EXPECT_EQ(sim_->stats().mappings, 0u);
}

TEST_F(BufferTest, MapFailureMidwayUnmapsAndGivesBack) {
  make(/*scatter4k=*/true);
  auto probe = alloc_->alloc({.len = 16 * K});
  ASSERT_TRUE(probe);
  EXPECT_EQ(probe->mappings(), 4u) << "scattered pages: one run each";
  EXPECT_EQ(sim_->stats().mappings, 4u);
  probe = Buffer();
  settings_.recycle_high_mb = 0;
  const uint64_t maps_before = sim_->stats().map_calls;
  domain_->arm(3, EIO);  // the third run of the next buffer fails to map
  auto b = alloc_->alloc({.len = 5 * 4 * K});
  ASSERT_FALSE(b);
  EXPECT_NE(b.error().message.find("map of run 2"), std::string::npos) << b.error().message;
  EXPECT_EQ(sim_->stats().map_calls, maps_before + 2);
  domain_->arm(0);
  alloc_->trim(true);
  EXPECT_EQ(sim_->stats().mappings, 0u) << "the two runs mapped before the failure are gone";
  expect_all_returned();
}

TEST_F(BufferTest, RecycledReuseNeedsNoMapCall) {
  make();
  uint64_t iova = 0;
  {
    auto b = alloc_->alloc({.len = 3 * M});
    ASSERT_TRUE(b);
    iova = b->iova();
  }
  EXPECT_EQ(alloc_->stats().recycled_bytes, 3 * M);
  const auto before = sim_->stats();
  const uint64_t calls = source_calls();
  auto b = alloc_->alloc({.len = 3 * M});
  ASSERT_TRUE(b);
  EXPECT_TRUE(b->recycled());
  EXPECT_EQ(b->iova(), iova);
  EXPECT_EQ(sim_->stats().map_calls, before.map_calls);
  EXPECT_EQ(sim_->stats().unmap_calls, before.unmap_calls);
  EXPECT_EQ(source_calls(), calls);
  EXPECT_EQ(alloc_->stats().recycle_hits, 1u);
  // A different size is not served from that free list.
  auto c = alloc_->alloc({.len = 2 * M});
  ASSERT_TRUE(c);
  EXPECT_FALSE(c->recycled());
}

std::vector<std::byte> read_back(iommu::SimDomain& sim, const Buffer& b) {
  std::vector<std::byte> out(b.size());
  EXPECT_TRUE(sim.device_read(b.iova(), out));
  return out;
}

bool all_zero(const std::vector<std::byte>& v) {
  return std::all_of(v.begin(), v.end(), [](std::byte x) { return x == std::byte{0}; });
}

TEST_F(BufferTest, ZeroedRequestServedPrezeroedAfterDeviceScribble) {
  settings_.prezero = true;
  make();
  {
    auto b = alloc_->alloc({.len = 2 * M + 64 * K});
    ASSERT_TRUE(b);
    std::vector<std::byte> junk(b->size(), std::byte{0xa5});
    ASSERT_TRUE(sim_->device_write(b->iova(), junk));
    ASSERT_FALSE(all_zero(read_back(*sim_, *b)));
  }
  ASSERT_TRUE(alloc_->wait_prezeroed(std::chrono::seconds(30)));
  EXPECT_EQ(alloc_->stats().prezeroed_bytes, 2 * M + 64 * K);
  auto b = alloc_->alloc({.len = 2 * M + 64 * K, .zeroed = true});
  ASSERT_TRUE(b);
  EXPECT_TRUE(b->recycled());
  EXPECT_EQ(alloc_->stats().memset_fallbacks, 0u) << "served pre-zeroed";
  EXPECT_TRUE(all_zero(read_back(*sim_, *b)));
}

TEST_F(BufferTest, ZeroedRequestMemsetWhenNothingIsPrezeroed) {
  make();  // prezero off
  {
    auto b = alloc_->alloc({.len = 1 * M});
    ASSERT_TRUE(b);
    std::vector<std::byte> junk(b->size(), std::byte{0x5a});
    ASSERT_TRUE(sim_->device_write(b->iova(), junk));
  }
  auto b = alloc_->alloc({.len = 1 * M, .zeroed = true});
  ASSERT_TRUE(b);
  EXPECT_TRUE(b->recycled());
  EXPECT_EQ(alloc_->stats().memset_fallbacks, 1u);
  EXPECT_TRUE(all_zero(read_back(*sim_, *b)));
}

TEST_F(BufferTest, TrimAndWatermarkReleaseRecycledMemory) {
  settings_.recycle_high_mb = 3;
  make();
  {
    auto a = alloc_->alloc({.len = 2 * M});
    auto b = alloc_->alloc({.len = 1 * M});
    auto c = alloc_->alloc({.len = 1 * M});
    ASSERT_TRUE(a && b && c);
  }
  // 4 MiB freed into a 3 MiB pool: the shrinker retired the largest first.
  auto st = alloc_->stats();
  EXPECT_LE(st.recycled_bytes, 3 * M);
  EXPECT_EQ(st.recycled_bytes, 2 * M);
  EXPECT_EQ(st.shrinks, 1u);
  EXPECT_EQ(st.pending_flush_bytes, 2 * M) << "waiting for the flush, memory still held";
  alloc_->trim(true);
  st = alloc_->stats();
  EXPECT_EQ(st.recycled_bytes, 0u);
  EXPECT_EQ(st.pending_flush_bytes, 0u);
  EXPECT_EQ(live(), 0u);
  EXPECT_EQ(sim_->stats().mappings, 0u);
}

TEST_F(BufferTest, MemoryBehindStaleIovaIsNotReusedBeforeFlush) {
  settings_.recycle_high_mb = 0;  // every free retires at once
  make();
  std::vector<std::pair<uintptr_t, uint64_t>> old;
  uint64_t old_iova = 0;
  {
    auto a = alloc_->alloc({.len = 2 * M + 64 * K});
    ASSERT_TRUE(a);
    old_iova = a->iova();
    for (auto& c : a->chunks()) old.emplace_back(reinterpret_cast<uintptr_t>(c.vaddr), c.len);
    std::memset(a->vaddr(), 0x11, 64);
  }
  EXPECT_EQ(alloc_->stats().pending_flush_bytes, 2 * M + 64 * K);
  EXPECT_GT(arena_->stats().stale_pages, 0u);
  EXPECT_EQ(live(), 2 * M + 64 * K) << "held until the flush";
  // A device with the stale IOVA still reaches the old memory, nobody else's.
  auto t = sim_->translate(old_iova, 64, iommu::kRead);
  ASSERT_TRUE(t);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t->data()), old.front().first);

  auto b = alloc_->alloc({.len = 2 * M + 64 * K});
  ASSERT_TRUE(b);
  for (auto& c : b->chunks())
    for (auto& [va, len] : old) {
      auto cv = reinterpret_cast<uintptr_t>(c.vaddr);
      EXPECT_TRUE(cv + c.len <= va || va + len <= cv) << "memory behind a stale IOVA handed out again";
    }
  ASSERT_TRUE(arena_->flush());
  EXPECT_EQ(alloc_->stats().pending_flush_bytes, 0u);
  EXPECT_EQ(live(), b->span()) << "returned after the flush reported the unmap";
}

// Two allocators share one arena, each with its own flush listener: a flush
// gives each the memory it retired, and once one is gone the arena no longer
// calls it (a call into the destroyed allocator would be a use after free,
// which the sanitizer job would report).
TEST_F(BufferTest, AllocatorsSharingAnArenaEachHearTheFlush) {
  settings_.recycle_high_mb = 0;  // every free retires at once
  auto other = create_buffer_allocator(*arena_, settings_, {});
  ASSERT_TRUE(other) << other.error().what();
  make();
  { ASSERT_TRUE(alloc_->alloc({.len = 64 * K})); }
  { ASSERT_TRUE((*other)->alloc({.len = 128 * K})); }
  EXPECT_EQ(alloc_->stats().pending_flush_bytes, 64 * K);
  EXPECT_EQ((*other)->stats().pending_flush_bytes, 128 * K);
  ASSERT_TRUE(arena_->flush());
  EXPECT_EQ(alloc_->stats().pending_flush_bytes, 0u);
  EXPECT_EQ((*other)->stats().pending_flush_bytes, 0u);
  other->reset();
  { ASSERT_TRUE(alloc_->alloc({.len = 64 * K})); }
  EXPECT_EQ(alloc_->stats().pending_flush_bytes, 64 * K);
  ASSERT_TRUE(arena_->flush());
  EXPECT_EQ(alloc_->stats().pending_flush_bytes, 0u);
}

TEST_F(BufferTest, BadInputIsRefusedByName) {
  make();
  auto z = alloc_->alloc({.len = 0});
  ASSERT_FALSE(z);
  EXPECT_EQ(z.error().code, Errc::invalid_argument);
  auto p = alloc_->alloc({.len = 4096, .prot = 0});
  ASSERT_FALSE(p);
  EXPECT_NE(p.error().message.find("prot"), std::string::npos);
  auto big = alloc_->alloc({.len = ~0ull - 10});
  ASSERT_FALSE(big);
  EXPECT_EQ(big.error().code, Errc::invalid_argument);
  EXPECT_FALSE(parse_orders("2M,3K"));
  EXPECT_FALSE(parse_orders(""));
  EXPECT_EQ(*parse_orders("4K,2M,64K,1M"), (std::vector<uint64_t>{2 * M, M, 64 * K, 4 * K}));

  std::vector<std::unique_ptr<MemorySource>> dup;
  dup.push_back(*make_anon_source(4 * K));
  dup.push_back(*make_anon_source(4 * K));
  auto d = create_buffer_allocator(*arena_, settings_, std::move(dup));
  ASSERT_FALSE(d);
  EXPECT_NE(d.error().message.find("both serve order 4K"), std::string::npos) << d.error().message;
}

TEST_F(BufferTest, DefaultSourcesWithoutHugepagesServeOneRun) {
  auto a = create_buffer_allocator(*arena_, settings_);
  ASSERT_TRUE(a) << a.error().what();
  alloc_ = std::move(*a);
  EXPECT_EQ(alloc_->orders(), (std::vector<uint64_t>{4 * K})) << "no hugepage orders under --no-huge";
  auto b = alloc_->alloc({.len = 64 * M + 4 * K, .zeroed = true});
  ASSERT_TRUE(b);
  EXPECT_EQ(b->chunks().size(), 1u);
  EXPECT_EQ(b->mappings(), 1u) << "one mmap run, one mapping";
  EXPECT_EQ(b->attempts(), 1u);
  EXPECT_TRUE(b->virtually_contiguous());
  EXPECT_EQ(sim_->stats().mappings, 1u);
  EXPECT_EQ(static_cast<char*>(b->at(64 * M))[0], 0);
}

// Every buffer byte is pinned when mapped. A process without CAP_IPC_LOCK
// (run in a child that drops it) gets Errc::no_memory for the request that
// would pin past RLIMIT_MEMLOCK, before anything is taken; the message names
// both amounts and the fix, the refusal is counted, and memory kept for
// reuse is retired to make room rather than turned into a failure.
TEST_F(BufferTest, RequestPastRlimitMemlockIsRefusedWithNothingLost) {
  make();
  using R = std::pair<int, std::string>;
  auto [code, msg] = testing_child::run_in_child([this]() -> R {
    HostMemoryGuard& guard = HostMemoryGuard::process();
    const uint64_t pinned0 = guard.pinned();
    if (!testing_child::drop_cap_ipc_lock()) return R(1, "capset");
    if (!testing_child::set_memlock_soft(pinned0 + 1 * M)) return R(1, "setrlimit");
    const uint64_t refusals0 = guard.refusals();
    const BufferStats s0 = alloc_->stats();
    const uint64_t maps0 = sim_->stats().mappings;
    auto big = alloc_->alloc({.len = 2 * M});
    if (big) return R(2, "2 MiB past a 1 MiB RLIMIT_MEMLOCK was served");
    const Error err = big.error();
    if (err.code != Errc::no_memory) return R(3, err.what());
    for (const char* part : {"RLIMIT_MEMLOCK is", "KiB of DMA memory must be pinned", "ulimit -l", "CAP_IPC_LOCK"})
      if (err.message.find(part) == std::string::npos) return R(4, std::string(part) + " not in: " + err.what());
    if (err.message.find(fmt::format("{} KiB", (pinned0 + 2 * M) / K)) == std::string::npos)
      return R(4, "the amount needed is not in: " + err.what());
    if (guard.refusals() != refusals0 + 1) return R(5, "the refusal was not counted");
    const BufferStats s1 = alloc_->stats();
    if (s1.bytes_live != s0.bytes_live || s1.chunk_attempts != s0.chunk_attempts || sim_->stats().mappings != maps0 ||
        guard.pinned() != pinned0)
      return R(6, "the refused request took memory, a mapping or pinned bytes");
    // Up to the limit exactly.
    auto a = alloc_->alloc({.len = 512 * K});
    auto b = alloc_->alloc({.len = 512 * K});
    if (!a || !b) return R(7, (!a ? a.error() : b.error()).what());
    // A recycled buffer stays pinned (mapped); a new request past the limit
    // retires it rather than failing.
    *a = Buffer();
    auto c = alloc_->alloc({.len = 256 * K});
    if (!c) return R(8, c.error().what());
    if (guard.pinned() > pinned0 + 1 * M) return R(9, "pinned past the limit");
    if (!testing_child::set_memlock_soft(pinned0 + 4 * M)) return R(1, "setrlimit");
    auto again = alloc_->alloc({.len = 2 * M});
    if (!again) return R(10, again.error().what());
    return R(0, err.what());
  });
  EXPECT_EQ(code, 0) << msg;
}

TEST_F(BufferTest, DestroyingTheAllocatorLeavesLiveBuffersMapped) {
  make();
  auto b = alloc_->alloc({.len = 1 * M});
  ASSERT_TRUE(b);
  const uint64_t iova = b->iova();
  alloc_.reset();
  // The device may still use it: mapping and memory stay.
  EXPECT_EQ(sim_->stats().mappings, 1u);
  auto t = sim_->translate(iova, 4096, iommu::kWrite);
  ASSERT_TRUE(t);
  std::memset(t->data(), 0x22, 4096);
  *b = Buffer();  // destroying it now does nothing
  // Test cleanup only: remove the deliberately kept mapping and IOVA.
  ASSERT_TRUE(sim_->unmap(iova, 1 * M));
  ASSERT_TRUE(arena_->free({iova, 1 * M}));
  ASSERT_TRUE(arena_->flush());
}

TEST_F(BufferTest, ConcurrentAllocFreeLeavesNothingBehind) {
  settings_.prezero = true;
  settings_.recycle_high_mb = 8;
  make();
  std::atomic<uint64_t> failures{0};
  auto worker = [&](uint64_t seed) {
    std::vector<Buffer> held;
    for (int i = 0; i < 300; ++i) {
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      uint64_t len = (seed >> 33) % (3 * M) + 1;
      auto b = alloc_->alloc({.len = len, .zeroed = (seed & 1) != 0});
      if (!b) {
        failures++;
        continue;
      }
      if ((seed & 1) != 0 && static_cast<char*>(b->at(len - 1))[0] != 0) failures++;
      std::memset(b->at(0), 0x77, std::min<uint64_t>(len, 256));
      held.push_back(std::move(*b));
      if (held.size() > 4) held.erase(held.begin() + static_cast<ptrdiff_t>((seed >> 20) % held.size()));
    }
  };
  std::thread t1(worker, 1), t2(worker, 2);
  t1.join();
  t2.join();
  EXPECT_EQ(failures.load(), 0u);
  EXPECT_EQ(alloc_->stats().buffers_live, 0u);
  alloc_->trim(true);
  EXPECT_EQ(sim_->stats().mappings, 0u);
  expect_all_returned();
}

TEST_F(BufferTest, PressureTriggerArmedWhereThePlatformHasPsi) {
  settings_.psi = true;
  make();
  const bool have_psi = ::access("/proc/pressure/memory", W_OK) == 0;
  EXPECT_EQ(alloc_->stats().psi_armed, have_psi);
}

// A DMA pool over these buffers takes chunks of an allocator order: 4 KiB
// blocks would like 256 KiB chunks, which the 64 KiB source can only give
// as four separate pieces (here four mmaps, never one run; in a carved
// hugepage, adjacent only while nothing else allocates meanwhile). 1 MiB,
// the next order up, is one take.
TEST_F(BufferTest, DmaPoolChunksAreOneOrderSoEachIsOneRun) {
  make();
  auto pool = pool::DmaPool::create(*alloc_, "prp-lists", 4096, 4096, 0);
  ASSERT_TRUE(pool) << pool.error().what();
  EXPECT_EQ((*pool)->chunk_bytes(), 1 * M);
  std::vector<pool::DmaBlock> blocks;
  for (int i = 0; i < 300; ++i) {  // two chunks
    auto b = (*pool)->alloc();
    ASSERT_TRUE(b) << b.error().what();
    blocks.push_back(*b);
  }
  EXPECT_EQ((*pool)->stats().chunks, 2u);
  for (const auto& b : blocks) EXPECT_TRUE((*pool)->free(b));
  pool->reset();
  alloc_->trim(true);
  expect_all_returned();
}

}  // namespace

namespace {

// Recycled buffers keep their IOVA ranges and mappings; when those are what
// a new request lacks, the allocator retires them and flushes before it
// refuses. A 1 MiB arena: 256 recycled 4 KiB buffers hold every page.
class NarrowArenaBufferTest : public BufferTest {
 protected:
  void narrow(uint64_t bytes) {
    iommu::ArenaConfig c;
    c.iova_start = 1 * M;
    c.iova_end = 1 * M + bytes - 1;
    c.shards = 1;
    auto a = iommu::IovaArena::create(*domain_, c);
    ASSERT_TRUE(a) << a.error().what();
    arena_ = std::move(*a);
  }
};

TEST_F(NarrowArenaBufferTest, RecycledBuffersGiveTheirIovaBackBeforeARequestFails) {
  narrow(1 * M);
  settings_.recycle_high_mb = 256;  // keep all of them
  make();
  {
    std::vector<Buffer> held;
    for (int i = 0; i < 256; ++i) {
      auto b = alloc_->alloc({.len = 4 * K});
      ASSERT_TRUE(b) << i << ": " << b.error().what();
      held.push_back(std::move(*b));
    }
  }
  EXPECT_EQ(alloc_->stats().recycled_bytes, 1 * M);
  // Another size, then a pool-sized chunk: both need IOVA the recycler holds.
  auto b8 = alloc_->alloc({.len = 8 * K});
  ASSERT_TRUE(b8) << b8.error().what();
  auto b256 = alloc_->alloc({.len = 256 * K});
  ASSERT_TRUE(b256) << b256.error().what();
  EXPECT_GE(alloc_->stats().reclaims, 1u);

  // Genuinely full: the refusal says what is live, recycled and pending.
  std::vector<Buffer> rest;
  for (;;) {
    auto b = alloc_->alloc({.len = 64 * K});
    if (!b) {
      EXPECT_EQ(b.error().code, Errc::no_space) << b.error().what();
      EXPECT_NE(b.error().message.find("live buffers hold"), std::string::npos) << b.error().message;
      EXPECT_NE(b.error().message.find("recycled 0 bytes"), std::string::npos) << b.error().message;
      break;
    }
    rest.push_back(std::move(*b));
    ASSERT_LT(rest.size(), 64u) << "a 1 MiB window cannot hold this many";
  }
}

TEST_F(BufferTest, RecycledBuffersBelowADmaLimitAreRetiredForARequestThatNeedsTheSpace) {
  settings_.recycle_high_mb = 256;
  make();
  constexpr uint64_t kLimit = 2 * M - 1;  // a device that reaches only the first 2 MiB
  std::vector<Buffer> held;
  for (;;) {
    auto b = alloc_->alloc({.len = 4 * K, .dma_limit = kLimit});
    if (!b) break;
    held.push_back(std::move(*b));
    ASSERT_LE(held.size(), 512u);
  }
  ASSERT_FALSE(held.empty());
  held.clear();  // all recycled, all below the limit
  auto b = alloc_->alloc({.len = 8 * K, .dma_limit = kLimit});
  ASSERT_TRUE(b) << b.error().what();
  EXPECT_LE(b->iova() + b->span() - 1, kLimit);
}

}  // namespace

namespace {

// The allocator's own threads carry names an operator can find in top or
// /proc/PID/task, and go away with it.
int threads_named(const std::string& name) {
  int n = 0;
  for (const auto& t : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(t.path() / "comm");
    std::string c;
    std::getline(comm, c);
    n += c == name;
  }
  return n;
}

TEST_F(BufferTest, ItsThreadsAreNamedAndEndWithIt) {
  const int before = threads_named("dmakit-zero");
  settings_.prezero = true;
  make();
  // The thread names itself when it starts running.
  for (int i = 0; i < 2000 && threads_named("dmakit-zero") != before + 1; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(threads_named("dmakit-zero"), before + 1);
  alloc_.reset();
  // Joined; the kernel drops the task from /proc a moment after it exits.
  for (int i = 0; i < 2000 && threads_named("dmakit-zero") != before; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(threads_named("dmakit-zero"), before);
}

}  // namespace
