#include "iommu/domain.hpp"

#include <algorithm>

namespace dmakit::iommu {

Status Domain::unmap_batch(std::span<const IovaSpan> ranges) {
  std::vector<IovaSpan> sorted(ranges.begin(), ranges.end());
  std::sort(sorted.begin(), sorted.end(), [](auto& a, auto& b) { return a.iova < b.iova; });
  Status first = ok();
  size_t i = 0;
  while (i < sorted.size()) {
    IovaSpan run = sorted[i++];
    while (i < sorted.size() && sorted[i].iova == run.end()) run.len += sorted[i++].len;
    if (auto st = unmap(run.iova, run.len); !st && first) first = st;
  }
  return first;
}

Status check_range(const DomainInfo& info, const void* vaddr, uint64_t iova, uint64_t len,
                   uint32_t prot, const char* op) {
  const uint64_t mask = info.min_page() - 1;
  const uint64_t va = reinterpret_cast<uintptr_t>(vaddr);
  if (len == 0 || ((len | iova | va) & mask) != 0)
    return fail_errno(EINVAL, "{} iova {:#x} len {:#x} vaddr {:#x}: not aligned to the IOMMU page {:#x}",
                      op, iova, len, va, mask + 1);
  if (iova + len - 1 < iova)
    return fail_errno(EINVAL, "{} iova {:#x} len {:#x}: range wraps around", op, iova, len);
  if (std::string_view(op) == "map") {
    if ((prot & kReadWrite) == 0 || (prot & ~kReadWrite) != 0)
      return fail_errno(EINVAL, "map iova {:#x}: prot {:#x} is not read and/or write", iova, prot);
    bool inside = std::any_of(info.windows.begin(), info.windows.end(), [&](const IovaWindow& w) {
      return iova >= w.start && iova + len - 1 <= w.last;
    });
    if (!inside)
      return fail_errno(EINVAL, "map iova {:#x}-{:#x}: outside the IOMMU's usable IOVA windows", iova,
                        iova + len - 1);
  }
  return ok();
}

}  // namespace dmakit::iommu
