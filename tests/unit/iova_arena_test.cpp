// IovaArena on the simulated type1 model: placement rules (windows, holes,
// alignment, DMA limit), lazy flush safety (an IOVA comes back only after its
// unmap returned), flush triggers, strict mode, exhaustion and bad input.
#include <gtest/gtest.h>

#include <fstream>

#include <sys/mman.h>

#include <array>
#include <atomic>
#include <chrono>
#include <map>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "bench_arena.hpp"
#include "child_process.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"
#include "base/clock.hpp"

namespace dmakit::iommu {
namespace {

constexpr uint64_t K4 = 4096;
constexpr uint64_t M2 = 2ull << 20;
constexpr uint64_t G1 = 1ull << 30;
constexpr uint64_t kMsiStart = 0xfee00000;
constexpr uint64_t kMsiEnd = 0xfef00000;

std::unique_ptr<SimDomain> sim(SimConfig cfg = {}) {
  auto d = SimDomain::create(cfg);
  EXPECT_TRUE(d) << d.error().what();
  return std::move(*d);
}

std::unique_ptr<IovaArena> arena(Domain& d, const ArenaConfig& cfg) {
  auto a = IovaArena::create(d, cfg);
  EXPECT_TRUE(a) << a.error().what();
  return a ? std::move(*a) : nullptr;
}

// A small lazy arena with one shard and no automatic flush bounds, so only
// allocation pressure (or wrap-around) flushes.
ArenaConfig small_cfg(uint64_t start, uint64_t pages) {
  ArenaConfig c;
  c.shards = 1;
  c.iova_start = start;
  c.iova_end = start + pages * K4 - 1;
  c.stale_max_pages = 0;
  c.stale_max_age = std::chrono::milliseconds(0);
  return c;
}

class HostPage {
 public:
  HostPage() {
    void* p = mmap(nullptr, K4, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    p_ = p == MAP_FAILED ? nullptr : p;
  }
  ~HostPage() {
    if (p_) munmap(p_, K4);
  }
  HostPage(const HostPage&) = delete;
  HostPage& operator=(const HostPage&) = delete;
  void* get() const { return p_; }

 private:
  void* p_;
};

TEST(IovaArena, LayoutOfTheDefaultSpace) {
  auto d = sim();
  ArenaConfig cfg;
  cfg.shards = 2;
  auto a = arena(*d, cfg);
  ArenaStats s = a->stats();
  // 39 bits of 4K pages, minus IOVA 0 and the 1 MiB MSI hole.
  EXPECT_EQ(s.total_pages, (1ull << 27) - 1 - 256);
  EXPECT_EQ(s.shards, 2u);
  EXPECT_TRUE(s.large_shard);
  EXPECT_EQ(a->page_size(), K4);
  auto spans = a->shard_spans();
  ASSERT_EQ(spans.size(), 3u);
  EXPECT_EQ(spans[0].iova, K4);
  for (size_t i = 1; i < spans.size(); ++i) EXPECT_EQ(spans[i].iova, spans[i - 1].end());
  EXPECT_EQ(spans.back().end(), 1ull << 39);
  // The large shard holds at least large_share of the space.
  EXPECT_GE(static_cast<double>(spans.back().len), 0.25 * static_cast<double>(1ull << 39));
  EXPECT_TRUE(a->check()) << a->check().error().what();
}

TEST(IovaArena, ConfigErrors) {
  auto d = sim();
  ArenaConfig cfg;
  cfg.shards = 3;
  auto a = IovaArena::create(*d, cfg);
  ASSERT_FALSE(a);
  EXPECT_EQ(a.error().code, Errc::invalid_argument);
  EXPECT_NE(a.error().message.find("shards"), std::string::npos);
  cfg = {};
  cfg.large_share = 1.5;
  EXPECT_EQ(IovaArena::create(*d, cfg).error().code, Errc::invalid_argument);
  cfg = {};
  cfg.iova_start = 0x200000;
  cfg.iova_end = 0x100000;
  EXPECT_EQ(IovaArena::create(*d, cfg).error().code, Errc::invalid_argument);
  // Narrowed to the MSI hole only: nothing usable.
  cfg = {};
  cfg.iova_start = kMsiStart;
  cfg.iova_end = kMsiEnd - 1;
  auto hole = IovaArena::create(*d, cfg);
  ASSERT_FALSE(hole);
  EXPECT_EQ(hole.error().code, Errc::invalid_argument);
  EXPECT_NE(hole.error().message.find("0xfee00000"), std::string::npos) << hole.error().message;
}

TEST(IovaArena, ConfigFromSettings) {
  iommu::ArenaSettings s;
  s.shards = 4;
  s.strict = true;
  s.stale_max_age_ms = 7;
  s.iova_start = 0x1000000;
  ArenaConfig c = ArenaConfig::from_settings(s);
  EXPECT_EQ(c.shards, 4u);
  EXPECT_TRUE(c.strict);
  EXPECT_EQ(c.stale_max_age, std::chrono::milliseconds(7));
  EXPECT_EQ(c.iova_start, 0x1000000u);
  EXPECT_EQ(c.stale_max_pages, s.stale_max_pages);
}

TEST(IovaArena, BadRequestsAreRefusedWithMessages) {
  auto d = sim();
  ArenaConfig cfg;
  cfg.shards = 2;
  cfg.iova_start = 1ull << 32;  // the space starts above 4 GiB
  auto a = arena(*d, cfg);
  auto zero = a->alloc({0, 0, ~0ull});
  ASSERT_FALSE(zero);
  EXPECT_EQ(zero.error().code, Errc::invalid_argument);
  EXPECT_NE(zero.error().message.find("0 bytes"), std::string::npos);
  auto odd = a->alloc({K4, 3 * K4, ~0ull});
  ASSERT_FALSE(odd);
  EXPECT_EQ(odd.error().code, Errc::invalid_argument);
  EXPECT_NE(odd.error().message.find("power of two"), std::string::npos);
  auto low = a->alloc({K4, 0, 0xffffffff});
  ASSERT_FALSE(low);
  EXPECT_EQ(low.error().code, Errc::invalid_argument);
  EXPECT_NE(low.error().message.find("dma_limit 0xffffffff"), std::string::npos) << low.error().message;
  auto huge = a->alloc({1ull << 40, 0, ~0ull});
  ASSERT_FALSE(huge);
  EXPECT_EQ(huge.error().code, Errc::invalid_argument);
  EXPECT_NE(huge.error().message.find("larger than"), std::string::npos);
  auto tiny_limit = a->alloc({K4, 0, 100});
  ASSERT_FALSE(tiny_limit);
  EXPECT_EQ(tiny_limit.error().code, Errc::invalid_argument);
  EXPECT_EQ(a->stats().pages_in_use, 0u);
  EXPECT_EQ(a->stats().failures, 0u);
}

TEST(IovaArena, AlignmentAndDmaLimit) {
  auto d = sim();
  ArenaConfig cfg;
  cfg.shards = 2;
  auto a = arena(*d, cfg);
  std::vector<IovaSpan> got;
  for (int i = 0; i < 20; ++i) {
    auto r = a->alloc({3 * K4, M2, ~0ull});  // small request, 2 MiB aligned
    ASSERT_TRUE(r) << r.error().what();
    EXPECT_EQ(r->iova % M2, 0u);
    EXPECT_EQ(r->len, 3 * K4);
    got.push_back(*r);
  }
  auto gig = a->alloc({G1, G1, ~0ull});
  ASSERT_TRUE(gig) << gig.error().what();
  EXPECT_EQ(gig->iova % G1, 0u);
  got.push_back(*gig);
  // 32-bit device: every byte below 4 GiB, for small and large requests
  // (the large shard lies above 4 GiB, so the large one must borrow).
  for (uint64_t len : {K4, 5 * K4, 100 * K4, 64 * M2}) {
    auto r = a->alloc({len, 0, 0xffffffff});
    ASSERT_TRUE(r) << r.error().what();
    EXPECT_LE(r->end() - 1, 0xffffffffu);
    got.push_back(*r);
  }
  // A limit that is not page aligned: the whole last page must be below it.
  auto r = a->alloc({K4, 0, 0x10000 + 0x800});
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_LE(r->end() - 1, 0x10800u);
  got.push_back(*r);
  for (auto& g : got) ASSERT_TRUE(a->free(g));
  EXPECT_TRUE(a->check()) << a->check().error().what();
}

TEST(IovaArena, RandomOpsNeverOverlapAndAvoidTheHole) {
  auto d = sim();
  ArenaConfig cfg;
  cfg.shards = 2;
  cfg.iova_start = 0xfe000000;  // 17 MiB around the MSI hole
  cfg.iova_end = 0xff0fffff;
  cfg.stale_max_pages = 64;
  cfg.large_threshold_pages = 16;
  auto a = arena(*d, cfg);
  ASSERT_EQ(a->stats().total_pages, 4096u);

  std::mt19937_64 rng(42);
  std::map<uint64_t, uint64_t> live;  // iova -> len: the reference
  const uint64_t aligns[] = {0, K4, 16 * K4, 64 * K4, M2};
  uint64_t refused = 0;
  for (int op = 0; op < 20000; ++op) {
    if (live.empty() || rng() % 100 < 55) {
      IovaRequest req;
      req.len = (1 + rng() % 40) * K4 - (rng() % 2) * 100;  // some lengths not page multiples
      req.align = aligns[rng() % 5];
      if (rng() % 4 == 0) req.dma_limit = 0xfe7fffff;
      auto r = a->alloc(req);
      if (!r) {
        ASSERT_EQ(r.error().code, Errc::no_space) << r.error().what();
        ++refused;
        continue;
      }
      ASSERT_EQ(r->len % K4, 0u);
      ASSERT_GE(r->len, req.len);
      ASSERT_GE(r->iova, cfg.iova_start);
      ASSERT_LE(r->end() - 1, cfg.iova_end);
      ASSERT_LE(r->end() - 1, req.dma_limit);
      if (req.align > K4) {
        ASSERT_EQ(r->iova % req.align, 0u);
      }
      ASSERT_TRUE(r->end() <= kMsiStart || r->iova >= kMsiEnd) << std::hex << r->iova;
      auto next = live.lower_bound(r->iova);
      if (next != live.end()) {
        ASSERT_LE(r->end(), next->first) << "overlaps the next allocation";
      }
      if (next != live.begin()) {
        auto prev = std::prev(next);
        ASSERT_LE(prev->first + prev->second, r->iova) << "overlaps the previous allocation";
      }
      live.emplace(r->iova, r->len);
    } else {
      auto it = live.begin();
      std::advance(it, static_cast<long>(rng() % live.size()));
      ASSERT_TRUE(a->free({it->first, it->second}));
      live.erase(it);
    }
  }
  EXPECT_GT(refused, 0u) << "the space was meant to run full at times";
  uint64_t pages = 0;
  for (auto& [iova, len] : live) pages += len / K4;
  EXPECT_EQ(a->stats().pages_in_use, pages);
  ASSERT_TRUE(a->check()) << a->check().error().what();
  for (auto& [iova, len] : live) ASSERT_TRUE(a->free({iova, len}));
  ASSERT_TRUE(a->flush());
  ArenaStats s = a->stats();
  EXPECT_EQ(s.pages_in_use, 0u);
  EXPECT_EQ(s.stale_pages, 0u);
  EXPECT_GT(s.borrows, 0u);
  EXPECT_TRUE(a->check()) << a->check().error().what();
}

// The safety property of lazy flush: when an IOVA is handed out again, the
// mapping it had before is already gone (the device can no longer reach the
// old memory through it) and the listener has been told.
TEST(IovaArena, ReuseOnlyAfterUnmap) {
  auto d = sim();
  auto a = arena(*d, small_cfg(0x100000, 64));
  HostPage mem;
  std::set<uint64_t> flushed;  // pages the listener reported as unmapped
  ASSERT_TRUE(a->add_flush_listener([&](std::span<const IovaSpan> spans) {
    for (auto& s : spans) {
      for (uint64_t p = s.iova; p < s.end(); p += K4) {
        // Reported only after the unmap returned.
        EXPECT_FALSE(d->translate(p, 1, kRead)) << std::hex << p;
        flushed.insert(p);
      }
    }
  }));
  std::set<uint64_t> ever_freed;
  std::mt19937_64 rng(7);
  std::vector<IovaSpan> live;
  uint64_t reuses = 0;
  for (int op = 0; op < 3000; ++op) {
    if (live.size() < 10 || (live.size() < 18 && rng() % 2 == 0)) {
      auto r = a->alloc({(1 + rng() % 3) * K4, 0, ~0ull});
      ASSERT_TRUE(r) << r.error().what();
      for (uint64_t p = r->iova; p < r->end(); p += K4) {
        if (ever_freed.count(p)) {
          ++reuses;
          ASSERT_TRUE(flushed.count(p)) << "IOVA handed out again before the listener saw its flush";
          auto old = d->translate(p, K4, kRead);
          ASSERT_FALSE(old) << "IOVA " << std::hex << p << " handed out while still mapped";
          EXPECT_EQ(old.error().code, Errc::fault);
          ever_freed.erase(p);
          flushed.erase(p);
        }
      }
      // One mapping per page, all to the same host page, as a driver would.
      for (uint64_t p = r->iova; p < r->end(); p += K4) ASSERT_TRUE(d->map(mem.get(), p, K4, kReadWrite));
      live.push_back(*r);
    } else {
      const size_t i = rng() % live.size();
      IovaSpan s = live[i];
      live.erase(live.begin() + static_cast<long>(i));
      ASSERT_TRUE(a->free(s));
      // Lazy: still mapped right after free.
      for (uint64_t p = s.iova; p < s.end(); p += K4) {
        if (!flushed.count(p)) {
          EXPECT_TRUE(d->translate(p, K4, kRead)) << std::hex << p;
        }
        ever_freed.insert(p);
      }
    }
  }
  EXPECT_GT(reuses, 100u);
  ArenaStats s = a->stats();
  EXPECT_GT(s.flushes, 0u);
  // Merging: far fewer unmap calls than pages (each page was its own mapping).
  EXPECT_LT(s.unmap_calls, s.ranges_flushed);
  for (auto& l : live) ASSERT_TRUE(a->free(l));
  ASSERT_TRUE(a->flush());
  EXPECT_EQ(d->stats().mappings, 0u);
  EXPECT_TRUE(a->check()) << a->check().error().what();
}

TEST(IovaArena, StalePagesBoundTriggersFlush) {
  auto d = sim();
  ArenaConfig cfg = small_cfg(0x200000, 1024);
  cfg.stale_max_pages = 16;
  auto a = arena(*d, cfg);
  HostPage mem;
  std::vector<IovaSpan> spans;
  for (int i = 0; i < 16; ++i) {
    auto r = a->alloc({K4, 0, ~0ull});
    ASSERT_TRUE(r);
    ASSERT_TRUE(d->map(mem.get(), r->iova, K4, kRead));
    spans.push_back(*r);
  }
  const uint64_t calls0 = d->stats().unmap_calls;
  for (int i = 0; i < 15; ++i) ASSERT_TRUE(a->free(spans[i]));
  EXPECT_EQ(a->stats().stale_pages, 15u);
  EXPECT_EQ(d->stats().unmap_calls, calls0);
  EXPECT_EQ(d->stats().mappings, 16u);
  ASSERT_TRUE(a->free(spans[15]));  // the 16th stale page reaches the bound
  ArenaStats s = a->stats();
  EXPECT_EQ(s.stale_pages, 0u);
  EXPECT_EQ(s.flushes, 1u);
  EXPECT_EQ(s.ranges_flushed, 16u);
  // The 16 adjacent pages merge into one unmap call.
  EXPECT_EQ(d->stats().unmap_calls - calls0, 1u);
  EXPECT_EQ(s.unmap_calls, 1u);
  EXPECT_EQ(d->stats().mappings, 0u);
}

// The page bound holds exactly however fast (1-page) and general (larger)
// frees mix: the fast path counts down to it, the general path compares.
TEST(IovaArena, StalePagesBoundIsExactAcrossFastAndGeneralFrees) {
  auto d = sim();
  ArenaConfig cfg = small_cfg(0x200000, 1024);
  cfg.stale_max_pages = 16;
  auto a = arena(*d, cfg);
  for (const uint64_t big : {6u, 9u}) {  // reaches the bound exactly, then passes it
    const uint64_t flushes0 = a->stats().flushes;
    std::vector<IovaSpan> ones;
    for (int i = 0; i < 10; ++i) ones.push_back(*a->alloc({K4, 0, ~0ull}));
    auto large = a->alloc({big * K4, 0, ~0ull});
    ASSERT_TRUE(large);
    for (auto& o : ones) ASSERT_TRUE(a->free(o));
    EXPECT_EQ(a->stats().stale_pages, 10u);
    EXPECT_EQ(a->stats().flushes, flushes0);
    ASSERT_TRUE(a->free(*large));
    EXPECT_EQ(a->stats().stale_pages, 0u) << big;
    EXPECT_EQ(a->stats().flushes, flushes0 + 1) << big;
  }
  // Allocs between the frees count down too, and never move the bound.
  std::vector<IovaSpan> ones;
  for (int i = 0; i < 8; ++i) ones.push_back(*a->alloc({K4, 0, ~0ull}));
  const uint64_t flushes0 = a->stats().flushes;
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(a->free(ones[static_cast<size_t>(i)]));
    auto extra = a->alloc({K4, 0, ~0ull});
    ASSERT_TRUE(extra);
    EXPECT_EQ(a->stats().flushes, flushes0) << i;  // 2i + 1 stale pages
    ASSERT_TRUE(a->free(*extra));
  }
  EXPECT_EQ(a->stats().flushes, flushes0 + 1);  // the extra free that made 16
  EXPECT_EQ(a->stats().stale_pages, 0u);
  EXPECT_TRUE(a->check()) << a->check().error().what();
}

TEST(IovaArena, StaleAgeBoundTriggersFlush) {
  base::ManualClock clock;
  auto d = sim();
  ArenaConfig cfg = small_cfg(0x200000, 1024);
  cfg.stale_max_age = std::chrono::milliseconds(300);
  auto a = arena(*d, cfg);
  HostPage mem;
  auto r = a->alloc({K4, 0, ~0ull});
  ASSERT_TRUE(r);
  ASSERT_TRUE(d->map(mem.get(), r->iova, K4, kRead));
  ASSERT_TRUE(a->free(*r));
  EXPECT_EQ(a->stats().stale_pages, 1u);
  EXPECT_TRUE(d->translate(r->iova, K4, kRead));
  // Operations before the bound do not flush, however many.
  std::vector<IovaSpan> more;
  for (uint32_t i = 0; i < 3 * kStaleAgeCheckEvery; ++i) more.push_back(*a->alloc({K4, 0, ~0ull}));
  clock.advance(std::chrono::milliseconds(299));
  for (uint32_t i = 0; i < 2 * kStaleAgeCheckEvery; ++i) more.push_back(*a->alloc({K4, 0, ~0ull}));
  EXPECT_EQ(a->stats().flushes, 0u) << "flushed before the age bound";
  // At the bound, the shard notices the age within kStaleAgeCheckEvery operations.
  clock.advance(std::chrono::milliseconds(1));
  for (uint32_t i = 0; i < kStaleAgeCheckEvery; ++i) more.push_back(*a->alloc({K4, 0, ~0ull}));
  EXPECT_EQ(a->stats().stale_pages, 0u);
  EXPECT_EQ(a->stats().flushes, 1u);
  EXPECT_FALSE(d->translate(r->iova, K4, kRead));
  for (auto& m : more) ASSERT_TRUE(a->free(m));
}

// Several owners share an arena (one buffer allocator each): every
// registered listener hears every flush, a removed one nothing more.
TEST(IovaArena, EveryListenerHearsEveryFlushUntilRemoved) {
  auto d = sim();
  auto a = arena(*d, small_cfg(0x100000, 64));
  HostPage mem;
  std::array<uint64_t, 3> heard{};
  std::array<IovaArena::ListenerId, 3> ids{};
  for (size_t i = 0; i < heard.size(); ++i) {
    auto id = a->add_flush_listener([&heard, i](std::span<const IovaSpan> s) {
      for (const auto& r : s) heard[i] += r.len / K4;
    });
    ASSERT_TRUE(id);
    ids[i] = *id;
  }
  EXPECT_NE(ids[0], ids[1]);
  EXPECT_NE(ids[1], ids[2]);
  auto free_and_flush = [&](uint64_t pages) {
    auto r = a->alloc({pages * K4, 0, ~0ull});
    ASSERT_TRUE(r);
    ASSERT_TRUE(d->map(mem.get(), r->iova, K4, kRead));
    ASSERT_TRUE(a->free(*r));
    ASSERT_TRUE(a->flush());
  };
  free_and_flush(1);
  EXPECT_EQ(heard, (std::array<uint64_t, 3>{1, 1, 1}));
  a->remove_flush_listener(ids[1]);
  a->remove_flush_listener(ids[1]);  // unknown now: ignored
  free_and_flush(1);
  EXPECT_EQ(heard, (std::array<uint64_t, 3>{2, 1, 2}));
  EXPECT_FALSE(a->add_flush_listener({}));  // an empty function is refused
}

// remove_flush_listener waits for a listener that is running: afterwards
// its owner may be destroyed.
TEST(IovaArena, RemoveWaitsForARunningListener) {
  auto d = sim();
  auto a = arena(*d, small_cfg(0x100000, 64));
  HostPage mem;
  std::atomic<int> stage{0};  // 1: the listener runs; 2: it may return
  std::atomic<bool> running_after_remove{false};
  auto id = a->add_flush_listener([&](std::span<const IovaSpan>) {
    stage.store(1);
    while (stage.load() != 2) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    running_after_remove.store(false);
  });
  ASSERT_TRUE(id);
  auto r = a->alloc({K4, 0, ~0ull});
  ASSERT_TRUE(r);
  ASSERT_TRUE(d->map(mem.get(), r->iova, K4, kRead));
  ASSERT_TRUE(a->free(*r));
  std::thread flusher([&] { EXPECT_TRUE(a->flush()); });
  while (stage.load() != 1) std::this_thread::yield();
  running_after_remove.store(true);
  stage.store(2);
  a->remove_flush_listener(*id);
  // The listener had to finish (and clear the flag) before remove returned.
  EXPECT_FALSE(running_after_remove.load());
  flusher.join();
}

TEST(IovaArena, StrictModeUnmapsAtFree) {
  auto d = sim();
  ArenaConfig cfg = small_cfg(0x200000, 1024);
  cfg.strict = true;
  auto a = arena(*d, cfg);
  std::vector<IovaSpan> reported;
  ASSERT_TRUE(a->add_flush_listener([&](std::span<const IovaSpan> s) { reported.insert(reported.end(), s.begin(), s.end()); }));
  HostPage mem;
  for (int i = 0; i < 10; ++i) {
    auto r = a->alloc({2 * K4, 0, ~0ull});
    ASSERT_TRUE(r);
    ASSERT_TRUE(d->map(mem.get(), r->iova, K4, kRead));
    ASSERT_TRUE(d->map(mem.get(), r->iova + K4, K4, kRead));
    const uint64_t calls = d->stats().unmap_calls;
    ASSERT_TRUE(a->free(*r));
    EXPECT_EQ(d->stats().unmap_calls, calls + 1);
    EXPECT_FALSE(d->translate(r->iova, K4, kRead));
    EXPECT_FALSE(d->translate(r->iova + K4, K4, kRead));
    ASSERT_FALSE(reported.empty());
    EXPECT_EQ(reported.back(), *r);
  }
  EXPECT_EQ(a->stats().stale_pages, 0u);
  EXPECT_EQ(a->stats().unmap_calls, 10u);
  EXPECT_EQ(d->stats().mappings, 0u);
}

TEST(IovaArena, ExhaustionIsClearAndRecoverable) {
  auto d = sim();
  auto a = arena(*d, small_cfg(0x400000, 64));
  std::vector<IovaSpan> all;
  for (;;) {
    auto r = a->alloc({K4, 0, ~0ull});
    if (!r) {
      EXPECT_EQ(r.error().code, Errc::no_space);
      EXPECT_NE(r.error().message.find("64 of 64 pages in use"), std::string::npos) << r.error().message;
      EXPECT_NE(r.error().message.find("0x1000 bytes"), std::string::npos) << r.error().message;
      break;
    }
    all.push_back(*r);
    ASSERT_LE(all.size(), 64u);
  }
  EXPECT_EQ(all.size(), 64u);
  EXPECT_EQ(a->stats().failures, 1u);
  // Lazy free leaves the page stale; the next request flushes and gets it.
  ASSERT_TRUE(a->free(all[10]));
  EXPECT_EQ(a->stats().stale_pages, 1u);
  auto again = a->alloc({K4, 0, ~0ull});
  ASSERT_TRUE(again) << again.error().what();
  EXPECT_EQ(*again, all[10]);
  EXPECT_EQ(a->stats().stale_pages, 0u);
  // A request bigger than any free run fails; smaller ones still work.
  ASSERT_TRUE(a->free(all[20]));
  ASSERT_TRUE(a->free(all[22]));
  EXPECT_EQ(a->alloc({2 * K4, 0, ~0ull}).error().code, Errc::no_space);
  EXPECT_TRUE(a->alloc({K4, 0, ~0ull}));
  EXPECT_TRUE(a->check()) << a->check().error().what();
}

TEST(IovaArena, NarrowingIsHonoured) {
  auto d = sim();
  ArenaConfig cfg;
  cfg.shards = 4;
  cfg.iova_start = 0x10000000;
  cfg.iova_end = 0x1fffffff;
  auto a = arena(*d, cfg);
  EXPECT_EQ(a->stats().total_pages, 0x10000000 / K4);
  for (auto& s : a->shard_spans()) {
    EXPECT_GE(s.iova, cfg.iova_start);
    EXPECT_LE(s.end() - 1, cfg.iova_end);
  }
  for (uint64_t len : {K4, 64 * K4, 65 * K4, 16 * M2}) {
    auto r = a->alloc({len, 0, ~0ull});
    ASSERT_TRUE(r) << r.error().what();
    EXPECT_GE(r->iova, cfg.iova_start);
    EXPECT_LE(r->end() - 1, cfg.iova_end);
  }
  // Unaligned narrowing bounds shrink to whole pages.
  ArenaConfig odd;
  odd.iova_start = 0x300001;
  odd.iova_end = 0x400fff + 0x800;
  auto b = arena(*d, odd);
  EXPECT_EQ(b->shard_spans().front().iova, 0x301000u);
  EXPECT_EQ(b->stats().total_pages, 0x100u);
}

TEST(IovaArena, BadFreesChangeNothing) {
  auto d = sim();
  auto a = arena(*d, small_cfg(0x800000, 256));
  auto r = a->alloc({4 * K4, 0, ~0ull});
  ASSERT_TRUE(r);
  auto other = a->alloc({K4, 0, ~0ull});
  ASSERT_TRUE(other);
  const ArenaStats before = a->stats();
  auto expect_corrupted = [&](IovaSpan s) {
    auto st = a->free(s);
    ASSERT_FALSE(st) << std::hex << s.iova << " " << s.len;
    EXPECT_EQ(st.error().code, Errc::corrupted) << st.error().what();
    EXPECT_NE(st.error().message.find(fmt::format("{:#x}", s.iova)), std::string::npos) << st.error().message;
  };
  expect_corrupted({r->iova, 3 * K4});           // too short
  expect_corrupted({r->iova, 5 * K4});           // too long (covers the next allocation)
  expect_corrupted({r->iova + K4, 3 * K4});      // not its start
  expect_corrupted({r->iova + 100, 4 * K4});     // not page aligned
  expect_corrupted({r->iova, 0});                // empty
  expect_corrupted({0x800000 + 200 * K4, K4});   // never allocated
  expect_corrupted({0x10000000, K4});            // outside the arena
  EXPECT_EQ(a->stats().pages_in_use, before.pages_in_use);
  EXPECT_EQ(a->stats().stale_pages, before.stale_pages);
  ASSERT_TRUE(a->check()) << a->check().error().what();
  ASSERT_TRUE(a->free({r->iova, 4 * K4 - 10}));  // the requested, unrounded length is accepted
  expect_corrupted(*r);                          // double free
  ASSERT_TRUE(a->free(*other));
  EXPECT_EQ(a->stats().pages_in_use, 0u);
  EXPECT_TRUE(a->check()) << a->check().error().what();
}

TEST(IovaArena, FailedUnmapKeepsTheRangeReserved) {
  auto d = sim();
  auto a = arena(*d, small_cfg(0x1000000, 64));
  HostPage mem;
  auto first = a->alloc({K4, 0, ~0ull});
  auto second = a->alloc({K4, 0, ~0ull});
  ASSERT_TRUE(first && second);
  ASSERT_EQ(second->iova, first->end());
  // A (misbehaving) caller maps both allocations with one mapping, so the
  // unmap of just the first would split it: type1 refuses.
  ASSERT_TRUE(d->map(mem.get(), first->iova, K4, kRead));
  ASSERT_TRUE(d->unmap(first->iova, K4));
  std::vector<char> two(2 * K4 + K4);
  void* base = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(two.data()) + K4 - 1) & ~(K4 - 1));
  ASSERT_TRUE(d->map(base, first->iova, 2 * K4, kRead));
  ASSERT_TRUE(a->free(*first));
  auto st = a->flush();
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().sys_errno, EINVAL);
  EXPECT_NE(st.error().message.find(fmt::format("{:#x}", first->iova)), std::string::npos) << st.error().message;
  ArenaStats s = a->stats();
  EXPECT_EQ(s.flush_errors, 1u);
  EXPECT_EQ(s.stale_pages, 1u);
  // Fill the arena: the stale page is never handed out.
  std::vector<IovaSpan> rest;
  while (auto r = a->alloc({K4, 0, ~0ull})) {
    EXPECT_NE(r->iova, first->iova);
    rest.push_back(*r);
  }
  EXPECT_EQ(rest.size(), 62u);
  // Once the caller fixes its mapping, a flush succeeds.
  ASSERT_TRUE(d->unmap(first->iova, 2 * K4));
  ASSERT_TRUE(a->flush());
  EXPECT_EQ(a->stats().stale_pages, 0u);
  ASSERT_TRUE(a->check()) << a->check().error().what();
}

