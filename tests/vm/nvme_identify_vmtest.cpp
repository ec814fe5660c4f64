// Guest test: a real NVMe controller behind vfio-pci and the emulated Intel
// IOMMU, driven through dmakit's VFIO layer. The controller must reach
// exactly the memory mapped for it, at the IOVAs chosen here, and nothing
// else: blocked DMA leaves memory untouched and the kernel logs a DMAR fault.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "checks.hpp"
#include "guest.hpp"
#include "iommu/vfio.hpp"
#include "nvme.hpp"

namespace dmakit::vmtest {
namespace {

using iommu::vfio::VfioDomain;

// IOVA layout of these tests (all inside the guest IOMMU's low window).
constexpr uint64_t kQueuesIova = 0x100000;    // ASQ, ACQ, I/O SQ, I/O CQ, PRP list: 5 pages
constexpr uint64_t kIdentifyIova = 0x200000;  // 4 KiB identify buffer
constexpr uint64_t kDataIova = 0x400000;      // 64 KiB read buffer
constexpr uint64_t kNeverMappedIova = 0x800000;
constexpr uint64_t kReadOnlyIova = 0x900000;
constexpr uint64_t kUnmappedLaterIova = 0xa00000;

constexpr size_t kPage = NvmeController::kPageSize;
constexpr uint16_t kQueueEntries = 32;
constexpr size_t kDataBytes = 16 * kPage;
constexpr uint64_t kDiskLbas = 16 * 2048;  // run-guest.sh's default 16 MiB disk

// Identify Controller fields (NVMe base spec, Identify Controller data structure).
constexpr size_t kIdVid = 0;   // PCI vendor id, 2 bytes
constexpr size_t kIdSn = 4;    // serial number, 20 ASCII bytes, space padded
constexpr size_t kIdMn = 24;   // model number, 40 ASCII bytes, space padded

std::string ascii_field(const std::byte* base, size_t off, size_t len) {
  std::string s(reinterpret_cast<const char*>(base + off), len);
  s.erase(s.find_last_not_of(' ') + 1);
  return s;
}

class NvmeVfio : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(on_vfio(kNvmeBdf, "the NVMe under test"));
    auto kmsg = KmsgWatch::open();
    ASSERT_TRUE(kmsg) << kmsg.error().what();
    kmsg_.emplace(std::move(*kmsg));

    for (auto [mem, len] : {std::pair{&queues_, 5 * kPage}, std::pair{&identify_, kPage},
                            std::pair{&data_, kDataBytes}}) {
      auto m = DmaMemory::allocate(len);
      ASSERT_TRUE(m) << m.error().what();
      *mem = std::move(*m);
    }

    auto domain = VfioDomain::open(std::string_view(kNvmeBdf));
    ASSERT_TRUE(domain) << domain.error().what();
    domain_ = std::move(*domain);
    ASSERT_TRUE(map(queues_, kQueuesIova, iommu::kReadWrite));
    ASSERT_TRUE(map(identify_, kIdentifyIova, iommu::kReadWrite));
    ASSERT_TRUE(map(data_, kDataIova, iommu::kReadWrite));

    // The I/O queues come later: some tests check what happens before them.
    auto ctrl = start_nvme(*domain_, kNvmeBdf,
                           {.asq = queue(0, kQueueEntries * NvmeController::kSqEntrySize),
                            .acq = queue(1, kQueueEntries * NvmeController::kCqEntrySize),
                            .io_sq = std::nullopt,
                            .io_cq = std::nullopt,
                            .entries = kQueueEntries});
    ASSERT_TRUE(ctrl) << ctrl.error().what();
    ctrl_.emplace(std::move(*ctrl));
  }

  void TearDown() override {
    // Stop the controller before its memory is unmapped and freed.
    if (ctrl_) {
      auto st = ctrl_->disable();
      EXPECT_TRUE(st) << st.error().what();
    }
  }

  ::testing::AssertionResult map(const DmaMemory& mem, uint64_t iova, uint32_t prot) {
    auto st = domain_->map(mem.data(), iova, mem.size(), prot);
    if (!st) return ::testing::AssertionFailure() << st.error().what();
    return ::testing::AssertionSuccess();
  }

  // Page `index` of the queue memory, as the controller sees it.
  DmaRef queue(size_t index, size_t len) const {
    return DmaRef{queues_.data() + index * kPage, kQueuesIova + index * kPage, len};
  }

  ::testing::AssertionResult create_io_queues() {
    auto st = ctrl_->create_io_queues(queue(2, kQueueEntries * NvmeController::kSqEntrySize),
                                      queue(3, kQueueEntries * NvmeController::kCqEntrySize), kQueueEntries);
    if (!st) return ::testing::AssertionFailure() << st.error().what();
    return ::testing::AssertionSuccess();
  }

  // A DMAR fault line for `iova`'s page appeared; else the kernel log seen.
  // Identify Controller into iova, which the IOMMU blocks and the kernel
  // logs. Its status is not checked: QEMU completes a blocked command with success.
  ::testing::AssertionResult identify_faults(uint64_t iova) {
    return vmtest::blocked_with_fault(*kmsg_, iova, [&]() -> ::testing::AssertionResult {
      auto c = ctrl_->identify_controller(iova);
      if (!c) return ::testing::AssertionFailure() << c.error().what();
      return ::testing::AssertionSuccess();
    });
  }

  DmaMemory queues_, identify_, data_;
  std::optional<KmsgWatch> kmsg_;
  std::unique_ptr<VfioDomain> domain_;
  std::optional<NvmeController> ctrl_;  // declared last: stopped and closed first
};

