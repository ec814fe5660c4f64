// The slab tier of the buffer allocator and the two exposure models, on the
// simulated type1 domain (EAL in --no-huge mode, anonymous memory): small
// buffers share slab mappings (so the entry limit does not bound them),
// honour alignment, dma_limit and zeroing, are freed race-safely, and
// wholly free slabs go back before an allocation fails. The DMA contract
// that include/dmakit/dmakit.h and docs/API.md state - per object and mode,
// when the device still reaches freed memory and when it may have a new
// owner - is checked statement by statement through SimDomain::translate.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <cstring>
#include <set>
#include <thread>

#include "nohuge_eal.hpp"
#include "alloc_buffer/buffer_allocator.hpp"
#include "alloc_buffer/slab.hpp"
#include "buffer_support.hpp"
#include "fault_source.hpp"
#include "base/eal.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"

using namespace dmakit;
using namespace dmakit::alloc_buffer;

namespace {

constexpr uint64_t K = 1024, M = 1024 * 1024, G = 1024 * M;

bool all_zero(const void* p, uint64_t len) {
  auto* b = static_cast<const unsigned char*>(p);
  return std::all_of(b, b + len, [](unsigned char x) { return x == 0; });
}

class SlabTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { testing_support::start_nohuge_eal(); }

  void SetUp() override {
    settings_.psi = false;
    settings_.prezero = false;
    // No age or count bound: a lazy arena flushes only when asked, so a
    // test sees exactly what stays reachable until the flush.
    arena_cfg_.stale_max_pages = 0;
    arena_cfg_.stale_max_age = std::chrono::milliseconds(0);
  }

  void TearDown() override { buftest::destroy_and_expect_nothing_left(alloc_, arena_, sim_); }

  // The domain, arena and allocator; one 4 KiB anonymous source serving
  // runs (what a host without hugepages has), behind a fault wrapper.
  void make(iommu::SimConfig sc = {}) {
    auto d = iommu::SimDomain::create(sc);
    ASSERT_TRUE(d) << d.error().what();
    sim_ = std::move(*d);
    auto a = iommu::IovaArena::create(*sim_, arena_cfg_);
    ASSERT_TRUE(a) << a.error().what();
    arena_ = std::move(*a);
    auto src = make_anon_source(4 * K, true);
    ASSERT_TRUE(src);
    std::vector<std::unique_ptr<MemorySource>> v;
    v.push_back(std::make_unique<FaultSource>(std::move(*src)));
    fault_ = static_cast<FaultSource*>(v.back().get());
    auto b = create_buffer_allocator(*arena_, settings_, std::move(v));
    ASSERT_TRUE(b) << b.error().what();
    alloc_ = std::move(*b);
  }

  bool reachable(uint64_t iova, uint64_t len) const {
    return static_cast<bool>(sim_->translate(iova, len, iommu::kReadWrite));
  }

  BufferSettings settings_;
  iommu::ArenaConfig arena_cfg_;
  std::unique_ptr<iommu::SimDomain> sim_;
  std::unique_ptr<iommu::IovaArena> arena_;
  FaultSource* fault_ = nullptr;
  std::unique_ptr<BufferAllocator> alloc_;
};