TEST(IovaArena, BorrowsWhenTheHomeShardIsFull) {
  auto d = sim();
  ArenaConfig cfg;
  cfg.shards = 2;
  cfg.large_share = 0;
  cfg.iova_start = 0x1000000;
  cfg.iova_end = 0x1000000 + 2048 * K4 - 1;  // two shards of 1024 pages
  auto a = arena(*d, cfg);
  auto spans = a->shard_spans();
  ASSERT_EQ(spans.size(), 2u);
  auto r = a->alloc({K4, 0, ~0ull});
  ASSERT_TRUE(r);
  const IovaSpan home = r->iova < spans[1].iova ? spans[0] : spans[1];
  uint64_t n = 1;
  for (;;) {
    auto x = a->alloc({K4, 0, ~0ull});
    ASSERT_TRUE(x) << x.error().what();
    if (x->iova < home.iova || x->iova >= home.end()) break;
    ++n;
  }
  EXPECT_EQ(n, home.len / K4);
  EXPECT_EQ(a->stats().borrows, 1u);
}

// The one-page path (lazy mode, home shard, a free bit in the hint's word)
// keeps every rule of the general path: lengths round up, bad alignments and
// bad frees are refused with nothing changed, limits and holes are honoured,
// and large_threshold_pages 0 still sends one page to the large shard.
TEST(IovaArena, OnePagePathKeepsTheRules) {
  auto d = sim();
  auto a = arena(*d, small_cfg(0x2000000, 256));
  auto r = a->alloc({K4, 0, ~0ull});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->len, K4);
  auto r2 = a->alloc({100, K4, ~0ull});  // shorter than a page, page alignment
  ASSERT_TRUE(r2);
  EXPECT_EQ(r2->len, K4);
  EXPECT_EQ(r2->iova, r->end());
  EXPECT_EQ(a->alloc({K4, 3, ~0ull}).error().code, Errc::invalid_argument);
  ASSERT_TRUE(a->free(*r));
  const ArenaStats before = a->stats();
  EXPECT_EQ(before.pages_in_use, 1u);
  EXPECT_EQ(before.stale_pages, 1u);
  EXPECT_EQ(a->free(*r).error().code, Errc::corrupted);                  // double free
  EXPECT_EQ(a->free({r->iova + 2 * K4, K4}).error().code, Errc::corrupted);  // never allocated
  EXPECT_EQ(a->free({r2->iova, 2 * K4}).error().code, Errc::corrupted);  // wrong length
  EXPECT_EQ(a->stats().pages_in_use, before.pages_in_use);
  EXPECT_EQ(a->stats().stale_pages, before.stale_pages);
  ASSERT_TRUE(a->check()) << a->check().error().what();
  auto low = a->alloc({K4, 0, 0x2000000 + 4 * K4 - 1});  // a limit inside the space
  ASSERT_TRUE(low) << low.error().what();
  EXPECT_LE(low->end() - 1, 0x2000000 + 4 * K4 - 1);
  ASSERT_TRUE(a->free(*low));
  ASSERT_TRUE(a->free({r2->iova, 100}));
  EXPECT_EQ(a->stats().pages_in_use, 0u);
  EXPECT_TRUE(a->check()) << a->check().error().what();

  ArenaConfig cfg;
  cfg.shards = 2;
  cfg.large_threshold_pages = 0;
  auto b = arena(*d, cfg);
  auto one = b->alloc({K4, 0, ~0ull});
  ASSERT_TRUE(one);
  EXPECT_GE(one->iova, b->shard_spans().back().iova);
  EXPECT_EQ(b->free({kMsiStart, K4}).error().code, Errc::corrupted);  // a page of the hole
  ASSERT_TRUE(b->free(*one));
  EXPECT_TRUE(b->check()) << b->check().error().what();
}

