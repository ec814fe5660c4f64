// The configuration of the host tests that start a whole Context: the
// simulated IOMMU over real EAL memory without hugepages.
#pragma once

#include "core/context.hpp"

namespace dmakit::testing_support {

inline core::Config sim_config() {
  core::Config c;
  c.iommu.backend = "sim";
  c.eal.mode = "nohuge";
  c.eal.memory_mb = 256;
  return c;
}

}  // namespace dmakit::testing_support
