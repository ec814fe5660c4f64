// AnonSource: anonymous memory committed inside address-space regions the
// source reserves for itself (no EAL in this binary; the hugepage case is in
// hugepage_clobber_test). Checks alignment, runs, reuse, zero fill, the
// regions seen in /proc/self/maps, their release, their size under an
// address-space limit, and that a wrong give is refused and logged.
#include <gtest/gtest.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "alloc_buffer/memory_source.hpp"
#include "base/log.hpp"

using namespace dmakit;
using namespace dmakit::alloc_buffer;

namespace {

constexpr uint64_t K = 1024, M = 1024 * 1024;

std::unique_ptr<MemorySource> anon(uint64_t order, bool runs = true) {
  auto s = make_anon_source(order, runs);
  EXPECT_TRUE(s) << s.error().what();
  return s ? std::move(*s) : nullptr;
}

// The permissions ("rw-p", "---p") of the mapping holding `p`, or "" when
// nothing is mapped there.
std::string perms_at(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  std::ifstream in("/proc/self/maps");
  for (std::string line; std::getline(in, line);) {
    unsigned long lo = 0, hi = 0;
    char perms[5] = {};
    if (std::sscanf(line.c_str(), "%lx-%lx %4s", &lo, &hi, perms) == 3 && a >= lo && a < hi) return perms;
  }
  return "";
}

bool inside(const std::vector<AddressRange>& regions, const void* p, uint64_t len) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  for (const AddressRange& r : regions)
    if (a >= r.base && a + len <= r.base + r.len) return true;
  return false;
}

TEST(AnonSource, PiecesAreAlignedToTheirOrderInsideAReservedRegion) {
  for (uint64_t order : {4 * K, 64 * K, 2 * M}) {
    auto src = anon(order);
    std::vector<void*> got;
    for (int i = 0; i < 5; ++i) {
      auto p = src->take(order * uint64_t(1 + i % 2));
      ASSERT_TRUE(p) << p.error().what();
      EXPECT_EQ(reinterpret_cast<uintptr_t>(*p) % order, 0u) << size_name(order);
      got.push_back(*p);
    }
    const auto regions = src->regions();
    ASSERT_EQ(regions.size(), 1u);
    EXPECT_GE(regions[0].len, 1ull << 30) << "a region is at least 1 GiB unless the kernel refuses it";
    for (void* p : got) {
      EXPECT_TRUE(inside(regions, p, order)) << p;
      EXPECT_EQ(perms_at(p), "rw-p");
    }
    // The rest of the region is reserved, not unmapped.
    const auto* last = static_cast<char*>(reinterpret_cast<void*>(regions[0].base)) + regions[0].len - 4 * K;
    EXPECT_EQ(perms_at(last), "---p");
    for (size_t i = 0; i < got.size(); ++i) src->give(got[i], order * uint64_t(1 + i % 2));
    EXPECT_EQ(src->stats().live_bytes, 0u);
    EXPECT_EQ(src->stats().takes, 5u);
  }
}

TEST(AnonSource, ARunIsOneContiguousRangeAndConsecutiveTakesFollowIt) {
  auto src = anon(4 * K);
  auto run = src->take(256 * K);
  ASSERT_TRUE(run) << run.error().what();
  auto next = src->take(4 * K);
  ASSERT_TRUE(next);
  EXPECT_EQ(static_cast<char*>(*run) + 256 * K, *next) << "first fit: the next piece follows the run";
  std::memset(*run, 0xab, 256 * K);  // all of it is committed
  for (uint64_t off = 0; off < 256 * K; off += 4 * K) EXPECT_EQ(perms_at(static_cast<char*>(*run) + off), "rw-p");
  src->give(*run, 256 * K);
  src->give(*next, 4 * K);
  EXPECT_EQ(perms_at(*run), "---p");

  auto single = anon(64 * K, false);
  EXPECT_EQ(single->max_run(), 64 * K);
  auto two = single->take(128 * K);
  ASSERT_FALSE(two);
  EXPECT_EQ(two.error().code, Errc::invalid_argument);
  EXPECT_EQ(single->stats().failures, 1u);
}

TEST(AnonSource, GivenPiecesAreReusedAndReadZeroAgain) {
  auto src = anon(4 * K);
  ASSERT_TRUE(src->fresh_zero());
  auto a = src->take(3 * 4 * K);
  ASSERT_TRUE(a);
  std::memset(*a, 0x5c, 3 * 4 * K);
  src->give(*a, 3 * 4 * K);
  auto b = src->take(3 * 4 * K);
  ASSERT_TRUE(b);
  EXPECT_EQ(*b, *a) << "the lowest free range is taken first";
  const auto* bytes = static_cast<const unsigned char*>(*b);
  for (uint64_t i = 0; i < 3 * 4 * K; ++i) ASSERT_EQ(bytes[i], 0) << "byte " << i << " survived its give";

  // Three neighbours given back in any order coalesce into one free range.
  auto x = src->take(4 * K), y = src->take(4 * K), z = src->take(4 * K);
  ASSERT_TRUE(x && y && z);
  ASSERT_EQ(static_cast<char*>(*b) + 3 * 4 * K, *x);
  ASSERT_EQ(static_cast<char*>(*x) + 4 * K, *y);
  ASSERT_EQ(static_cast<char*>(*y) + 4 * K, *z);
  src->give(*y, 4 * K);
  src->give(*b, 3 * 4 * K);
  src->give(*z, 4 * K);
  src->give(*x, 4 * K);
  auto all = src->take(6 * 4 * K);
  ASSERT_TRUE(all);
  EXPECT_EQ(*all, *a);
  src->give(*all, 6 * 4 * K);
  EXPECT_EQ(src->stats().live_bytes, 0u);
}

