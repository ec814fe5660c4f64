// What the guest a test runs in actually has, read from the kernel instead of
// assumed: the devices on vfio-pci and their IOMMU groups, the IOMMU's IOVA
// windows and address width, and the 2 MiB hugepage supply. run-guest.sh
// can boot guests with other IOMMU widths, hugepage counts and device sets;
// tests derive their expectations from these facts so they hold in each.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.hpp"
#include "iommu/domain.hpp"

namespace dmakit::vmtest {

// The x86 MSI address range: interrupts, not memory, so every x86 IOMMU
// leaves it out of the usable IOVA space.
inline constexpr uint64_t kX86MsiFirst = 0xfee0'0000;
inline constexpr uint64_t kX86MsiLast = 0xfeef'ffff;

struct GuestGroup {
  int number = -1;
  std::vector<std::string> members;  // every device of the group, sorted
  bool all_vfio = false;             // every member is on vfio-pci
};

struct GuestFacts {
  // sysfs: devices bound to vfio-pci (sorted) and the groups they are in.
  std::vector<std::string> vfio_devices;
  std::vector<GuestGroup> groups;

  // VFIO_IOMMU_GET_INFO of a container holding one viable group, as
  // dmakit's Container parses it; empty when no group is viable.
  iommu::DomainInfo iommu;
  uint32_t address_bits = 0;  // the last usable IOVA is 2^address_bits - 1 (0: no windows)

  // The Intel IOMMU's capability register (sysfs), independent of VFIO:
  // MGAW and the page sizes its second-level tables support (4 KiB plus
  // the SLLPS large pages).
  uint32_t dmar_address_bits = 0;
  uint64_t dmar_page_sizes = 0;
  // vfio_iommu_type1's dma_entry_limit module parameter (0 when unreadable).
  uint32_t dma_entry_limit = 0;

  // /proc/meminfo: the default hugepage size and its pool.
  uint64_t hugepage_kb = 0;
  uint64_t hugepages_total = 0;
  uint64_t hugepages_free = 0;

  bool bound(std::string_view bdf) const;
  // The group of a device on vfio-pci, or nothing.
  const GuestGroup* group_of(std::string_view bdf) const;
  // A device on vfio-pci whose group is usable and not bdf's, or "".
  std::string other_usable_device(std::string_view bdf) const;
  uint64_t iova_last() const;  // 0 without windows
  // The gap between two windows that holds the x86 MSI range, if any.
  std::optional<iommu::IovaWindow> msi_hole() const;

  std::string str() const;  // one line per fact, for logs and failure messages
};

// Reads every fact now. The IOMMU part opens a VFIO container and a group,
// so call it while the process holds no VFIO group.
Result<GuestFacts> read_guest_facts();

// read_guest_facts() once per process (the first call must come before the
// test opens a VFIO group); later calls return the same answer.
const Result<GuestFacts>& guest_facts();

}  // namespace dmakit::vmtest
