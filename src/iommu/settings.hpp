// The settings of the IOMMU layer: [iommu] (which domain, the simulated
// IOMMU's shape) and [arena] (how the IOVA arena splits and flushes its
// space). Defaults are kept identical to config/dmakit.toml (a unit test
// checks); ArenaConfig::from_settings and SimConfig::from_settings turn them
// into the structures the code takes.
#pragma once

#include <cstdint>
#include <string>

namespace dmakit::iommu {

struct IommuSettings {
  std::string backend = "auto";         // auto (vfio when /dev/vfio/vfio exists, else sim) | vfio | sim
  std::string devices;                  // PCI BDFs, comma separated, whose groups the VFIO container attaches
  uint32_t sim_address_bits = 39;       // simulated IOMMU address width
  uint32_t sim_dma_entry_limit = 65535; // as vfio_iommu_type1's dma_entry_limit
  std::string sim_page_sizes = "4K,2M,1G";
};

struct ArenaSettings {
  uint32_t shards = 0;                 // 0 = from hardware threads (power of two, <= 16)
  double large_share = 0.25;           // share of the IOVA space for the large shard
  uint64_t large_threshold_pages = 64; // requests above this page count use the large shard
  bool strict = false;                 // unmap at free instead of lazily
  uint64_t stale_max_pages = 8192;     // flush a shard when this many pages are stale
  uint32_t stale_max_age_ms = 50;      // ... or when its oldest stale range is this old
  uint64_t iova_start = 0;             // narrow the space to [iova_start, iova_end]
  uint64_t iova_end = 0;               // 0 = up to the end of the last window
};

}  // namespace dmakit::iommu