// The benchmark behind `dmakit bench arena`, on the model: it must succeed,
// report every case, and leave the domain as it found it.
TEST(ArenaBench, RunsAndChecksItsOwnWork) {
  auto d = sim();
  HostPage mem;
  ASSERT_TRUE(d->map(mem.get(), 0x10000, K4, kRead));  // someone else's mapping, outside the region
  bench::ArenaBenchOptions opt;
  opt.cycles = 3000;
  opt.pairs = 3000;
  opt.repeats = 3;
  auto r = bench::run_arena(*d, {1ull << 32, 1ull << 30}, opt);
  ASSERT_TRUE(r) << r.error().what();
  const std::string json = r->dump();
  for (const char* field : {"\"bench\":\"arena\"", "\"case\":\"alloc_free\",\"pages\":1,\"threads\":1",
                            "\"pages\":16", "\"pages\":512", "\"threads\":2", "\"ops_per_sec\"",
                            "\"mode\":\"lazy\"", "\"mode\":\"strict\",\"cycles\":3000,\"unmap_calls\":3000,"})
    EXPECT_NE(json.find(field), std::string::npos) << field << " missing in " << json;
  EXPECT_EQ(d->stats().mappings, 1u);
  EXPECT_TRUE(d->translate(0x10000, K4, kRead));
}

}  // namespace
}  // namespace dmakit::iommu

