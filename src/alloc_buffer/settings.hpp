// The settings of the buffer allocator ([buffer]). Defaults are kept
// identical to config/dmakit.toml (a unit test checks).
#pragma once

#include <cstdint>
#include <string>

namespace dmakit::alloc_buffer {

struct BufferSettings {
  std::string orders = "2M,1M,64K,4K"; // chunk orders, largest first
  bool hugepage_1g = false;            // also use 1 GiB hugepages where EAL has them
  uint32_t backoff_ms = 100;           // skip an order this long after it failed
  uint64_t recycle_high_mb = 256;      // recycled memory kept above this is released
  bool prezero = true;                 // background thread zeroes recycled memory
  bool psi = true;                     // shrink on /proc/pressure/memory events
  uint64_t slab_max = 1 << 20;         // buffers up to this many bytes come from slabs (0 = none)
  bool isolation = false;              // every buffer its own mapping; freed memory waits for the unmap
};

}  // namespace dmakit::alloc_buffer