// More live 4 KiB buffers than the default dma_entry_limit (65535) allows
// mappings: they share a few slab mappings, well under one per 2 MiB.
TEST_F(SlabTest, MoreLiveSmallBuffersThanMappingEntries) {
  make();
  ASSERT_EQ(sim_->dma_avail(), 65535u);
  const uint64_t n = 70000;
  std::vector<Buffer> held;
  held.reserve(n);
  for (uint64_t i = 0; i < n; ++i) {
    auto b = alloc_->alloc({.len = 4 * K});
    ASSERT_TRUE(b) << "buffer " << i << ": " << b.error().what();
    ASSERT_TRUE(b->from_slab());
    held.push_back(std::move(*b));
  }
  const uint64_t entries = sim_->stats().mappings;
  EXPECT_LE(entries, n * 4 * K / (2 * M)) << "more than one entry per 2 MiB of live memory";
  EXPECT_GE(entries, 1u);
  std::vector<uint64_t> iovas;
  for (const auto& b : held) {
    iovas.push_back(b.iova());
    EXPECT_EQ(b.mappings(), 0u);
  }
  std::sort(iovas.begin(), iovas.end());
  EXPECT_EQ(std::adjacent_find(iovas.begin(), iovas.end(), [](uint64_t a, uint64_t b) { return b - a < 4 * K; }),
            iovas.end())
      << "two buffers overlap";
  // The device reaches each buffer's memory at its IOVA.
  for (size_t i = 0; i < held.size(); i += 997) {
    auto bytes = sim_->translate(held[i].iova(), 4 * K, iommu::kReadWrite);
    ASSERT_TRUE(bytes) << bytes.error().what();
    EXPECT_EQ(static_cast<void*>(bytes->data()), held[i].vaddr());
  }
  auto st = alloc_->stats();
  EXPECT_EQ(st.buffers_live, n);
  EXPECT_EQ(st.slab_bytes_in_use, n * 4 * K);
  EXPECT_GE(st.slab_bytes, n * 4 * K);
  EXPECT_EQ(st.slabs, entries);
  held.clear();
  alloc_->trim(true);
  EXPECT_EQ(alloc_->stats().slabs, 0u);
  EXPECT_EQ(alloc_->stats().slab_bytes, 0u);
  EXPECT_EQ(fault_->stats().live_bytes, 0u) << "slab memory not back at its source after trim";
}

// A freed slot is reused (the most recently freed first), its old contents
// kept for a plain request and cleared for a zeroed one; fresh slab memory
// reads zero.
TEST_F(SlabTest, ReusesFreedSlotsAndZeroesOnRequest) {
  make();
  auto a = alloc_->alloc({.len = 4 * K, .zeroed = true});
  ASSERT_TRUE(a) << a.error().what();
  EXPECT_TRUE(all_zero(a->vaddr(), 4 * K));
  const uint64_t iova = a->iova();
  void* va = a->vaddr();
  std::memset(va, 0xab, 4 * K);
  *a = Buffer();
  auto b = alloc_->alloc({.len = 4 * K});
  ASSERT_TRUE(b);
  EXPECT_EQ(b->iova(), iova);
  EXPECT_EQ(b->vaddr(), va);
  EXPECT_EQ(static_cast<unsigned char*>(b->vaddr())[100], 0xab) << "plain requests get the memory as it was";
  *b = Buffer();
  auto c = alloc_->alloc({.len = 4 * K, .zeroed = true});
  ASSERT_TRUE(c);
  EXPECT_EQ(c->iova(), iova);
  EXPECT_TRUE(all_zero(c->vaddr(), 4 * K)) << "a zeroed request got dirty memory";
  EXPECT_EQ(alloc_->stats().slabs, 1u);
  EXPECT_EQ(sim_->stats().mappings, 1u);
}

