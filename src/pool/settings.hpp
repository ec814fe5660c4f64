// The settings of the DMA pools ([pool]): what a pool a context creates gets
// unless its creator says otherwise. Defaults are kept identical to
// config/dmakit.toml (a unit test checks).
#pragma once

#include <cstdint>
#include <string>

namespace dmakit::pool {

struct PoolSettings {
  uint32_t cache_size = 256;           // blocks per per-thread cache (two magazines of half)
  bool poison = false;                 // poison on free, check on alloc; pools have no per-thread caches
  // Pools `dmakit info --pools` creates to show their geometry: name:size:align:boundary,...
  std::string presets = "nvme-sqe:64:64:0,nvme-cqe:16:16:0,prp-list:4096:4096:0,sgl-odd:68:32:4096";
};

}  // namespace dmakit::pool
