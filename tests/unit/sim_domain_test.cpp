// The simulated type1 model must refuse what the kernel refuses, with the
// kernel's errno, and must let a "device" reach memory only through live
// mappings with the right permission.
#include <gtest/gtest.h>

#include <sys/mman.h>

#include <array>
#include <cstring>
#include <vector>

#include "child_process.hpp"
#include "iommu/sim_domain.hpp"

namespace dmakit::iommu {
namespace {

constexpr uint64_t K4 = 4096;
constexpr uint64_t M2 = 2ull << 20;

// Page-aligned host memory that the simulated device may touch.
class HostPages {
 public:
  explicit HostPages(size_t len) : len_(len) {
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    base_ = p == MAP_FAILED ? nullptr : static_cast<std::byte*>(p);
  }
  ~HostPages() {
    if (base_) munmap(base_, len_);
  }
  HostPages(const HostPages&) = delete;
  HostPages& operator=(const HostPages&) = delete;
  std::byte* at(size_t off) const { return base_ + off; }

 private:
  size_t len_;
  std::byte* base_;
};

std::unique_ptr<SimDomain> make(SimConfig cfg = {}) {
  auto d = SimDomain::create(cfg);
  EXPECT_TRUE(d.has_value()) << (d ? "" : d.error().what());
  return d ? std::move(*d) : nullptr;
}

void expect_errno(const Status& st, int err, Errc code) {
  ASSERT_FALSE(st.has_value());
  EXPECT_EQ(st.error().sys_errno, err) << st.error().what();
  EXPECT_EQ(st.error().code, code) << st.error().what();
}

TEST(SimDomain, DefaultsMatchTheGuest) {
  auto d = make();
  const DomainInfo& info = d->info();
  EXPECT_EQ(info.backend, "sim");
  EXPECT_EQ(info.page_sizes, 0x40201000u);
  EXPECT_EQ(info.min_page(), K4);
  ASSERT_EQ(info.windows.size(), 2u);
  EXPECT_EQ(info.windows[0], (IovaWindow{0, 0xfedfffff}));
  EXPECT_EQ(info.windows[1], (IovaWindow{0xfef00000, 0x7fffffffff}));
  ASSERT_TRUE(info.dma_avail.has_value());
  EXPECT_EQ(*info.dma_avail, 65535u);
  EXPECT_EQ(d->dma_avail(), 65535u);
}

TEST(SimDomain, NarrowWidthHasNoHole) {
  SimConfig cfg;
  cfg.address_bits = 31;
  auto d = make(cfg);
  ASSERT_EQ(d->info().windows.size(), 1u);
  EXPECT_EQ(d->info().windows[0], (IovaWindow{0, 0x7fffffff}));
}

TEST(SimDomain, RejectsBadConfig) {
  SimConfig cfg;
  cfg.page_sizes = 0;
  EXPECT_EQ(SimDomain::create(cfg).error().code, Errc::invalid_argument);
  cfg = {};
  cfg.address_bits = 65;
  EXPECT_EQ(SimDomain::create(cfg).error().code, Errc::invalid_argument);
  cfg = {};
  cfg.windows = {{0x10000, 0x1ffff}, {0x18000, 0x2ffff}};  // overlapping
  EXPECT_EQ(SimDomain::create(cfg).error().code, Errc::invalid_argument);
  cfg = {};
  cfg.windows = {{0x10000, 0x10fff + 1}};  // end not page aligned
  EXPECT_EQ(SimDomain::create(cfg).error().code, Errc::invalid_argument);
}

TEST(SimDomain, ConfigFromSettings) {
  iommu::IommuSettings s;
  auto cfg = SimConfig::from_settings(s);
  ASSERT_TRUE(cfg) << cfg.error().what();
  EXPECT_EQ(cfg->page_sizes, 0x40201000u);
  EXPECT_EQ(cfg->address_bits, 39u);
  EXPECT_EQ(cfg->dma_entry_limit, 65535u);

  s.sim_page_sizes = "4K,3K";
  auto bad = SimConfig::from_settings(s);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::invalid_argument);
  EXPECT_NE(bad.error().message.find("iommu.sim_page_sizes"), std::string::npos) << bad.error().message;
  s.sim_page_sizes = "4Q";
  bad = SimConfig::from_settings(s);
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("iommu.sim_page_sizes"), std::string::npos) << bad.error().message;
}