// Slots sit on IOVAs aligned to their class, a request's alignment picks a
// class at least that large, and each buffer is one host run.
TEST_F(SlabTest, SlotsHonourSizeAndAlignment) {
  make();
  struct Case {
    uint64_t len, align, cls;
  } cases[] = {{1, 4 * K, 4 * K}, {3000, 4 * K, 4 * K}, {4 * K, 64 * K, 64 * K}, {100 * K, 4 * K, 128 * K},
               {M, 4 * K, M}, {5 * K, 256 * K, 256 * K}};
  std::vector<Buffer> held;
  for (const auto& c : cases) {
    for (int i = 0; i < 3; ++i) {
      auto b = alloc_->alloc({.len = c.len, .align = c.align});
      ASSERT_TRUE(b) << b.error().what();
      EXPECT_TRUE(b->from_slab());
      EXPECT_EQ(b->size(), c.len);
      EXPECT_EQ(b->span(), c.cls) << "len " << c.len << " align " << c.align;
      EXPECT_EQ(b->iova() % c.cls, 0u) << "len " << c.len;
      EXPECT_TRUE(b->virtually_contiguous());
      EXPECT_TRUE(reachable(b->iova(), b->span()));
      auto back = b->iova_of(static_cast<char*>(b->vaddr()) + c.len - 1);
      ASSERT_TRUE(back);
      EXPECT_EQ(*back, b->iova() + c.len - 1);
      held.push_back(std::move(*b));
    }
  }
  // Above slab_max, or aligned beyond it: a buffer of its own.
  auto big = alloc_->alloc({.len = M + 4 * K});
  ASSERT_TRUE(big);
  EXPECT_FALSE(big->from_slab());
  auto aligned = alloc_->alloc({.len = 4 * K, .align = 2 * M});
  ASSERT_TRUE(aligned);
  EXPECT_FALSE(aligned->from_slab());
  EXPECT_EQ(aligned->iova() % (2 * M), 0u);
}

// A request under a DMA limit passes over blocks above it: it takes a free
// block of a slab below the limit, or a new slab below it, or fails with
// no_space when neither exists - never a slot above the limit.
TEST_F(SlabTest, HonoursDmaLimit) {
  arena_cfg_.shards = 1;
  arena_cfg_.large_threshold_pages = ~0ull;  // every range from the one shard, lowest first
  arena_cfg_.iova_start = 4 * G - 2 * M;  // the first slab's first block lies below 4 GiB, the rest above
  make();
  constexpr uint64_t kLimit = 0xffffffff;
  std::vector<Buffer> below;
  for (int i = 0; i < 512; ++i) {  // fills block 0 with 4 KiB slots
    auto b = alloc_->alloc({.len = 4 * K});
    ASSERT_TRUE(b) << i << ": " << b.error().what();
    EXPECT_LE(b->iova() + 4 * K - 1, kLimit);
    below.push_back(std::move(*b));
  }
  auto high = alloc_->alloc({.len = 8 * K});
  ASSERT_TRUE(high) << high.error().what();
  EXPECT_GT(high->iova(), kLimit);
  auto none = alloc_->alloc({.len = 8 * K, .dma_limit = kLimit});
  ASSERT_FALSE(none) << "got IOVA " << std::hex << none->iova();
  EXPECT_EQ(none.error().code, Errc::no_space) << none.error().what();
  // Block 0 wholly free and given back to its slab by trim: the limited
  // request takes it although the 8 KiB class has room above the limit.
  below.clear();
  alloc_->trim(true);
  auto low = alloc_->alloc({.len = 8 * K, .dma_limit = kLimit});
  ASSERT_TRUE(low) << low.error().what();
  EXPECT_TRUE(low->from_slab());
  EXPECT_LE(low->iova() + low->span() - 1, kLimit);
  EXPECT_EQ(low->iova() % (8 * K), 0u);
}

// Two threads allocating and freeing slab buffers of one class: every
// buffer is owned by one thread at a time (each writes its mark over the
// whole buffer and finds it intact before the free).
TEST_F(SlabTest, ConcurrentAllocFreeNeverSharesASlot) {
  make();
  std::atomic<uint64_t> bad{0};
  auto work = [&](unsigned char mark) {
    std::vector<Buffer> mine;
    for (int round = 0; round < 200; ++round) {
      for (int i = 0; i < 64; ++i) {
        auto b = alloc_->alloc({.len = 4 * K});
        if (!b) {
          ++bad;
          return;
        }
        std::memset(b->vaddr(), mark, 4 * K);
        mine.push_back(std::move(*b));
      }
      for (auto& b : mine) {
        auto* p = static_cast<unsigned char*>(b.vaddr());
        if (std::any_of(p, p + 4 * K, [&](unsigned char x) { return x != mark; })) ++bad;
      }
      mine.clear();
    }
  };
  std::thread t1(work, 0x11), t2(work, 0x22);
  t1.join();
  t2.join();
  EXPECT_EQ(bad.load(), 0u);
  EXPECT_EQ(alloc_->stats().buffers_live, 0u);
  EXPECT_EQ(alloc_->stats().slab_bytes_in_use, 0u);
}

