// The EAL most host tests share: no hugepages, 64 MiB. Started once per
// process (the EAL cannot restart); a suite calls it from SetUpTestSuite.
#pragma once

#include <gtest/gtest.h>

#include "base/eal.hpp"

namespace dmakit::testing_support {

inline void start_nohuge_eal() {
  base::EalSettings e;
  e.mode = "nohuge";
  e.memory_mb = 64;
  auto r = base::ensure_eal(e);
  ASSERT_TRUE(r) << r.error().what();
}

}  // namespace dmakit::testing_support
