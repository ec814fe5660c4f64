// Guest test: dmakit's VFIO layer on the real vfio-pci driver behind the
// emulated Intel IOMMU. What the container reports must be what the kernel
// reports for this IOMMU; refused requests must be clear errors that agree
// with the simulated domain; bad input must fail cleanly without leaking fds.
// Expectations come from the guest's own facts (the Intel IOMMU's capability
// register, the dma_entry_limit parameter, the devices on vfio-pci), so the
// file holds in guests with other IOMMU widths or devices.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/vfio.h>
#include <sys/ioctl.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>

#include "checks.hpp"
#include "facts.hpp"
#include "guest.hpp"
#include "iommu/pci.hpp"
#include "iommu/sim_domain.hpp"
#include "iommu/vfio.hpp"

namespace dmakit::vmtest {
namespace {

namespace vfio = iommu::vfio;
namespace pci = iommu::pci;
using ::testing::HasSubstr;

constexpr uint64_t kPage = 4096;

size_t open_fds() {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

// Every test must leave the process with the fds it started with. The
// guest facts are read first (once per process, with no group open).
class Vfio : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto& facts = guest_facts();
    ASSERT_TRUE(facts) << facts.error().what();
    facts_ = &*facts;
    ASSERT_TRUE(on_vfio(kNvmeBdf, "the NVMe under test"));
    fds_ = open_fds();
  }
  void TearDown() override {
    if (fds_ != 0) {
      EXPECT_EQ(open_fds(), fds_) << "file descriptors leaked";
    }
  }

  // A device on vfio-pci in another usable group than the NVMe's.
  ::testing::AssertionResult other_device(std::string& bdf) const {
    bdf = facts_->other_usable_device(kNvmeBdf);
    if (!bdf.empty()) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "this case needs a second device on vfio-pci in a group of its own\n"
                                         << facts_->str();
  }

  // What the IOMMU's capability register says VFIO must report: the MGAW
  // wide space with the x86 MSI range cut out.
  std::vector<iommu::IovaWindow> expected_windows() const {
    const uint64_t top = facts_->dmar_address_bits >= 64 ? ~0ull : (1ull << facts_->dmar_address_bits) - 1;
    return {{0, kX86MsiFirst - 1}, {kX86MsiLast + 1, top}};
  }