// Before an allocation fails for lack of mapping entries, wholly free slabs
// are retired (their entries and memory go back) and the request retried.
TEST_F(SlabTest, FreeSlabIsRetiredBeforeEnospc) {
  iommu::SimConfig sc;
  sc.dma_entry_limit = 2;
  make(sc);
  {
    auto small = alloc_->alloc({.len = 4 * K});
    ASSERT_TRUE(small);
  }
  EXPECT_EQ(alloc_->stats().slabs, 1u) << "a free slab stays mapped for reuse";
  EXPECT_EQ(sim_->stats().mappings, 1u);
  auto a = alloc_->alloc({.len = 4 * M});
  ASSERT_TRUE(a) << a.error().what();
  auto b = alloc_->alloc({.len = 4 * M});
  ASSERT_TRUE(b) << "the free slab's entry was not reclaimed: " << b.error().what();
  EXPECT_EQ(alloc_->stats().reclaims, 1u);
  EXPECT_EQ(alloc_->stats().slabs, 0u);
  // Nothing left to reclaim: the refusal says what holds the memory.
  auto c = alloc_->alloc({.len = 4 * K});
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code, Errc::no_space);
  const std::string msg = c.error().what();
  for (const char* part : {"2 live buffers hold 8388608 bytes", "recycled 0 bytes", "slab memory free 0 of 0 bytes",
                           "waiting for the flush 0 bytes"})
    EXPECT_NE(msg.find(part), std::string::npos) << part << " missing in: " << msg;
}

