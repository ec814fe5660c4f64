// SimDomain: a strict software model of a vfio_iommu_type1 container, for
// hosts without VFIO. It refuses exactly what the kernel refuses, with the
// kernel's errno (see the rules in domain.hpp), and lets tests play the
// device: translate() / device_read() / device_write() reach host memory only
// through live mappings with the needed permission, like DMA through an IOMMU.
//
// Locked memory, as type1 charges it: every map() pins len / 4K host pages
// and charges them to the process (mm->locked_vm) against RLIMIT_MEMLOCK,
// unless the process has CAP_IPC_LOCK; past the limit the map fails with
// ENOMEM and nothing stays pinned. The charge is per mapping: the kernel
// looks for an earlier pin of a page only among the same mapping's own
// (vfio_find_vpfn), so one page mapped at two IOVAs, or in two containers,
// is charged twice. unmap() and the domain's end give the charge back. The
// process's limit and capability are read at the first map and again after
// 10 ms, and always before a refusal (the kernel reads them at every map). The
// model keeps one process-wide total for all simulated domains (locked_vm
// is per process); memory the process mlock()s itself is not in it.
//
// Data structure: an ordered map iova -> {vaddr, len, prot} of disjoint
// mappings under one mutex, plus counters. Lookups are O(log n).
//
// Owns: the mapping table. Does not own the host memory behind mappings; the
// caller keeps it allocated from map() until unmap() returns, as with VFIO.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "iommu/settings.hpp"
#include "base/error.hpp"
#include "iommu/domain.hpp"
#include "iommu/pci.hpp"

namespace dmakit::iommu {

struct SimConfig {
  uint64_t page_sizes = 0x40201000;  // 4K | 2M | 1G, what the guest's VT-d reports
  uint32_t address_bits = 39;        // IOVA width; windows end at 2^bits - 1
  uint32_t dma_entry_limit = 65535;  // vfio_iommu_type1's default module parameter
  // Usable IOVA ranges, sorted and disjoint. Empty = what the real guest
  // reports: 0-0xfedfffff and 0xfef00000-(2^bits - 1), i.e. the x86 MSI
  // window 0xfee00000-0xfeefffff is a hole; below 32 bits there is no hole.
  std::vector<IovaWindow> windows;
  // The locked-memory limit in bytes; none = the process's own, read at each
  // map as the kernel does (RLIMIT_MEMLOCK, waived by CAP_IPC_LOCK). A value
  // is a limit that no capability waives (for tests).
  std::optional<uint64_t> memlock_limit;

  // From the iommu.sim_* settings; sim_page_sizes is a list like "4K,2M,1G".
  static Result<SimConfig> from_settings(const IommuSettings& s);
};

class SimDomain final : public Domain {
 public:
  static Result<std::unique_ptr<SimDomain>> create(const SimConfig& cfg = {});
  ~SimDomain() override;

  // Bytes pinned by the mappings of every simulated domain of the process
  // (the model's locked_vm, in 4K pages times 4K).
  static uint64_t process_pinned_bytes();

  const DomainInfo& info() const override { return info_; }
  Status map(const void* vaddr, uint64_t iova, uint64_t len, uint32_t prot) override;
  Status unmap(uint64_t iova, uint64_t len) override;
  uint64_t dma_avail() const override;
  DomainStats stats() const override;

  // The host bytes a device reaches at [iova, iova+len) with `access`
  // (kRead and/or kWrite): the range must lie inside one live mapping whose
  // prot allows the access, else Errc::fault. The span is valid only while
  // that mapping stays in place.
  Result<std::span<std::byte>> translate(uint64_t iova, uint64_t len, uint32_t access) const;

  // Device DMA that may cross adjacent mappings. Every piece is checked
  // before any byte moves: on a fault nothing is written or read.
  Status device_write(uint64_t iova, std::span<const std::byte> data);
  Status device_read(uint64_t iova, std::span<std::byte> out) const;

 private:
  struct Mapping {
    std::byte* vaddr;
    uint64_t len;
    uint32_t prot;
  };
  struct Piece {
    std::byte* host;
    uint64_t len;
  };

  SimDomain(DomainInfo info, uint32_t limit, std::optional<uint64_t> memlock_limit)
      : info_(std::move(info)), limit_(limit), memlock_limit_(memlock_limit) {}

  // Charges the pages of a new mapping of len bytes; ENOMEM past the limit.
  Status pin(uint64_t iova, uint64_t len);

  // Splits [iova, iova+len) into host pieces, each inside one mapping with
  // `access`; appends to `out`. Caller holds mu_.
  Status resolve_locked(uint64_t iova, uint64_t len, uint32_t access, std::vector<Piece>& out) const;

  const DomainInfo info_;
  const uint32_t limit_;
  const std::optional<uint64_t> memlock_limit_;
  // The process's memlock state as last read (under mu_), and when.
  static constexpr std::chrono::nanoseconds kMemlockReread{std::chrono::milliseconds(10)};
  pci::MemlockState mem_;
  int64_t mem_read_ns_ = 0;
  mutable std::mutex mu_;
  std::map<uint64_t, Mapping> maps_;  // key: iova; ranges never overlap
  uint64_t map_calls_ = 0;
  uint64_t unmap_calls_ = 0;
  uint64_t mapped_bytes_ = 0;
};

}  // namespace dmakit::iommu
