// VFIO capability chains on arbitrary bytes: the replies of
// VFIO_IOMMU_GET_INFO (IOVA ranges, DMA_AVAIL) and VFIO_DEVICE_GET_REGION_INFO
// (sparse mmap areas), as a broken or hostile kernel could fill them. The
// first byte picks the reply; the rest is the reply. Beyond memory safety
// (ASan, UBSan), a parsed reply must keep what the rest of dmakit relies on.
#include <linux/vfio.h>

#include <cstddef>
#include <cstdint>
#include <span>

#include "fuzz_support.hpp"
#include "iommu/vfio.hpp"

using namespace dmakit;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet_log();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool region = (data[0] & 1) != 0;
  // A copy of exactly the reply's length, so ASan sees any read past it.
  std::vector<std::byte> reply(reinterpret_cast<const std::byte*>(data + 1),
                               reinterpret_cast<const std::byte*>(data + size));
  const std::span<const std::byte> buf(reply);
  if (!region) {
    auto info = iommu::vfio::parse_iommu_info(buf, VFIO_TYPE1v2_IOMMU, "fuzz");
    if (!info) return 0;
    if (info->page_sizes == 0) fuzz::violation("IOMMU info accepted without page sizes");
    if (info->windows.empty()) fuzz::violation("IOMMU info accepted without an IOVA window");
    // The arena and SimDomain take windows as sorted, disjoint, inclusive ranges.
    for (size_t i = 0; i < info->windows.size(); ++i) {
      const auto& w = info->windows[i];
      if (w.start > w.last) fuzz::violation("IOVA window {:#x}-{:#x} ends before it starts", w.start, w.last);
      if (i > 0 && info->windows[i - 1].last >= w.start)
        fuzz::violation("IOVA windows {:#x}-{:#x} and {:#x}-{:#x} overlap or are unsorted",
                        info->windows[i - 1].start, info->windows[i - 1].last, w.start, w.last);
    }
  } else {
    const iommu::vfio::RegionInfo ri = iommu::vfio::parse_region_info(buf, 0);
    if (!ri.mmappable() && !ri.mmap_areas.empty()) fuzz::violation("mmap areas on a region that is not mmappable");
    for (const auto& a : ri.mmap_areas)
      if (a.size == 0) fuzz::violation("empty mmap area at {:#x}", a.offset);
    if (ri.mmappable() && !ri.sparse && ri.size != 0 &&
        (ri.mmap_areas.size() != 1 || ri.mmap_areas[0].offset != 0 || ri.mmap_areas[0].size != ri.size))
      fuzz::violation("a mmappable region without sparse areas must be mmappable whole");
  }
  return 0;
}