// The same for recycled memory in the same refusal: a buffer kept for reuse
// is retired too, and the message counts slab and recycled memory apart.
TEST_F(SlabTest, RecycledAndSlabMemoryBothRetiredBeforeEnospc) {
  iommu::SimConfig sc;
  sc.dma_entry_limit = 2;
  make(sc);
  auto keep = alloc_->alloc({.len = 4 * K});  // the slab stays in use
  ASSERT_TRUE(keep);
  { ASSERT_TRUE(alloc_->alloc({.len = 2 * M})); }  // recycled, mapped
  EXPECT_EQ(alloc_->stats().recycled_bytes, 2 * M);
  auto a = alloc_->alloc({.len = 4 * M});
  ASSERT_TRUE(a) << a.error().what();
  EXPECT_EQ(alloc_->stats().reclaims, 1u);
  EXPECT_EQ(alloc_->stats().recycled_bytes, 0u);
  auto b = alloc_->alloc({.len = 4 * M});
  ASSERT_FALSE(b);
  const std::string msg = b.error().what();
  EXPECT_NE(msg.find("(1 slab buffers 4096 bytes)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("slab memory free 4190208 of 4194304 bytes"), std::string::npos) << msg;
}

// Isolation mode: every buffer, small ones too, is its own mapping, and a
// freed buffer is not recycled.
TEST_F(SlabTest, IsolationMapsEveryBufferOnItsOwn) {
  settings_.isolation = true;
  make();
  std::vector<Buffer> held;
  for (int i = 0; i < 10; ++i) {
    auto b = alloc_->alloc({.len = 4 * K});
    ASSERT_TRUE(b);
    EXPECT_FALSE(b->from_slab());
    EXPECT_EQ(b->mappings(), 1u);
    held.push_back(std::move(*b));
  }
  EXPECT_EQ(sim_->stats().mappings, 10u);
  EXPECT_EQ(alloc_->stats().slabs, 0u);
  held.clear();
  EXPECT_EQ(alloc_->stats().recycled_bytes, 0u);
  ASSERT_TRUE(arena_->flush());
  EXPECT_EQ(sim_->stats().mappings, 0u);
}

// --- The DMA contract, per object and mode ------------------------------

// Slab buffer, default mode: after the free the device still reaches the
// memory (the slab stays mapped) and the next buffer of the class may own
// it at once.
TEST_F(SlabTest, ContractSlabBufferDefault) {
  make();
  auto a = alloc_->alloc({.len = 4 * K});
  ASSERT_TRUE(a);
  const uint64_t iova = a->iova();
  void* va = a->vaddr();
  *a = Buffer();
  auto bytes = sim_->translate(iova, 4 * K, iommu::kReadWrite);
  ASSERT_TRUE(bytes) << "a freed slab buffer is still reachable";
  EXPECT_EQ(static_cast<void*>(bytes->data()), va);
  auto b = alloc_->alloc({.len = 4 * K});
  ASSERT_TRUE(b);
  EXPECT_EQ(b->vaddr(), va) << "the freed slot goes to the next owner at once";
}

// Slab memory retired (trim, memory pressure, or before a failure), lazy
// arena: retirement ends with the arena's flush, so the device faults once
// it returned, and the memory goes back to its source only after that.
// Until then (trim(false) retires no slab) the slab stays mapped.
TEST_F(SlabTest, ContractRetiredSlabLazy) {
  make();
  uint64_t iova = 0;
  {
    auto a = alloc_->alloc({.len = 4 * K});
    ASSERT_TRUE(a);
    iova = a->iova();
  }
  alloc_->trim(false);
  EXPECT_EQ(alloc_->stats().slabs, 1u);
  EXPECT_TRUE(reachable(iova, 4 * K));
  ASSERT_GT(fault_->stats().live_bytes, 0u);
  alloc_->trim(true);
  EXPECT_EQ(alloc_->stats().slabs, 0u);
  EXPECT_FALSE(reachable(iova, 4 * K)) << "the retired slab is unmapped when trim returns";
  EXPECT_EQ(fault_->stats().live_bytes, 0u) << "after the flush the memory went back";
  EXPECT_EQ(alloc_->stats().pending_flush_bytes, 0u);
}

// Recycled buffer, default mode: a freed buffer keeps its mapping (reachable)
// and the next buffer of its size may own it at once.
TEST_F(SlabTest, ContractRecycledBufferDefault) {
  make();
  auto a = alloc_->alloc({.len = 2 * M});
  ASSERT_TRUE(a);
  EXPECT_FALSE(a->from_slab());
  const uint64_t iova = a->iova();
  void* va = a->vaddr();
  *a = Buffer();
  EXPECT_TRUE(reachable(iova, 2 * M));
  auto b = alloc_->alloc({.len = 2 * M});
  ASSERT_TRUE(b);
  EXPECT_TRUE(b->recycled());
  EXPECT_EQ(b->vaddr(), va);
  EXPECT_EQ(b->iova(), iova);
}

// Isolation mode, lazy arena: a freed buffer stays reachable until the
// flush, and its host memory goes to no new owner before the flush returned;
// after it the device faults.
TEST_F(SlabTest, ContractIsolationLazy) {
  settings_.isolation = true;
  make();
  auto a = alloc_->alloc({.len = 4 * K});
  ASSERT_TRUE(a);
  const uint64_t iova = a->iova();
  void* va = a->vaddr();
  *a = Buffer();
  EXPECT_TRUE(reachable(iova, 4 * K)) << "lazy: mapped until the flush";
  EXPECT_EQ(alloc_->stats().pending_flush_bytes, 4 * K);
  std::vector<Buffer> others;
  for (int i = 0; i < 64; ++i) {
    auto b = alloc_->alloc({.len = 4 * K});
    ASSERT_TRUE(b);
    EXPECT_NE(b->vaddr(), va) << "memory behind a stale IOVA went to a new owner";
    EXPECT_NE(b->iova(), iova) << "a stale IOVA was reused before its unmap";
    others.push_back(std::move(*b));
  }
  ASSERT_TRUE(arena_->flush());
  EXPECT_FALSE(reachable(iova, 4 * K)) << "after the flush the device faults";
  EXPECT_EQ(alloc_->stats().pending_flush_bytes, 0u);
}

// Isolation mode, strict arena: the free unmaps before it returns.
TEST_F(SlabTest, ContractIsolationStrict) {
  settings_.isolation = true;
  arena_cfg_.strict = true;
  make();
  auto a = alloc_->alloc({.len = 4 * K});
  ASSERT_TRUE(a);
  const uint64_t iova = a->iova();
  ASSERT_TRUE(reachable(iova, 4 * K));
  *a = Buffer();
  EXPECT_FALSE(reachable(iova, 4 * K));
  EXPECT_EQ(alloc_->stats().pending_flush_bytes, 0u);
  EXPECT_EQ(fault_->stats().live_bytes, 0u) << "the memory went back after the unmap";
}

// Default mode, strict arena: slab buffers and recycled buffers keep their
// mappings all the same (strict applies to IOVA ranges the arena frees); a
// retired slab is unmapped inside the retirement.
TEST_F(SlabTest, ContractDefaultStrict) {
  arena_cfg_.strict = true;
  make();
  uint64_t slab_iova = 0, big_iova = 0;
  {
    auto s = alloc_->alloc({.len = 4 * K});
    auto b = alloc_->alloc({.len = 2 * M});
    ASSERT_TRUE(s && b);
    slab_iova = s->iova();
    big_iova = b->iova();
  }
  EXPECT_TRUE(reachable(slab_iova, 4 * K));
  EXPECT_TRUE(reachable(big_iova, 2 * M));
  alloc_->trim(true);
  EXPECT_FALSE(reachable(slab_iova, 4 * K));
  EXPECT_FALSE(reachable(big_iova, 2 * M));
}

// --- Thread caches ---------------------------------------------------------

// A thread keeps the slots it frees for its own next allocations. They are
// not in use, and they go back to their blocks when the thread exits, so
// the slab can then be retired.
TEST_F(SlabTest, ThreadCacheGoesBackWhenItsThreadExits) {
  make();
  std::thread t([&] {
    std::vector<Buffer> v;
    for (int i = 0; i < 16; ++i) {
      auto b = alloc_->alloc({.len = 4 * K});
      ASSERT_TRUE(b) << b.error().what();
      v.push_back(std::move(*b));
    }
    const uint64_t last = v.back().iova();
    v.clear();  // into this thread's cache
    EXPECT_EQ(alloc_->stats().buffers_live, 0u);
    EXPECT_EQ(alloc_->stats().slab_bytes_in_use, 0u);
    auto again = alloc_->alloc({.len = 4 * K, .zeroed = true});
    ASSERT_TRUE(again);
    EXPECT_EQ(again->iova(), last) << "the last slot freed is the first handed out again";
    EXPECT_TRUE(all_zero(again->vaddr(), 4 * K));
    EXPECT_EQ(alloc_->stats().buffers_live, 1u);
  });
  t.join();
  EXPECT_EQ(alloc_->stats().buffers_live, 0u);
  alloc_->trim(true);
  EXPECT_EQ(alloc_->stats().slabs, 0u) << "slots cached by a thread that exited keep their slab";
}

// trim() in one thread asks the others for their cached slots: a thread
// still running gives them back at its next free.
TEST_F(SlabTest, TrimAsksOtherThreadsForTheirCachedSlots) {
  make();
  std::mutex mu;
  std::condition_variable cv;
  int stage = 0;
  auto wait_for = [&](int s) {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return stage >= s; });
  };
  auto go = [&](int s) {
    {
      std::lock_guard lock(mu);
      stage = s;
    }
    cv.notify_all();
  };
  std::thread t([&] {
    {
      std::vector<Buffer> v;
      for (int i = 0; i < 8; ++i) v.push_back(std::move(*alloc_->alloc({.len = 4 * K})));
    }
    go(1);
    wait_for(2);
    { auto b = alloc_->alloc({.len = 4 * K}); }  // this free honours the request
    go(3);
    wait_for(4);
  });
  wait_for(1);
  alloc_->trim(true);
  EXPECT_EQ(alloc_->stats().slabs, 1u) << "a running thread's cache is its own until its next free";
  EXPECT_EQ(alloc_->stats().slab_bytes_in_use, 0u);
  go(2);
  wait_for(3);
  alloc_->trim(true);
  EXPECT_EQ(alloc_->stats().slabs, 0u) << "the thread kept its cached slots after a drain was asked for";
  go(4);
  t.join();
}