  const GuestFacts* facts_ = nullptr;
  size_t fds_ = 0;
};

TEST_F(Vfio, ContainerReportsTheGuestIommu) {
  auto c = vfio::Container::open();
  ASSERT_TRUE(c) << c.error().what();
  EXPECT_EQ((*c)->api_version(), VFIO_API_VERSION);
  EXPECT_EQ((*c)->check_extension(VFIO_TYPE1v2_IOMMU).value_or(false), true);
  EXPECT_EQ((*c)->check_extension(VFIO_TYPE1_IOMMU).value_or(false), true);
  EXPECT_EQ((*c)->check_extension(VFIO_NOIOMMU_IOMMU).value_or(true), false);
  EXPECT_FALSE((*c)->iommu_set());

  // Before a group is attached there is no IOMMU to program.
  auto mem = DmaMemory::allocate(kPage);
  ASSERT_TRUE(mem) << mem.error().what();
  auto early = (*c)->map(mem->data(), 0x100000, kPage, iommu::kReadWrite);
  ASSERT_FALSE(early);
  EXPECT_THAT(early.error().message, HasSubstr("no IOMMU set"));

  auto g = vfio::Group::open_for_device(kNvmeBdf);
  ASSERT_TRUE(g) << g.error().what();
  auto flags = g->status();
  ASSERT_TRUE(flags) << flags.error().what();
  EXPECT_TRUE(*flags & VFIO_GROUP_FLAGS_VIABLE);
  EXPECT_FALSE(*flags & VFIO_GROUP_FLAGS_CONTAINER_SET);

  ASSERT_TRUE((*c)->attach(*g));
  EXPECT_TRUE(g->attached());
  EXPECT_EQ((*c)->iommu_type(), static_cast<uint32_t>(VFIO_TYPE1v2_IOMMU));
  const auto& info = (*c)->info();
  EXPECT_EQ(info.backend, "vfio-type1v2");
  std::cout << facts_->str() << "\n";
  ASSERT_NE(facts_->dmar_address_bits, 0u) << "no Intel IOMMU capability register in sysfs";
  EXPECT_EQ(info.page_sizes, facts_->dmar_page_sizes);
  EXPECT_EQ(info.windows, expected_windows());
  ASSERT_TRUE(info.dma_avail.has_value());
  ASSERT_GT(facts_->dma_entry_limit, 0u) << "vfio_iommu_type1's dma_entry_limit is unreadable";
  EXPECT_EQ(*info.dma_avail, facts_->dma_entry_limit);
  EXPECT_EQ((*c)->dma_avail(), facts_->dma_entry_limit);
  auto after = g->status();
  ASSERT_TRUE(after);
  EXPECT_TRUE(*after & VFIO_GROUP_FLAGS_CONTAINER_SET);
}

TEST_F(Vfio, MapAndUnmapReachTheKernel) {
  auto d = vfio::VfioDomain::open(std::string_view(kNvmeBdf));
  ASSERT_TRUE(d) << d.error().what();
  auto& dom = **d;
  auto mem = DmaMemory::allocate(4 * kPage);
  ASSERT_TRUE(mem) << mem.error().what();

  ASSERT_TRUE(dom.map(mem->data(), 0x100000, 2 * kPage, iommu::kReadWrite));
  ASSERT_TRUE(dom.map(mem->data() + 2 * kPage, 0x102000, 2 * kPage, iommu::kRead));
  EXPECT_EQ(dom.dma_avail(), facts_->dma_entry_limit - 2);  // the kernel counts one entry per MAP_DMA
  auto s = dom.stats();
  EXPECT_EQ(s.map_calls, 2u);
  EXPECT_EQ(s.mappings, 2u);
  EXPECT_EQ(s.mapped_bytes, 4 * kPage);

  // Overlap passes the range pre-check; the kernel itself refuses it.
  auto overlap = dom.map(mem->data(), 0x101000, kPage, iommu::kReadWrite);
  ASSERT_FALSE(overlap);
  EXPECT_EQ(overlap.error().code, Errc::exists);
  EXPECT_EQ(overlap.error().sys_errno, EEXIST);
  EXPECT_THAT(overlap.error().message, HasSubstr("VFIO_IOMMU_MAP_DMA iova 0x101000"));

  // Splitting a mapping is refused, the same way as the simulated domain.
  auto split = dom.unmap(0x100000, kPage);
  ASSERT_FALSE(split);
  EXPECT_EQ(split.error().code, Errc::invalid_argument);
  EXPECT_THAT(split.error().message, HasSubstr("split"));

  // One unmap covering both mappings removes both.
  ASSERT_TRUE(dom.unmap(0x100000, 4 * kPage));
  s = dom.stats();
  EXPECT_EQ(s.mappings, 0u);
  EXPECT_EQ(s.mapped_bytes, 0u);
  EXPECT_EQ(s.unmap_calls, 1u);
  EXPECT_EQ(dom.dma_avail(), facts_->dma_entry_limit);
  // Unmapping nothing succeeds and removes nothing (type1v2 semantics).
  EXPECT_TRUE(dom.unmap(0x100000, kPage));
}

// The kernel's own answer for a map request, bypassing dmakit's pre-check.
int raw_map_errno(int container_fd, const void* vaddr, uint64_t iova, uint64_t len) {
  vfio_iommu_type1_dma_map m{};
  m.argsz = sizeof m;
  m.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
  m.vaddr = reinterpret_cast<uintptr_t>(vaddr);
  m.iova = iova;
  m.size = len;
  if (::ioctl(container_fd, VFIO_IOMMU_MAP_DMA, &m) == 0) {
    vfio_iommu_type1_dma_unmap u{};
    u.argsz = sizeof u;
    u.iova = iova;
    u.size = len;
    ::ioctl(container_fd, VFIO_IOMMU_UNMAP_DMA, &u);
    return 0;
  }
  return errno;
}

TEST_F(Vfio, MapsIntoTheMsiHoleOrPastTheWidthAreRefusedLikeTheSimDomain) {
  auto d = vfio::VfioDomain::open(std::string_view(kNvmeBdf));
  ASSERT_TRUE(d) << d.error().what();
  // The simulated domain models this guest's IOMMU width.
  iommu::SimConfig sim_cfg;
  sim_cfg.address_bits = facts_->address_bits;
  auto sim = iommu::SimDomain::create(sim_cfg);
  ASSERT_TRUE(sim) << sim.error().what();
  auto mem = DmaMemory::allocate(kPage);
  ASSERT_TRUE(mem) << mem.error().what();
  const uint64_t top = facts_->iova_last();
  ASSERT_EQ(top, expected_windows().back().last) << facts_->str();

  // The MSI range's first and last page, and the first page past the width.
  for (uint64_t iova : {kX86MsiFirst, kX86MsiLast + 1 - kPage, top + 1}) {
    auto r = (*d)->map(mem->data(), iova, kPage, iommu::kReadWrite);
    ASSERT_FALSE(r) << fmt::format("{:#x}", iova);
    EXPECT_EQ(r.error().code, Errc::invalid_argument);
    EXPECT_EQ(r.error().sys_errno, EINVAL);
    EXPECT_THAT(r.error().message, HasSubstr("outside the IOMMU's usable IOVA windows"));
    auto s = (*sim)->map(mem->data(), iova, kPage, iommu::kReadWrite);
    ASSERT_FALSE(s);
    EXPECT_EQ(s.error().code, r.error().code);
    EXPECT_EQ(s.error().sys_errno, r.error().sys_errno);
    // And the kernel, asked directly, says the same.
    EXPECT_EQ(raw_map_errno((*d)->container().fd(), mem->data(), iova, kPage), EINVAL)
        << fmt::format("{:#x}", iova);
  }
  // A range that straddles the hole's lower edge.
  auto straddle = (*d)->map(mem->data(), kX86MsiFirst - kPage, 2 * kPage, iommu::kReadWrite);
  ASSERT_FALSE(straddle);
  EXPECT_EQ(straddle.error().code, Errc::invalid_argument);
  // Misaligned: refused before the kernel.
  auto odd = (*d)->map(mem->data(), 0x100800, kPage, iommu::kReadWrite);
  ASSERT_FALSE(odd);
  EXPECT_EQ(odd.error().code, Errc::invalid_argument);
  EXPECT_THAT(odd.error().message, HasSubstr("not aligned"));
  // The last page below the hole and the last page of the window are fine.
  EXPECT_TRUE((*d)->map(mem->data(), kX86MsiFirst - kPage, kPage, iommu::kReadWrite));
  EXPECT_TRUE((*d)->map(mem->data(), top + 1 - kPage, kPage, iommu::kReadWrite));
  EXPECT_EQ((*d)->stats().mappings, 2u);
}

TEST_F(Vfio, DeviceRegionsConfigSpaceAndBar) {
  auto d = vfio::VfioDomain::open(std::string_view(kNvmeBdf));
  ASSERT_TRUE(d) << d.error().what();
  auto dev = (*d)->open_device(kNvmeBdf);
  ASSERT_TRUE(dev) << dev.error().what();
  EXPECT_TRUE(dev->info().is_pci());
  EXPECT_GT(dev->info().num_regions, static_cast<uint32_t>(VFIO_PCI_CONFIG_REGION_INDEX));

  // QEMU's NVMe controller: vendor 0x1b36 (Red Hat), device 0x0010, class 01:08:02.
  auto id = dev->read_config32(0);
  ASSERT_TRUE(id) << id.error().what();
  EXPECT_EQ(*id & 0xffff, 0x1b36u);
  EXPECT_EQ(*id >> 16, 0x0010u);
  auto cls = dev->read_config32(8);
  ASSERT_TRUE(cls);
  EXPECT_EQ(*cls >> 8, 0x010802u);

  ASSERT_TRUE(dev->enable_bus_master());
  auto cmd = dev->read_config16(4);
  ASSERT_TRUE(cmd);
  EXPECT_EQ(*cmd & 0x6, 0x6);

  auto bar0 = dev->region_info(VFIO_PCI_BAR0_REGION_INDEX);
  ASSERT_TRUE(bar0) << bar0.error().what();
  EXPECT_EQ(bar0->size, 16 * 1024u);
  EXPECT_TRUE(bar0->mmappable());
  EXPECT_FALSE(bar0->mmap_areas.empty());

  auto regs = dev->map_bar(0, 0, kPage);
  ASSERT_TRUE(regs) << regs.error().what();
  const uint64_t cap = regs->read64(0);
  const uint32_t vs = regs->read32(8);
  EXPECT_NE(cap, 0u);
  EXPECT_NE(cap, ~0ull);
  EXPECT_GE(vs >> 16, 1u) << fmt::format("NVMe VS {:#x}", vs);

  // Bad requests on the real device.
  auto no_bar = dev->map_bar(6);
  ASSERT_FALSE(no_bar);
  EXPECT_EQ(no_bar.error().code, Errc::invalid_argument);
  auto past = dev->map_bar(0, 16 * 1024, kPage);
  ASSERT_FALSE(past);
  EXPECT_EQ(past.error().code, Errc::invalid_argument);
  EXPECT_THAT(past.error().message, HasSubstr("outside"));
  auto cfg_past = dev->read_config32(0x1000);
  ASSERT_FALSE(cfg_past);
  EXPECT_EQ(cfg_past.error().code, Errc::invalid_argument);
  auto region = dev->region_info(200);
  ASSERT_FALSE(region);
  EXPECT_EQ(region.error().code, Errc::invalid_argument);

  if (dev->info().can_reset()) {
    EXPECT_TRUE(dev->reset());
  } else {
    auto r = dev->reset();
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, Errc::unsupported);
  }
}