// Pinned memory must not turn copy-on-write in a fork: the child does not
// get the pieces at all, and the parent's bytes stay where the device maps them.
TEST(AnonSource, PiecesAreNotInheritedByAForkedChild) {
  auto src = anon(4 * K);
  ASSERT_NE(src, nullptr);
  auto p = src->take(16 * K);
  ASSERT_TRUE(p) << p.error().what();
  auto* bytes = static_cast<volatile unsigned char*>(*p);
  bytes[0] = 0x5a;
  pid_t child = ::fork();
  if (child == 0) ::_exit(perms_at(*p).empty() ? 0 : 1);  // nothing mapped there in the child
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the child inherited the piece";
  bytes[0] = 0xa5;  // the parent writes its own page, no copy is made
  EXPECT_EQ(bytes[0], 0xa5);
  EXPECT_EQ(perms_at(*p), "rw-p");
  src->give(*p, 16 * K);
}

TEST(AnonSource, AWhollyFreeRegionIsReleasedUnlessItIsTheLast) {
  auto src = anon(4 * K);
  auto small = src->take(4 * K);
  ASSERT_TRUE(small);
  ASSERT_EQ(src->regions().size(), 1u);
  const uint64_t first_len = src->regions()[0].len;
  // Does not fit beside the small piece: a second region (its pages are never touched).
  auto big = src->take(first_len);
  ASSERT_TRUE(big) << big.error().what();
  const auto two = src->regions();
  ASSERT_EQ(two.size(), 2u);
  EXPECT_TRUE(inside(two, *big, first_len));
  src->give(*big, first_len);
  EXPECT_EQ(perms_at(*big), "") << "the second region was released";
  ASSERT_EQ(src->regions().size(), 1u);
  src->give(*small, 4 * K);
  ASSERT_EQ(src->regions().size(), 1u) << "the last region stays reserved";
  EXPECT_EQ(perms_at(*small), "---p");
}

TEST(AnonSource, AWrongGiveIsRefusedAndLogged) {
  auto sink = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(100);
  base::log().sinks().push_back(sink);
  auto src = anon(4 * K);
  auto a = src->take(8 * K);
  ASSERT_TRUE(a);
  std::memset(*a, 0x77, 8 * K);
  auto* p = static_cast<char*>(*a);
  src->give(p, 4 * K);              // wrong length
  src->give(p + 4 * K, 4 * K);      // inside a run, not its start
  src->give(p + 64 * K, 4 * K);     // never taken
  src->give(p + 1, 8 * K);          // not even a page
  src->give(nullptr, 8 * K);        // outside every region
  src->give(p, 8 * K);              // right
  src->give(p, 8 * K);              // twice
  base::log().sinks().pop_back();
  size_t refused = 0;
  for (const auto& line : sink->last_formatted())
    if (line.find("not a run it handed out") != std::string::npos) ++refused;
  EXPECT_EQ(refused, 6u);
  EXPECT_EQ(src->stats().live_bytes, 0u);
  auto again = src->take(8 * K);
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, *a);
  src->give(*again, 8 * K);
}

TEST(AnonSource, ARefusedGiveChangesNothing) {
  // The run keeps its bytes, its mapping and its count.
  auto src = anon(4 * K);
  auto a = src->take(8 * K);
  ASSERT_TRUE(a);
  std::memset(*a, 0x42, 8 * K);
  src->give(static_cast<char*>(*a) + 4 * K, 4 * K);
  const auto* bytes = static_cast<const unsigned char*>(*a);
  for (uint64_t i = 0; i < 8 * K; ++i) ASSERT_EQ(bytes[i], 0x42) << i;
  EXPECT_EQ(src->stats().live_bytes, 8 * K);
  src->give(*a, 8 * K);
}

// Virtual memory of this process in bytes.
uint64_t vm_bytes() {
  std::ifstream in("/proc/self/statm");
  uint64_t pages = 0;
  in >> pages;
  return pages * 4 * K;
}

// In a child: limits the address space to `room` bytes more than in use,
// takes one piece and returns 0 when the outcome is the one expected.
int take_under_limit(uint64_t room) {
  const uint64_t limit = vm_bytes() + room;
  const rlimit lim{limit, limit};
  if (::setrlimit(RLIMIT_AS, &lim) != 0) return 10;
  auto src = make_anon_source(4 * K);
  if (!src) return 11;
  auto p = (*src)->take(4 * K);
  if (room >= 8 * M) {
    // 1 GiB does not fit: regions shrink, but stay larger than a 2 MiB page.
    if (!p) return 12;
    const auto regions = (*src)->regions();
    if (regions.size() != 1) return 13;
    if (regions[0].len > room || regions[0].len <= kPage2M) return 14;
    return 0;
  }
  // No region larger than 2 MiB fits: the take fails, and says why.
  if (p) return 15;
  const std::string what = p.error().what();
  if (what.find("reserving") == std::string::npos || what.find("Cannot allocate memory") == std::string::npos)
    return 16;
  return (*src)->stats().failures == 1 ? 0 : 17;
}

TEST(AnonSourceDeathTest, UnderAnAddressSpaceLimitRegionsShrinkButStayAboveTwoMegabytes) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(std::_Exit(take_under_limit(64 * M)), ::testing::ExitedWithCode(0), "");
  EXPECT_EXIT(std::_Exit(take_under_limit(M)), ::testing::ExitedWithCode(0), "");
}

}  // namespace