// The allocator goes while another thread still caches slots: they go back
// with it, and every slab is retired and unmapped (TearDown checks).
TEST_F(SlabTest, AllocatorDestroyedWhileAnotherThreadCachesSlots) {
  make();
  std::atomic<int> stage{0};
  std::thread t([&] {
    {
      std::vector<Buffer> v;
      for (int i = 0; i < 8; ++i) v.push_back(std::move(*alloc_->alloc({.len = 4 * K})));
    }
    stage.store(1);
    while (stage.load() != 2) std::this_thread::yield();
  });
  while (stage.load() != 1) std::this_thread::yield();
  alloc_.reset();
  ASSERT_TRUE(arena_->flush());
  EXPECT_EQ(sim_->stats().mappings, 0u) << "a slab whose slots another thread cached was left mapped";
  stage.store(2);
  t.join();  // the thread's exit finds its cache detached
}

// Buffers allocated in one thread and freed in another: the freeing
// thread's cache fills and gives half back at a time; no slot is ever
// handed to two owners.
TEST_F(SlabTest, FreedInAnotherThreadNeverSharesASlot) {
  make();
  std::mutex mu;
  std::condition_variable cv;
  std::vector<Buffer> handoff;
  bool done = false;
  std::atomic<uint64_t> bad{0};
  std::thread consumer([&] {
    for (;;) {
      std::vector<Buffer> got;
      {
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return done || !handoff.empty(); });
        if (handoff.empty() && done) return;
        got.swap(handoff);
      }
      for (auto& b : got) {
        auto* p = static_cast<unsigned char*>(b.vaddr());
        if (std::any_of(p, p + 4 * K, [&](unsigned char x) { return x != p[0]; })) ++bad;
        auto again = alloc_->alloc({.len = 4 * K});  // from this thread's cache, once it has one
        if (!again) { ++bad; continue; }
        std::memset(again->vaddr(), 0x5a, 4 * K);
      }
    }
  });
  std::set<uint64_t> live;
  for (int round = 0; round < 300; ++round) {
    std::vector<Buffer> mine;
    for (int i = 0; i < 32; ++i) {
      auto b = alloc_->alloc({.len = 4 * K});
      ASSERT_TRUE(b) << b.error().what();
      std::memset(b->vaddr(), round & 0xff, 4 * K);
      mine.push_back(std::move(*b));
    }
    for (auto& b : mine) live.insert(b.iova());
    EXPECT_EQ(live.size(), mine.size()) << "two live buffers share a slot";
    live.clear();
    {
      std::lock_guard lock(mu);
      for (auto& b : mine) handoff.push_back(std::move(b));
    }
    cv.notify_one();
  }
  {
    std::lock_guard lock(mu);
    done = true;
  }
  cv.notify_one();
  consumer.join();
  EXPECT_EQ(bad.load(), 0u);
  EXPECT_EQ(alloc_->stats().buffers_live, 0u);
  alloc_->trim(true);
  EXPECT_EQ(alloc_->stats().slabs, 0u);
}