TEST_F(Vfio, ADeviceThatDoesNotExistIsNamed) {
  auto d = vfio::VfioDomain::open(std::string_view("0000:00:09.0"));
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().code, Errc::not_found);
  EXPECT_THAT(d.error().message, HasSubstr("no PCI device 0000:00:09.0"));
  auto bad = vfio::VfioDomain::open(std::string_view("00:09"));
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::invalid_argument);
}

TEST_F(Vfio, AGroupOpenedTwiceIsBusy) {
  auto first = vfio::Group::open_for_device(kNvmeBdf);
  ASSERT_TRUE(first) << first.error().what();
  auto second = vfio::Group::open_for_device(kNvmeBdf);
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().code, Errc::busy);
  EXPECT_EQ(second.error().sys_errno, EBUSY);
  EXPECT_THAT(second.error().message, HasSubstr("already open"));
  EXPECT_THAT(second.error().message, HasSubstr("/dev/vfio/" + std::to_string(first->number())));

  // A whole domain on a group that is already held fails the same way.
  auto d = vfio::VfioDomain::open(std::string_view(kNvmeBdf));
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().code, Errc::busy);
}

TEST_F(Vfio, ADeviceOfAnotherGroupIsRefusedByTheDomain) {
  auto d = vfio::VfioDomain::open(std::string_view(kNvmeBdf));
  ASSERT_TRUE(d) << d.error().what();
  // VfioDomain::open_device never attaches by itself (core::Context does).
  std::string other;
  ASSERT_TRUE(other_device(other));
  auto dev = (*d)->open_device(other);
  ASSERT_FALSE(dev);
  EXPECT_EQ(dev.error().code, Errc::not_found);
  EXPECT_THAT(dev.error().message, HasSubstr("did not attach"));
}