namespace dmakit::iommu {
namespace {

uint64_t rss_bytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) << 10;
  return 0;
}

// A 48-bit IOMMU (aw-bits=48): the default arena covers the whole window,
// not only its low 512 GiB, and what it costs in memory follows use.
TEST(IovaArena48, DefaultArenaCoversTheWhole48BitWindow) {
  SimConfig sc;
  sc.address_bits = 48;
  auto d = sim(sc);
  ASSERT_TRUE(d);
  const uint64_t rss_before = rss_bytes();
  auto a = arena(*d, ArenaConfig{});
  ASSERT_TRUE(a);
  uint64_t end = 0;
  for (const auto& sp : a->shard_spans()) end = std::max(end, sp.iova + sp.len);
  EXPECT_EQ(end, 1ull << 48) << "the arena stops short of the window's end";

  // A request for memory above 512 GiB only (as a device window might) and
  // one in the top gigabyte.
  ArenaConfig high;
  high.iova_start = 1ull << 40;
  auto h = arena(*d, high);
  ASSERT_TRUE(h);
  auto s = h->alloc(IovaRequest{64 * K4});
  ASSERT_TRUE(s) << s.error().what();
  EXPECT_GE(s->iova, 1ull << 40);
  HostPage page;
  ASSERT_NE(page.get(), nullptr);
  ASSERT_TRUE(d->map(page.get(), s->iova, K4, kReadWrite));
  ASSERT_TRUE(d->unmap(s->iova, K4));
  ASSERT_TRUE(h->free(*s));

  ArenaConfig top;
  top.iova_start = (1ull << 48) - G1;
  auto t = arena(*d, top);
  ASSERT_TRUE(t);
  auto big = t->alloc(IovaRequest{M2, M2});
  ASSERT_TRUE(big) << big.error().what();
  EXPECT_GE(big->iova, (1ull << 48) - G1);
  EXPECT_LE(big->iova + big->len - 1, (1ull << 48) - 1);
  ASSERT_TRUE(t->free(*big));

  // Many allocations spread over the space touch only the bitmap pages
  // they use: the process grows by far less than the 32 GiB reserved.
  std::vector<IovaSpan> spans;
  for (int i = 0; i < 1000; ++i) {
    auto x = a->alloc(IovaRequest{K4});
    ASSERT_TRUE(x) << x.error().what();
    spans.push_back(*x);
  }
  for (const auto& x : spans) ASSERT_TRUE(a->free(x));
  EXPECT_LT(rss_bytes(), rss_before + (64ull << 20)) << "the bitmaps cost memory for the whole window";
  // The bookkeeping allocated is the directory and the few segments used.
  EXPECT_GT(a->stats().bitmap_bytes, 0u);
  EXPECT_LT(a->stats().bitmap_bytes, 2ull << 20);
  EXPECT_LT(t->stats().bitmap_bytes, 1ull << 20);
  ASSERT_TRUE(a->check());
  ASSERT_TRUE(t->check());
}

