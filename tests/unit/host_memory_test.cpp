// HostMemoryGuard on a meminfo file the test writes: what the host reports
// as available, less the reserve and what was admitted since the read, is
// the most that passes; the rest is Errc::no_memory with the figures.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include "alloc_buffer/host_memory.hpp"
#include "base/clock.hpp"

using namespace dmakit;
using alloc_buffer::HostMemoryGuard;

namespace {

constexpr uint64_t MiB = 1ull << 20;

class HostMemoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/dmakit-meminfo.XXXXXX";
    const int fd = ::mkstemp(tmpl);
    ASSERT_GE(fd, 0);
    ::close(fd);
    path_ = tmpl;
  }
  void TearDown() override { std::remove(path_.c_str()); }

  void write(uint64_t total_mib, uint64_t avail_mib) {
    std::ofstream f(path_, std::ios::trunc);
    f << "MemTotal:       " << total_mib * 1024 << " kB\n"
      << "MemFree:        " << avail_mib * 512 << " kB\n"
      << "MemAvailable:   " << avail_mib * 1024 << " kB\n"
      << "Buffers:            1024 kB\n";
  }

  std::string path_;
};

TEST_F(HostMemoryTest, AdmitsUpToAvailableLessReserveAndCountsWhatItAdmitted) {
  write(1024, 200);
  HostMemoryGuard g(path_, 64 * MiB);
  ASSERT_TRUE(g.admit(100 * MiB, "anon-4K"));
  // 200 - 64 reserve - 100 admitted = 36 MiB left until the file is read again.
  ASSERT_TRUE(g.admit(36 * MiB, "anon-4K"));
  auto no = g.admit(1 * MiB, "anon-4K");
  ASSERT_FALSE(no);
  EXPECT_EQ(no.error().code, Errc::no_memory);
  for (const char* part : {"anon-4K", "1048576 bytes refused", "200 MiB available", "136 MiB committed",
                           "64 MiB in reserve"})
    EXPECT_NE(no.error().message.find(part), std::string::npos) << part << " not in: " << no.error().message;
  EXPECT_EQ(g.refusals(), 1u);
  g.give_back(8 * MiB);
  EXPECT_TRUE(g.admit(8 * MiB, "anon-4K"));
}

TEST_F(HostMemoryTest, ARequestLargerThanTheHostIsRefusedAndANewReadingCounts) {
  write(256, 180);
  base::ManualClock clock;
  HostMemoryGuard g(path_);  // reserve = MemTotal / 16, at least 32 MiB
  auto big = g.admit(160 * MiB, "anon-4K");
  ASSERT_FALSE(big);
  EXPECT_NE(big.error().message.find("32 MiB in reserve"), std::string::npos) << big.error().message;
  ASSERT_TRUE(g.admit(140 * MiB, "anon-4K"));
  // The host freed memory: after the refresh interval the new figure applies
  // and the earlier admissions are in it.
  write(256, 400);
  clock.advance(HostMemoryGuard::kRefresh - std::chrono::nanoseconds(1));
  EXPECT_FALSE(g.admit(300 * MiB, "anon-4K")) << "read again before the refresh interval";
  clock.advance(std::chrono::nanoseconds(1));
  EXPECT_TRUE(g.admit(300 * MiB, "anon-4K"));
}

TEST_F(HostMemoryTest, AnUnreadableFileChecksNothing) {
  HostMemoryGuard g("/nonexistent/meminfo");
  EXPECT_TRUE(g.admit(1ull << 40, "anon-4K"));
  EXPECT_EQ(g.refusals(), 0u);
}

}  // namespace