TEST_F(Vfio, TwoGroupsShareOneContainer) {
  std::string other;
  ASSERT_TRUE(other_device(other));
  const std::string both[] = {kNvmeBdf, other};
  auto d = vfio::VfioDomain::open(both);
  ASSERT_TRUE(d) << d.error().what();
  EXPECT_EQ((*d)->group_count(), 2u);
  auto nvme = (*d)->open_device(kNvmeBdf);
  ASSERT_TRUE(nvme) << nvme.error().what();
  auto dev = (*d)->open_device(other);
  ASSERT_TRUE(dev) << dev.error().what();
  auto mem = DmaMemory::allocate(kPage);
  ASSERT_TRUE(mem);
  EXPECT_TRUE((*d)->map(mem->data(), 0x100000, kPage, iommu::kReadWrite));
}

TEST_F(Vfio, ADeviceNotOnVfioPciIsAClearError) {
  std::string other;
  ASSERT_TRUE(other_device(other));
  pci::BindOptions opt;
  opt.state_dir = "/tmp/dmakit-vmtest-state";
  auto released = pci::unbind_vfio(other, opt);
  ASSERT_TRUE(released) << released.error().what();
  ASSERT_TRUE(released->was_bound);
  // Whatever driver the guest kernel has for it (often none) took it back.
  auto now = pci::current_driver(*pci::Bdf::parse(other));
  ASSERT_TRUE(now) << now.error().what();
  EXPECT_NE(*now, "vfio-pci");
  EXPECT_EQ(released->restored_driver, *now);

  auto d = vfio::VfioDomain::open(std::string_view(other));
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().code, Errc::not_found);
  EXPECT_THAT(d.error().message, HasSubstr(fmt::format("{} ({})", other, now->empty() ? "no driver" : *now)));
  EXPECT_THAT(d.error().message, HasSubstr("dmakit bind"));

  auto bound = pci::bind_vfio(other, opt);
  ASSERT_TRUE(bound) << bound.error().what();
  EXPECT_EQ(bound->previous_driver, *now);
  auto again = vfio::VfioDomain::open(std::string_view(other));
  EXPECT_TRUE(again) << again.error().what();
}