TEST(SimDomain, MapRulesWithKernelErrno) {
  auto d = make();
  HostPages mem(4 * K4);
  // Misaligned iova, len, vaddr and zero length: EINVAL.
  expect_errno(d->map(mem.at(0), 0x1000 + 1, K4, kReadWrite), EINVAL, Errc::invalid_argument);
  expect_errno(d->map(mem.at(0), 0x1000, K4 + 8, kReadWrite), EINVAL, Errc::invalid_argument);
  expect_errno(d->map(mem.at(8), 0x1000, K4, kReadWrite), EINVAL, Errc::invalid_argument);
  expect_errno(d->map(mem.at(0), 0x1000, 0, kReadWrite), EINVAL, Errc::invalid_argument);
  // Bad prot.
  expect_errno(d->map(mem.at(0), 0x1000, K4, 0), EINVAL, Errc::invalid_argument);
  expect_errno(d->map(mem.at(0), 0x1000, K4, 4), EINVAL, Errc::invalid_argument);
  // Good map, then every kind of overlap: EEXIST.
  ASSERT_TRUE(d->map(mem.at(0), 0x10000, 2 * K4, kReadWrite));
  expect_errno(d->map(mem.at(0), 0x10000, K4, kReadWrite), EEXIST, Errc::exists);
  expect_errno(d->map(mem.at(0), 0x11000, 2 * K4, kReadWrite), EEXIST, Errc::exists);
  expect_errno(d->map(mem.at(0), 0xf000, 2 * K4, kReadWrite), EEXIST, Errc::exists);
  expect_errno(d->map(mem.at(0), 0xf000, 4 * K4, kReadWrite), EEXIST, Errc::exists);
  // Adjacent on both sides is fine.
  EXPECT_TRUE(d->map(mem.at(0), 0xf000, K4, kRead));
  EXPECT_TRUE(d->map(mem.at(0), 0x12000, K4, kWrite));
  DomainStats st = d->stats();
  EXPECT_EQ(st.map_calls, 3u);
  EXPECT_EQ(st.mappings, 3u);
  EXPECT_EQ(st.mapped_bytes, 4 * K4);
  EXPECT_EQ(d->dma_avail(), 65535u - 3);
}

TEST(SimDomain, ErrorsNameTheRange) {
  auto d = make();
  HostPages mem(K4);
  ASSERT_TRUE(d->map(mem.at(0), 0x20000, K4, kRead));
  auto st = d->map(mem.at(0), 0x20000, K4, kRead);
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("0x20000"), std::string::npos) << st.error().message;
  EXPECT_NE(st.error().what().find("File exists"), std::string::npos) << st.error().what();
}

TEST(SimDomain, MsiHoleAndAddressWidth) {
  auto d = make();
  HostPages mem(2 * K4);
  expect_errno(d->map(mem.at(0), 0xfee00000, K4, kReadWrite), EINVAL, Errc::invalid_argument);
  expect_errno(d->map(mem.at(0), 0xfeeff000, K4, kReadWrite), EINVAL, Errc::invalid_argument);
  // Straddling the hole's edges.
  expect_errno(d->map(mem.at(0), 0xfedff000, 2 * K4, kReadWrite), EINVAL, Errc::invalid_argument);
  expect_errno(d->map(mem.at(0), 0xfeeff000, 2 * K4, kReadWrite), EINVAL, Errc::invalid_argument);
  EXPECT_TRUE(d->map(mem.at(0), 0xfedff000, K4, kReadWrite));
  EXPECT_TRUE(d->map(mem.at(0), 0xfef00000, K4, kReadWrite));
  // Last page of the 39-bit space is usable, the next one is not.
  EXPECT_TRUE(d->map(mem.at(0), (1ull << 39) - K4, K4, kReadWrite));
  expect_errno(d->map(mem.at(0), 1ull << 39, K4, kReadWrite), EINVAL, Errc::invalid_argument);
  expect_errno(d->map(mem.at(0), (1ull << 39) - K4, 2 * K4, kReadWrite), EINVAL, Errc::invalid_argument);
  // Wrap-around of iova + len.
  expect_errno(d->map(mem.at(0), ~0ull - K4 + 1, 2 * K4, kReadWrite), EINVAL, Errc::invalid_argument);
}