// The same arena where the address space is scarce: RLIMIT_AS counts every
// mapping, MAP_NORESERVE or not, as strict overcommit charges every writable
// one; with 256 MiB to spare the whole 48-bit arena starts and serves IOVAs
// above 512 GiB and in the top gigabyte.
TEST(IovaArena48, StartsAndWorksWithLittleAddressSpace) {
  auto [code, msg] = testing_child::run_in_child([] {
    SimConfig sc;
    sc.address_bits = 48;
    auto d = SimDomain::create(sc);
    if (!d) return std::pair<int, std::string>(1, d.error().what());
    if (!testing_child::limit_address_space(256ull << 20)) return std::pair<int, std::string>(1, "setrlimit");
    auto a = IovaArena::create(**d, ArenaConfig{});
    if (!a) return std::pair<int, std::string>(2, a.error().what());
    ArenaConfig high;
    high.iova_start = 1ull << 40;
    auto h = IovaArena::create(**d, high);
    if (!h) return std::pair<int, std::string>(3, h.error().what());
    std::vector<IovaSpan> got;
    for (int i = 0; i < 4096; ++i) {
      auto s = (i % 2 ? *h : *a)->alloc(IovaRequest{i % 3 == 0 ? 64 * K4 : K4});
      if (!s) return std::pair<int, std::string>(4, s.error().what());
      if (i % 2 && s->iova < (1ull << 40)) return std::pair<int, std::string>(5, "IOVA below 1 TiB");
      got.push_back(*s);
    }
    for (size_t i = 0; i < got.size(); ++i)
      if (auto st = (i % 2 ? *h : *a)->free(got[i]); !st) return std::pair<int, std::string>(6, st.error().what());
    if (auto st = (*a)->check(); !st) return std::pair<int, std::string>(7, st.error().what());
    if (auto st = (*h)->check(); !st) return std::pair<int, std::string>(7, st.error().what());
    return std::pair<int, std::string>(0, std::to_string((*a)->stats().bitmap_bytes + (*h)->stats().bitmap_bytes));
  });
  ASSERT_EQ(code, 0) << msg;
  EXPECT_LT(std::stoull(msg), 4ull << 20) << "bytes of bookkeeping";
}