TEST_F(Vfio, AGroupOnHostDriversIsNotUsable) {
  // The 00:1f.x functions share one group and stay on host drivers (or none).
  auto g = vfio::Group::open_for_device("0000:00:1f.0");
  ASSERT_FALSE(g);
  EXPECT_TRUE(g.error().code == Errc::not_found || g.error().code == Errc::not_viable) << g.error().what();
  EXPECT_THAT(g.error().message, HasSubstr("0000:00:1f.0 ("));
}

TEST_F(Vfio, ProbeReportsTheBoundGroups) {
  auto r = vfio::probe_vfio();
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_TRUE(r->present) << r->reason;
  EXPECT_EQ(r->api_version, VFIO_API_VERSION);
  EXPECT_TRUE(r->type1v2);
  std::vector<int> probed;
  for (const auto& g : r->groups) {
    if (!g.all_vfio) continue;
    probed.push_back(g.number);
    EXPECT_EQ(g.error, "");
    ASSERT_TRUE(g.iommu.has_value()) << "group " << g.number;
    EXPECT_EQ(g.viable, std::optional<bool>(true));
    EXPECT_EQ(g.iommu->page_sizes, facts_->dmar_page_sizes);
    EXPECT_EQ(g.iommu->windows, expected_windows());
    EXPECT_EQ(g.iommu->dma_avail, std::optional<uint32_t>(facts_->dma_entry_limit));
  }
  // Exactly the groups sysfs shows with every member on vfio-pci.
  std::vector<int> want;
  for (const auto& g : facts_->groups)
    if (g.all_vfio) want.push_back(g.number);
  std::sort(probed.begin(), probed.end());
  std::sort(want.begin(), want.end());
  EXPECT_FALSE(want.empty());
  EXPECT_EQ(probed, want) << facts_->str();
}

}  // namespace
}  // namespace dmakit::vmtest