TEST(SimDomain, EntryLimit) {
  SimConfig cfg;
  cfg.dma_entry_limit = 3;
  auto d = make(cfg);
  EXPECT_EQ(*d->info().dma_avail, 3u);
  HostPages mem(K4);
  for (uint64_t i = 0; i < 3; ++i) ASSERT_TRUE(d->map(mem.at(0), 0x100000 + i * K4, K4, kRead));
  EXPECT_EQ(d->dma_avail(), 0u);
  expect_errno(d->map(mem.at(0), 0x200000, K4, kRead), ENOSPC, Errc::no_space);
  // Overlap is reported before exhaustion, as the kernel checks it first.
  expect_errno(d->map(mem.at(0), 0x100000, K4, kRead), EEXIST, Errc::exists);
  ASSERT_TRUE(d->unmap(0x100000, K4));
  EXPECT_EQ(d->dma_avail(), 1u);
  EXPECT_TRUE(d->map(mem.at(0), 0x200000, K4, kRead));
}

TEST(SimDomain, UnmapRules) {
  auto d = make();
  HostPages mem(4 * K4);
  ASSERT_TRUE(d->map(mem.at(0), 0x40000, 4 * K4, kReadWrite));
  // Split from inside, at the start, at the end: EINVAL, nothing removed.
  expect_errno(d->unmap(0x41000, K4), EINVAL, Errc::invalid_argument);
  expect_errno(d->unmap(0x40000, K4), EINVAL, Errc::invalid_argument);
  expect_errno(d->unmap(0x43000, 2 * K4), EINVAL, Errc::invalid_argument);
  expect_errno(d->unmap(0x3f000, 2 * K4), EINVAL, Errc::invalid_argument);
  // Misaligned or zero length: EINVAL.
  expect_errno(d->unmap(0x40000, 0), EINVAL, Errc::invalid_argument);
  expect_errno(d->unmap(0x40001, K4), EINVAL, Errc::invalid_argument);
  EXPECT_EQ(d->stats().mappings, 1u);
  // Unmapping nothing succeeds and removes nothing.
  EXPECT_TRUE(d->unmap(0x80000, K4));
  EXPECT_TRUE(d->unmap(0xfee00000, K4));  // even inside the hole
  EXPECT_EQ(d->stats().mappings, 1u);
  // A covering range removes it.
  EXPECT_TRUE(d->unmap(0x30000, 0x20000));
  EXPECT_EQ(d->stats().mappings, 0u);
  EXPECT_EQ(d->stats().mapped_bytes, 0u);
}

TEST(SimDomain, UnmapSpanningSeveralWholeMappings) {
  auto d = make();
  HostPages mem(K4);
  for (uint64_t i = 0; i < 5; ++i) ASSERT_TRUE(d->map(mem.at(0), 0x100000 + i * 2 * K4, K4, kRead));
  // Covers mappings 1..3 (with the gaps between them) in one call.
  ASSERT_TRUE(d->unmap(0x100000 + 2 * K4, 5 * K4));
  EXPECT_EQ(d->stats().mappings, 2u);
  EXPECT_FALSE(d->translate(0x100000 + 2 * K4, K4, kRead));
  EXPECT_FALSE(d->translate(0x100000 + 6 * K4, K4, kRead));
  EXPECT_TRUE(d->translate(0x100000, K4, kRead));
  EXPECT_TRUE(d->translate(0x100000 + 8 * K4, K4, kRead));
}

TEST(SimDomain, UnmapBatchMergesAdjacentRuns) {
  auto d = make();
  HostPages mem(K4);
  // Mappings at pages 0,1,2 (adjacent) and 5,6 (adjacent) and 9.
  for (uint64_t p : {0, 1, 2, 5, 6, 9}) ASSERT_TRUE(d->map(mem.at(0), 0x200000 + p * K4, K4, kRead));
  std::vector<IovaSpan> ranges;
  for (uint64_t p : {6, 0, 2, 9, 1, 5}) ranges.push_back({0x200000 + p * K4, K4});  // unsorted
  const uint64_t before = d->stats().unmap_calls;
  ASSERT_TRUE(d->unmap_batch(ranges));
  EXPECT_EQ(d->stats().unmap_calls - before, 3u);
  EXPECT_EQ(d->stats().mappings, 0u);
}