// A 57-bit IOMMU (5-level paging): the default arena covers the whole
// window; the large shard sits in its top quarter, far above 48 bits, and
// the bookkeeping stays small.
TEST(IovaArena57, DefaultArenaCoversTheWhole57BitWindow) {
  SimConfig sc;
  sc.address_bits = 57;
  auto d = sim(sc);
  ASSERT_TRUE(d);
  auto a = arena(*d, ArenaConfig{});
  ASSERT_TRUE(a);
  uint64_t end = 0;
  for (const auto& sp : a->shard_spans()) end = std::max(end, sp.iova + sp.len);
  EXPECT_EQ(end, 1ull << 57) << "the arena stops short of the window's end";
  EXPECT_EQ(a->stats().total_pages, ((1ull << 57) >> 12) - 1 - 256);  // less IOVA 0 and the MSI hole
  ASSERT_TRUE(a->stats().large_shard);

  auto big = a->alloc(IovaRequest{M2, M2});  // above large_threshold_pages: the large shard
  ASSERT_TRUE(big) << big.error().what();
  EXPECT_GE(big->iova, 1ull << 48) << "a large request stays below 48 bits";
  auto small = a->alloc(IovaRequest{K4});
  ASSERT_TRUE(small) << small.error().what();
  HostPage page;
  ASSERT_NE(page.get(), nullptr);
  ASSERT_TRUE(d->map(page.get(), big->iova + M2 - K4, K4, kReadWrite));
  auto view = d->translate(big->iova + M2 - K4, K4, kWrite);
  ASSERT_TRUE(view) << view.error().what();
  ASSERT_TRUE(a->free(*big));
  ASSERT_TRUE(a->free(*small));
  ASSERT_TRUE(a->flush());
  EXPECT_EQ(d->stats().mappings, 0u) << "the flush did not unmap the stale range";

  ArenaConfig top;
  top.iova_start = (1ull << 57) - G1;
  auto t = arena(*d, top);
  ASSERT_TRUE(t);
  auto hi = t->alloc(IovaRequest{64 * K4});
  ASSERT_TRUE(hi) << hi.error().what();
  EXPECT_GE(hi->iova, (1ull << 57) - G1);
  ASSERT_TRUE(t->free(*hi));

  EXPECT_LT(a->stats().bitmap_bytes, 2ull << 20);
  ASSERT_TRUE(a->check());
  ASSERT_TRUE(t->check());
}