TEST_F(NvmeVfio, IdentifyControllerLandsAtItsIova) {
  // VS: major in 31:16; QEMU 7.2 reports 1.4.
  EXPECT_GE(ctrl_->version() >> 16, 1u) << ctrl_->regs().str();
  identify_.fill(0xee);
  ASSERT_TRUE(completed(ctrl_->identify_controller(kIdentifyIova)));

  uint16_t vid = 0;
  std::memcpy(&vid, identify_.data() + kIdVid, sizeof vid);
  EXPECT_EQ(vid, 0x1b36) << "QEMU's NVMe vendor id";
  EXPECT_EQ(ascii_field(identify_.data(), kIdMn, 40), "QEMU NVMe Ctrl");
  // The serial is what run-guest.sh gave the device: the data is this controller's.
  EXPECT_EQ(ascii_field(identify_.data(), kIdSn, 20), "dmakit0");
}

TEST_F(NvmeVfio, IdentifyNamespaceMatchesTheDisk) {
  identify_.fill(0);
  NvmeCommand cmd;
  cmd.opcode = 0x06;  // Identify
  cmd.nsid = NvmeController::kNsid;
  cmd.prp1 = kIdentifyIova;
  cmd.cdw10 = 0;  // CNS 0: namespace data structure
  ASSERT_TRUE(completed(ctrl_->submit_admin(cmd)));
  uint64_t nsze = 0;
  std::memcpy(&nsze, identify_.data(), sizeof nsze);  // NSZE: bytes 7:0
  EXPECT_EQ(nsze, kDiskLbas);
  // FLBAS bits 3:0 pick the LBA format; LBAF[n] at 128 + 4n, LBADS in bits 23:16.
  const auto flbas = static_cast<uint8_t>(identify_.data()[26]) & 0xfu;
  uint32_t lbaf = 0;
  std::memcpy(&lbaf, identify_.data() + 128 + 4 * flbas, sizeof lbaf);
  EXPECT_EQ(size_t{1} << ((lbaf >> 16) & 0xff), kLbaSize);
}

TEST_F(NvmeVfio, ReadsPlaceLbasExactlyWhereAsked) {
  ASSERT_TRUE(create_io_queues());
  const DmaRef prp_list{queues_.data() + 4 * kPage, kQueuesIova + 4 * kPage, kPage};

  struct Case {
    const char* what;
    uint64_t lba;
    uint16_t blocks;
    size_t offset;  // into the data buffer
  };
  const Case cases[] = {
      {"one block, PRP1 only", 7, 1, 0},
      {"4 KiB at an offset, crossing into PRP2's page", 100, 8, 512},
      {"two pages, PRP1 + PRP2", 2000, 16, 0},
      {"56 KiB through a PRP list", 30000, 112, kPage},
      {"the last LBAs of the disk", kDiskLbas - 4, 4, 3 * kPage - 1024},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.what);
    data_.fill(0xa5);
    const size_t bytes = size_t{k.blocks} * kLbaSize;
    ASSERT_LE(k.offset + bytes, data_.size());
    EXPECT_TRUE(completed(ctrl_->read(k.lba, k.blocks, kDataIova + k.offset, bytes, prp_list)));
    const std::span<const std::byte> all = data_.bytes();
    EXPECT_EQ(check_disk_pattern(all.subspan(k.offset, bytes), k.lba), "");
    // Not one byte outside the requested range.
    for (auto [from, to] : {std::pair{size_t{0}, k.offset}, std::pair{k.offset + bytes, all.size()}})
      for (size_t i = from; i < to; ++i)
        ASSERT_EQ(static_cast<uint8_t>(all[i]), 0xa5) << "byte " << i << " outside the read changed";
  }
}

TEST_F(NvmeVfio, NeverMappedIovaIsBlocked) {
  identify_.fill(0x11);
  data_.fill(0x22);
  EXPECT_TRUE(identify_faults(kNeverMappedIova));
  EXPECT_TRUE(identify_.all_equal(0x11));
  EXPECT_TRUE(data_.all_equal(0x22));
}

TEST_F(NvmeVfio, ReadOnlyMappingStopsDeviceWrites) {
  auto page = DmaMemory::allocate(kPage);
  ASSERT_TRUE(page) << page.error().what();
  page->fill(0x3c);
  ASSERT_TRUE(map(*page, kReadOnlyIova, iommu::kRead));
  EXPECT_TRUE(identify_faults(kReadOnlyIova));
  EXPECT_TRUE(page->all_equal(0x3c)) << "the device wrote through a read-only mapping";
  auto st = domain_->unmap(kReadOnlyIova, kPage);
  EXPECT_TRUE(st) << st.error().what();
}

TEST_F(NvmeVfio, UnmappedIovaIsBlockedAfterUnmap) {
  auto page = DmaMemory::allocate(kPage);
  ASSERT_TRUE(page) << page.error().what();
  ASSERT_TRUE(map(*page, kUnmappedLaterIova, iommu::kReadWrite));
  // Reachable while mapped: the identify data arrives.
  page->fill(0);
  auto c = ctrl_->identify_controller(kUnmappedLaterIova);
  ASSERT_TRUE(c) << c.error().what();
  ASSERT_EQ(ascii_field(page->data(), kIdMn, 40), "QEMU NVMe Ctrl");

  auto st = domain_->unmap(kUnmappedLaterIova, kPage);
  ASSERT_TRUE(st) << st.error().what();
  page->fill(0x5a);
  EXPECT_TRUE(identify_faults(kUnmappedLaterIova));
  EXPECT_TRUE(page->all_equal(0x5a)) << "the device wrote through an unmapped IOVA";
}

}  // namespace
}  // namespace dmakit::vmtest