// --- The tier on its own: a second free of one slot is refused ----------

class OneSlabHost final : public SlabHost {
 public:
  OneSlabHost() {
    void* p = ::mmap(nullptr, 4 * M, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    base_ = p == MAP_FAILED ? nullptr : static_cast<char*>(p);
  }
  ~OneSlabHost() {
    if (base_ != nullptr) ::munmap(base_, 4 * M);
  }
  Result<ImplPtr> build_slab(uint64_t len, uint64_t) override {
    if (built_ || base_ == nullptr || len > 4 * M) return fail(Errc::no_memory, "one slab only");
    built_ = true;
    auto b = std::make_unique<Buffer::Impl>();
    b->span = {1ull << 32, len};
    b->chunks.push_back(BufferChunk{base_, 1ull << 32, len, len, "test"});
    return b;
  }
  void retire_slab(ImplPtr) override { ++retired; }
  int retired = 0;

 private:
  char* base_ = nullptr;
  bool built_ = false;
};

TEST(SlabTier, SecondFreeOfASlotIsRefused) {
  OneSlabHost host;
  auto anchor = std::make_shared<Anchor>();
  SlabTier tier(host, anchor, 4 * K, M);
  const BufferRequest req{.len = 4 * K};
  const int cls = tier.class_of(req);
  ASSERT_EQ(cls, 0);
  auto a = tier.alloc(req, cls);
  ASSERT_TRUE(a) << a.error().what();
  // A stale copy of the record, as a second free of one buffer would bring.
  // The tier leaves a refused record alone (it may be another owner's);
  // this test owns the copy and frees it after the refusal.
  auto stale = std::make_unique<Buffer::Impl>();
  const Buffer::Impl& orig = **a;
  stale->anchor = orig.anchor;
  stale->size = orig.size;
  stale->span = orig.span;
  stale->prot = orig.prot;
  stale->chunks = orig.chunks;
  stale->from = orig.from;
  stale->block = orig.block;
  stale->slot = orig.slot;
  tier.free(std::move(*a));
  EXPECT_EQ(tier.stats().buffers_live, 0u);
  Buffer::Impl* const refused = stale.get();
  tier.free(std::move(stale));
  EXPECT_EQ(tier.stats().double_frees, 1u);
  std::unique_ptr<Buffer::Impl>{refused}.reset();
  EXPECT_EQ(tier.stats().buffers_live, 0u);
  auto c = tier.alloc(req, cls);
  auto d = tier.alloc(req, cls);
  ASSERT_TRUE(c && d);
  EXPECT_NE((*c)->span.iova, (*d)->span.iova) << "a refused free must not hand one slot out twice";
  EXPECT_EQ(tier.stats().buffers_live, 2u);
  tier.free(std::move(*c));
  tier.free(std::move(*d));
  EXPECT_EQ(tier.retire_free(), 4 * M);
  EXPECT_EQ(host.retired, 1);
  EXPECT_EQ(tier.stats().slabs, 0u);
}

// More tiers than there are thread-cache slots: the ones without a slot
// work without caches, and every tier hands out and takes back its slots.
TEST(SlabTier, MoreTiersThanCacheSlotsAllWork) {
  const size_t n = kSlabCacheSlots + 8;
  std::vector<std::unique_ptr<OneSlabHost>> hosts;
  std::vector<std::unique_ptr<SlabTier>> tiers;
  auto anchor = std::make_shared<Anchor>();
  const BufferRequest req{.len = 4 * K};
  for (size_t i = 0; i < n; ++i) {
    hosts.push_back(std::make_unique<OneSlabHost>());
    tiers.push_back(std::make_unique<SlabTier>(*hosts.back(), anchor, 4 * K, M));
  }
  for (size_t i = 0; i < n; ++i) {
    SlabTier& tier = *tiers[i];
    uint64_t first = 0;
    for (int round = 0; round < 3; ++round) {
      auto a = tier.alloc(req, 0);
      ASSERT_TRUE(a) << "tier " << i << ": " << a.error().what();
      if (round == 0) first = (*a)->span.iova;
      EXPECT_EQ((*a)->span.iova, first) << "tier " << i << " did not take its freed slot back";
      EXPECT_EQ(tier.stats().buffers_live, 1u);
      tier.free(std::move(*a));
      EXPECT_EQ(tier.stats().buffers_live, 0u);
    }
    EXPECT_EQ(tier.retire_free(), 4 * M) << "tier " << i;
  }
}

}  // namespace
