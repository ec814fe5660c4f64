// Anonymous buffers stay intact while the EAL runs out of hugepages.
//
// When the EAL cannot get a hugepage it leaves a one-page hole in its memory
// list for a moment and then maps PROT_NONE over it with MAP_FIXED; memory
// that another thread's mmap(NULL) placed in the hole meanwhile is replaced
// without a word (see AnonSource in memory_source.cpp). The kernel picks such
// a hole when it is the highest free gap that fits, which is the case when
// the memory lists sit among the process's other mappings (under ASan, whose
// shadow gap takes the EAL's 4 GiB hint). This binary builds that layout on
// purpose: the EAL's base-address hint points into a reservation of its own,
// so the EAL lets the kernel place the lists top-down, and every free gap
// above the lowest list is then filled with PROT_NONE. From then on a hole the
// EAL opens is the first place the kernel would put a small mmap(NULL).
//
// Needs root: reserves 16 2 MiB pages on demand (nr_overcommit_hugepages) and
// puts the old value back at exit. Its own binary: the EAL starts once per
// process, and the filled address space must not meet other tests.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "alloc_buffer/buffer_allocator.hpp"
#include "base/eal.hpp"
#include "buffer_support.hpp"
#include "hugepage_reservation.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"

using namespace dmakit;
using namespace dmakit::alloc_buffer;

namespace {

constexpr uint64_t K = 1024, M = 1024 * 1024;
constexpr uint64_t kPages = 16;  // 32 MiB on demand

// Fills every free gap between `from` and the stack with PROT_NONE, so that
// the kernel's next mmap(NULL) goes to a hole that opens above `from` later,
// or else below `from`. Returns the number of gaps filled.
size_t fill_gaps_above(uintptr_t from) {
  std::ifstream in("/proc/self/maps");
  std::vector<std::pair<uintptr_t, uintptr_t>> maps;
  for (std::string line; std::getline(in, line);) {
    if (line.find("[stack]") != std::string::npos) break;
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &lo, &hi) == 2) maps.emplace_back(lo, hi);
  }
  size_t filled = 0;
  for (size_t i = 0; i + 1 < maps.size(); ++i) {
    const uintptr_t lo = std::max<uintptr_t>(maps[i].second, from), hi = maps[i + 1].first;
    if (lo >= hi) continue;
    void* p = ::mmap(reinterpret_cast<void*>(lo), hi - lo, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
    if (p != MAP_FAILED) ++filled;
  }
  return filled;
}

// The value to put back into nr_overcommit_hugepages if the test crashes.
char g_overcommit_before[24];
size_t g_overcommit_before_len = 0;