// Holes cost nothing however large: two windows 2^50 pages apart.
TEST(IovaArena57, AHugeHoleBetweenWindowsIsNeitherHandedOutNorPaidFor) {
  SimConfig sc;
  sc.address_bits = 57;
  sc.windows = {{1ull << 20, (1ull << 30) - 1}, {1ull << 56, (1ull << 57) - 1}};
  auto d = sim(sc);
  ASSERT_TRUE(d);
  ArenaConfig cfg;
  cfg.shards = 1;
  cfg.large_share = 0;
  cfg.large_threshold_pages = 1ull << 40;  // every request starts low
  cfg.stale_max_pages = 0;
  cfg.stale_max_age = std::chrono::milliseconds(0);
  cfg.iova_end = (1ull << 56) + (1ull << 40) - 1;  // a TiB of the upper window
  auto a = arena(*d, cfg);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->stats().total_pages, (((1ull << 30) - (1ull << 20)) >> 12) + ((1ull << 40) >> 12));
  EXPECT_LT(a->stats().bitmap_bytes, 1ull << 20);
  // The whole lower window, then the next range comes from above the hole.
  auto low = a->alloc(IovaRequest{(1ull << 30) - (1ull << 20)});
  ASSERT_TRUE(low) << low.error().what();
  EXPECT_EQ(low->iova, 1ull << 20);
  auto up = a->alloc(IovaRequest{K4});
  ASSERT_TRUE(up) << up.error().what();
  EXPECT_EQ(up->iova, 1ull << 56);
  ASSERT_TRUE(a->check());
  ASSERT_TRUE(a->free(*low));
  ASSERT_TRUE(a->free(*up));
  ASSERT_TRUE(a->flush());
  ASSERT_TRUE(a->check());
}

}  // namespace
}  // namespace dmakit::iommu