TEST(SimDomain, TranslateChecksMappingAndPermission) {
  auto d = make();
  HostPages mem(3 * K4);
  std::memset(mem.at(0), 0x5a, 3 * K4);
  ASSERT_TRUE(d->map(mem.at(0), 0x300000, 2 * K4, kReadWrite));
  ASSERT_TRUE(d->map(mem.at(2 * K4), 0x400000, K4, kRead));

  auto rw = d->translate(0x300000 + 100, 200, kWrite);
  ASSERT_TRUE(rw) << rw.error().what();
  EXPECT_EQ(rw->data(), mem.at(100));
  EXPECT_EQ(rw->size(), 200u);

  auto ro = d->translate(0x400000, K4, kWrite);
  ASSERT_FALSE(ro);
  EXPECT_EQ(ro.error().code, Errc::fault);
  EXPECT_NE(ro.error().message.find("read-only"), std::string::npos) << ro.error().message;
  EXPECT_TRUE(d->translate(0x400000, K4, kRead));

  auto gap = d->translate(0x302000, 1, kRead);
  ASSERT_FALSE(gap);
  EXPECT_EQ(gap.error().code, Errc::fault);
  EXPECT_NE(gap.error().message.find("not mapped"), std::string::npos) << gap.error().message;
  // Running off the end of a mapping faults too.
  EXPECT_EQ(d->translate(0x301000, 2 * K4, kRead).error().code, Errc::fault);

  ASSERT_TRUE(d->unmap(0x300000, 2 * K4));
  auto after = d->translate(0x300000, 1, kRead);
  ASSERT_FALSE(after);
  EXPECT_EQ(after.error().code, Errc::fault);
}

TEST(SimDomain, DeviceAccessAcrossAdjacentMappings) {
  auto d = make();
  HostPages a(K4), b(K4), c(K4);
  std::memset(a.at(0), 0, K4);
  std::memset(b.at(0), 0, K4);
  std::memset(c.at(0), 0x11, K4);
  ASSERT_TRUE(d->map(a.at(0), 0x500000, K4, kReadWrite));
  ASSERT_TRUE(d->map(b.at(0), 0x501000, K4, kReadWrite));
  ASSERT_TRUE(d->map(c.at(0), 0x502000, K4, kRead));

  std::vector<std::byte> data(200, std::byte{0xab});
  ASSERT_TRUE(d->device_write(0x501000 - 100, data));
  EXPECT_EQ(*a.at(K4 - 100), std::byte{0xab});
  EXPECT_EQ(*b.at(99), std::byte{0xab});
  EXPECT_EQ(*b.at(100), std::byte{0});

  // Crossing into the read-only mapping: fault, and not one byte written.
  std::vector<std::byte> more(300, std::byte{0xcd});
  auto st = d->device_write(0x502000 - 100, more);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::fault);
  EXPECT_EQ(*b.at(K4 - 100), std::byte{0});
  EXPECT_EQ(*c.at(0), std::byte{0x11});

  // Reads cross all three; a read past the last mapping faults.
  std::vector<std::byte> out(K4 + 20);
  ASSERT_TRUE(d->device_read(0x501000 - 10, out));
  EXPECT_EQ(out[0], std::byte{0xab});        // a, written above
  EXPECT_EQ(out[10 + 99], std::byte{0xab});  // b
  EXPECT_EQ(out[10 + 100], std::byte{0});
  EXPECT_EQ(out[K4 + 10], std::byte{0x11});
  EXPECT_EQ(d->device_read(0x502000 + K4 - 1, std::span(out).first(2)).error().code, Errc::fault);
}

TEST(SimDomain, HugePageSizesOnlyRequireSmallestPage) {
  SimConfig cfg;
  cfg.page_sizes = M2;  // an IOMMU with only 2 MiB pages
  auto d = make(cfg);
  EXPECT_EQ(d->info().min_page(), M2);
  HostPages mem(K4);
  expect_errno(d->map(mem.at(0), M2, K4, kRead), EINVAL, Errc::invalid_argument);
}

}  // namespace
}  // namespace dmakit::iommu