// A crash - the failure this binary exists to catch - skips destructors, and
// the reservation would stay raised: put the old value back first, then let
// the signal end the process.
void restore_and_die(int sig) {
  const int fd = ::open(test::HugepageReservation::kOvercommit, O_WRONLY);
  if (fd >= 0) {
    [[maybe_unused]] ssize_t n = ::write(fd, g_overcommit_before, g_overcommit_before_len);
    ::close(fd);
  }
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

class ClobberEnv : public ::testing::Environment {
 public:
  void SetUp() override {
    ASSERT_EQ(::geteuid(), 0u) << "this test reserves hugepages and must run as root";
    reservation_ = std::make_unique<test::HugepageReservation>(kPages);
    ASSERT_TRUE(reservation_->ok()) << "could not set " << test::HugepageReservation::kOvercommit;
    {
      std::ifstream in(test::HugepageReservation::kOvercommit);
      uint64_t now = 0;
      in >> now;
      const std::string before = std::to_string(now - kPages);
      g_overcommit_before_len = before.copy(g_overcommit_before, sizeof g_overcommit_before - 1);
      ::signal(SIGSEGV, restore_and_die);
      ::signal(SIGBUS, restore_and_die);
    }
    // The EAL's hint lands inside this reservation, so it is taken (every
    // retry too: they step by at most 1 GiB) and the kernel places the lists.
    constexpr uint64_t kHintArea = 64ull << 30;
    void* hint = ::mmap(nullptr, kHintArea, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    ASSERT_NE(hint, MAP_FAILED);
    base::EalSettings e;
    e.mode = "huge";
    e.extra_args = fmt::format("--base-virtaddr={:#x}", (reinterpret_cast<uintptr_t>(hint) + 2 * M) & ~(2 * M - 1));
    auto r = base::ensure_eal(e);
    ASSERT_TRUE(r) << r.error().what();
    ASSERT_TRUE((*r)->hugepages);
    lists_ = eal_memory_lists();
    ASSERT_FALSE(lists_.empty());
    ASSERT_GT(fill_gaps_above(lists_.front().base), 0u);
  }
  void TearDown() override {
    ::signal(SIGSEGV, SIG_DFL);
    ::signal(SIGBUS, SIG_DFL);
    reservation_.reset();
  }

  static const std::vector<AddressRange>& lists() { return lists_; }

 private:
  std::unique_ptr<test::HugepageReservation> reservation_;
  static inline std::vector<AddressRange> lists_;
};

const auto* const g_env = ::testing::AddGlobalTestEnvironment(new ClobberEnv);

bool inside_eal(const void* p, uint64_t len) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  return std::any_of(ClobberEnv::lists().begin(), ClobberEnv::lists().end(),
                     [&](const AddressRange& l) { return a < l.base + l.len && l.base < a + len; });
}

class ClobberTest : public buftest::RealSourcesTest {
 protected:
  void SetUp() override {
    iommu::ArenaConfig ac;
    ac.strict = true;  // memory goes back to its source at once, so hugepages come and go
    alloc_buffer::BufferSettings s;
    s.psi = false;
    s.prezero = false;
    s.backoff_ms = 0;       // every request tries hugepages again
    s.recycle_high_mb = 0;  // no recycling: every free goes back to the sources
    make(ac, s);
  }
};

// Two words of every page carry the buffer's pattern: enough to see a page
// that turned PROT_NONE (SEGV) or was replaced by zeros.
uint64_t word(uint64_t seed, uint64_t offset) { return (seed * 0x9e3779b97f4a7c15ull) ^ offset ^ 0x5a5a5a5a5a5a5a5aull; }

void fill(const Buffer& b, uint64_t seed) {
  for (uint64_t off = 0; off < b.size(); off += 4 * K) {
    for (uint64_t o : {off, std::min(off + 4 * K, b.size()) - 8}) {
      const uint64_t w = word(seed, o);
      std::memcpy(b.at(o), &w, 8);
    }
  }
}

// Offset of the first word that lost its pattern, or ~0.
uint64_t first_bad(const Buffer& b, uint64_t seed) {
  for (uint64_t off = 0; off < b.size(); off += 4 * K) {
    for (uint64_t o : {off, std::min(off + 4 * K, b.size()) - 8}) {
      uint64_t w = 0;
      std::memcpy(&w, b.at(o), 8);
      if (w != word(seed, o)) return o;
    }
  }
  return ~0ull;
}

// Holds every 2 MiB page the EAL can get but `leave`, whatever other
// processes reserved: the allocator then runs out after `leave` pages.
class PageHog {
 public:
  explicit PageHog(uint64_t leave) {
    auto s = make_hugepage_source(kPage2M, 1);
    if (!s) return;
    src_ = std::move(*s);
    for (auto p = src_->take(kPage2M); p && pages_.size() < 100000; p = src_->take(kPage2M)) pages_.push_back(*p);
    for (uint64_t i = 0; i < leave && !pages_.empty(); ++i) {
      src_->give(pages_.back(), kPage2M);
      pages_.pop_back();
    }
  }
  ~PageHog() {
    for (void* p : pages_) src_->give(p, kPage2M);
  }
  PageHog(const PageHog&) = delete;
  PageHog& operator=(const PageHog&) = delete;

 private:
  std::unique_ptr<MemorySource> src_;
  std::vector<void*> pages_;
};

TEST_F(ClobberTest, AnonymousBuffersSurviveHugepageExhaustion) {
  constexpr int kThreads = 4, kOps = 500, kHeld = 4;
  PageHog hog(8);  // 16 MiB of hugepages for buffers of up to 4 MiB, up to 5 held per thread
  std::atomic<uint64_t> alloc_failures{0}, corrupt{0}, anon_in_eal{0}, anon_chunks{0};
  auto work = [&](int t) {
    std::mt19937_64 rng(1000 + t);
    struct Held {
      Buffer b;
      uint64_t seed;
    };
    std::vector<Held> held;
    auto drop = [&](size_t i) {
      if (uint64_t bad = first_bad(held[i].b, held[i].seed); bad != ~0ull) {
        corrupt.fetch_add(1);
        ADD_FAILURE() << "buffer of " << held[i].b.size() << " bytes lost its bytes at offset " << bad;
      }
      held.erase(held.begin() + static_cast<std::ptrdiff_t>(i));
    };
    for (int i = 0; i < kOps; ++i) {
      // Up to 4 MiB, mostly not a multiple of 64 KiB: most buffers end in an anonymous run.
      const uint64_t len = 4 * K * (1 + rng() % 1024);
      auto b = alloc_->alloc({.len = len});
      if (!b) {
        alloc_failures.fetch_add(1);
        continue;
      }
      for (const BufferChunk& c : b->chunks()) {
        if (!c.source.starts_with("anon")) continue;
        anon_chunks.fetch_add(1);
        if (inside_eal(c.vaddr, c.len)) anon_in_eal.fetch_add(1);
      }
      const uint64_t seed = (uint64_t(t) << 32) | uint64_t(i);
      fill(*b, seed);
      held.push_back({std::move(*b), seed});
      if (held.size() > kHeld) drop(rng() % held.size());
    }
    while (!held.empty()) drop(held.size() - 1);
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(work, t);
  for (auto& th : threads) th.join();

  EXPECT_EQ(corrupt.load(), 0u);
  EXPECT_EQ(anon_in_eal.load(), 0u) << "anonymous chunks placed inside EAL memory lists";
  EXPECT_EQ(alloc_failures.load(), 0u) << "anonymous memory is the last resort and should not run out";
  EXPECT_GT(anon_chunks.load(), uint64_t{kThreads * kOps / 2});
  const MemorySource* huge = source("hugepage-2M");
  ASSERT_NE(huge, nullptr);
  EXPECT_GT(huge->stats().failures, 0u) << "hugepages never ran out: the test did not test anything";
  EXPECT_GT(huge->stats().takes, 0u);
}

// Where the allocator's anonymous memory lives: in regions that no EAL page
// could hold and that keep clear of the EAL's memory lists.
TEST_F(ClobberTest, AnonymousRegionsKeepClearOfTheEal) {
  std::vector<Buffer> held;
  for (uint64_t len : {4 * K, 12 * K, 2 * M + 4 * K, 40 * M + 4 * K}) {
    auto b = alloc_->alloc({.len = len});
    ASSERT_TRUE(b) << b.error().what();
    held.push_back(std::move(*b));
  }
  const MemorySource* anon = source("anon-4K");
  ASSERT_NE(anon, nullptr);
  const std::vector<AddressRange> regions = anon->regions();
  ASSERT_FALSE(regions.empty());
  const uint64_t largest_page = eal_has_page_size(kPage1G) ? kPage1G : kPage2M;
  for (const AddressRange& r : regions) {
    EXPECT_GT(r.len, largest_page);
    EXPECT_FALSE(inside_eal(reinterpret_cast<void*>(r.base), r.len)) << std::hex << r.base;
  }
  for (const Buffer& b : held) {
    for (const BufferChunk& c : b.chunks()) {
      if (!c.source.starts_with("anon")) continue;
      const auto a = reinterpret_cast<uintptr_t>(c.vaddr);
      EXPECT_TRUE(std::any_of(regions.begin(), regions.end(),
                              [&](const AddressRange& r) { return a >= r.base && a + c.len <= r.base + r.len; }))
          << c.vaddr;
    }
  }
}

}  // namespace
