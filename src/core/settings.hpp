// The settings of the stress workload (core/stress.hpp, `dmakit stress`):
// [stress]. Defaults are kept identical to config/dmakit.toml (a unit test
// checks).
#pragma once

#include <cstdint>
#include <string>

namespace dmakit::core {

struct StressSettings {
  double seconds = 3.0;
  uint32_t threads = 2;
  uint64_t max_bytes = 4 << 20;        // largest buffer a stress op asks for
  uint64_t seed = 1;
  uint64_t ops = 0;                     // stop after this many operations; 0 = the time decides
  std::string mix = "40:55:5";          // weights buffers:blocks:maps (parse_stress_mix)
};

// stress.mix parsed: the relative weights of the three kinds of operation.
struct StressMix {
  uint32_t buffers = 0, blocks = 0, maps = 0;
};

}  // namespace dmakit::core