namespace dmakit::iommu {
namespace {

// type1's locked-memory rule: each mapping charges its pages, the same page
// twice when it is mapped twice; past the limit the map fails with ENOMEM
// and nothing is charged; unmap and the domain's end give the charge back.
TEST(SimDomainMemlock, ChargesEveryMappingAndRefusesPastTheLimit) {
  const uint64_t base = SimDomain::process_pinned_bytes();
  SimConfig cfg;
  cfg.memlock_limit = base + 64 * K4;
  auto d = make(cfg);
  ASSERT_TRUE(d);
  HostPages mem(64 * K4);
  ASSERT_TRUE(d->map(mem.at(0), 0x100000, 32 * K4, kReadWrite));
  EXPECT_EQ(SimDomain::process_pinned_bytes(), base + 32 * K4);
  // The same host pages at a second IOVA are charged again.
  ASSERT_TRUE(d->map(mem.at(0), 0x200000, 16 * K4, kReadWrite));
  EXPECT_EQ(SimDomain::process_pinned_bytes(), base + 48 * K4);
  const Status over = d->map(mem.at(16 * K4), 0x300000, 17 * K4, kReadWrite);
  expect_errno(over, ENOMEM, Errc::no_memory);
  for (const char* part : {"RLIMIT_MEMLOCK", "192 KiB already pinned", "68 KiB more", "256 KiB", "ulimit -l",
                           "CAP_IPC_LOCK"})
    EXPECT_NE(over.error().message.find(part), std::string::npos) << part << " not in: " << over.error().message;
  EXPECT_EQ(d->stats().mappings, 2u);
  EXPECT_EQ(SimDomain::process_pinned_bytes(), base + 48 * K4);
  EXPECT_FALSE(d->translate(0x300000, K4, kRead)) << "a refused map left a mapping";
  ASSERT_TRUE(d->map(mem.at(16 * K4), 0x300000, 16 * K4, kReadWrite));  // exactly up to the limit
  ASSERT_TRUE(d->unmap(0x100000, 32 * K4));
  EXPECT_EQ(SimDomain::process_pinned_bytes(), base + 32 * K4);
  ASSERT_TRUE(d->map(mem.at(0), 0x100000, 32 * K4, kReadWrite));
  d.reset();  // closing the container unpins what is still mapped
  EXPECT_EQ(SimDomain::process_pinned_bytes(), base);
}

// Without a configured limit the model reads the process's: RLIMIT_MEMLOCK,
// waived by CAP_IPC_LOCK (root has it). Run in a child that drops it.
TEST(SimDomainMemlock, TheProcessLimitAppliesWithoutCapIpcLock) {
  auto [code, msg] = testing_child::run_in_child([] {
    HostPages mem(64 * K4);
    if (!testing_child::set_memlock_soft(SimDomain::process_pinned_bytes() + 32 * K4))
      return std::pair<int, std::string>(1, "setrlimit");
    {
      // With the capability the limit is waived.
      auto d = SimDomain::create();
      if (!d) return std::pair<int, std::string>(1, d.error().what());
      if (auto st = (*d)->map(mem.at(0), 0x100000, 64 * K4, kReadWrite); !st)
        return std::pair<int, std::string>(2, st.error().what());
    }
    if (!testing_child::drop_cap_ipc_lock()) return std::pair<int, std::string>(1, "capset");
    auto d = SimDomain::create();
    if (!d) return std::pair<int, std::string>(1, d.error().what());
    if (auto st = (*d)->map(mem.at(0), 0x100000, 32 * K4, kReadWrite); !st)
      return std::pair<int, std::string>(3, st.error().what());
    auto st = (*d)->map(mem.at(32 * K4), 0x200000, K4, kReadWrite);
    if (st) return std::pair<int, std::string>(4, "a map past RLIMIT_MEMLOCK succeeded");
    return std::pair<int, std::string>(st.error().sys_errno == ENOMEM ? 0 : 5, st.error().what());
  });
  EXPECT_EQ(code, 0) << msg;
  EXPECT_NE(msg.find("RLIMIT_MEMLOCK"), std::string::npos) << msg;
}

}  // namespace
}  // namespace dmakit::iommu
