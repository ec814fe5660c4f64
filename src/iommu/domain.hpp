// Domain: one IOMMU address space that a device's DMA goes through.
//
// The DMA contract: once map() returns, the device may read (and, with
// kWrite, write) the mapped host memory at any time until unmap() returns.
// Memory must stay allocated for that whole time.
//
// Rules every backend enforces (they are vfio_iommu_type1's, with its errno):
//   - len, iova and vaddr are multiples of the smallest IOMMU page  -> EINVAL
//   - prot has kRead and/or kWrite                                  -> EINVAL
//   - [iova, iova+len) lies inside one reported IOVA window         -> EINVAL
//   - it overlaps no existing mapping                               -> EEXIST
//   - the domain still has a free mapping entry (dma_entry_limit)   -> ENOSPC
//   - unmap(iova, len) removes the mappings wholly inside the range;
//     a range that would split a mapping is refused                 -> EINVAL
//     (a range that touches no mapping succeeds and removes nothing)
// Backends: vfio::Container (VFIO type1 container) and SimDomain.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "iommu/host_index.hpp"

namespace dmakit::iommu {

enum Prot : uint32_t { kRead = 1, kWrite = 2, kReadWrite = 3 };

// Inclusive range, as VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE reports it.
struct IovaWindow {
  uint64_t start = 0;
  uint64_t last = 0;
  uint64_t size() const { return last - start + 1; }
  bool operator==(const IovaWindow&) const = default;
};

struct IovaSpan {
  uint64_t iova = 0;
  uint64_t len = 0;
  uint64_t end() const { return iova + len; }
  bool operator==(const IovaSpan&) const = default;
};

// What VFIO_IOMMU_GET_INFO reports, parsed once.
struct DomainInfo {
  std::string backend;               // "vfio-type1v2", "vfio-type1" or "sim"
  uint64_t page_sizes = 0;           // bitmap of supported IOMMU page sizes
  std::vector<IovaWindow> windows;   // usable IOVA ranges, sorted; holes are outside
  std::optional<uint32_t> dma_avail; // free mapping entries when queried (VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL)

  uint64_t min_page() const { return page_sizes & (~page_sizes + 1); }
};

struct DomainStats {
  uint64_t map_calls = 0;    // successful map() calls
  uint64_t unmap_calls = 0;  // unmap ioctls issued (one per merged run in unmap_batch)
  uint64_t mappings = 0;     // live mapping entries
  uint64_t mapped_bytes = 0;
};

class Domain {
 public:
  virtual ~Domain() = default;
  Domain() = default;
  Domain(const Domain&) = delete;
  Domain& operator=(const Domain&) = delete;

  virtual const DomainInfo& info() const = 0;

  // Maps [vaddr, vaddr+len) at iova for the device. Thread-safe.
  virtual Status map(const void* vaddr, uint64_t iova, uint64_t len, uint32_t prot) = 0;

  // Removes the mappings inside [iova, iova+len) (see the rules above). Thread-safe.
  virtual Status unmap(uint64_t iova, uint64_t len) = 0;

  // Unmaps many ranges: sorts them, merges adjacent ones and issues one
  // unmap per merged run. Returns the first error; ranges after it are still tried.
  Status unmap_batch(std::span<const IovaSpan> ranges);

  // Free mapping entries right now (the kernel's dma_avail, or the model's).
  virtual uint64_t dma_avail() const = 0;

  virtual DomainStats stats() const = 0;

  // The IOVA at which the device reaches host address vaddr, and how many
  // bytes from there are mapped contiguously; nullopt when dmakit has not
  // mapped it. Thread-safe; a lookup, no system call.
  virtual std::optional<HostRun> translate_host(const void* vaddr) const { return host_index_.lookup(vaddr); }

 protected:
  // Backends record every successful map and unmap here.
  HostIndex host_index_;
};

// Validates a map/unmap request against the rules above that need no
// mapping state (alignment, prot, windows). Shared by both backends so their
// errors agree. op is "map" or "unmap", used in the message.
Status check_range(const DomainInfo& info, const void* vaddr, uint64_t iova, uint64_t len,
                   uint32_t prot, const char* op);

}  // namespace dmakit::iommu
