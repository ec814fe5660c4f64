// The settings base owns: the logger's and the EAL's. Each layer keeps its
// own section struct next to the code that reads it (iommu/settings.hpp,
// alloc_buffer/settings.hpp, pool/settings.hpp, core/settings.hpp); the
// defaults here are kept identical to config/dmakit.toml, which a unit test
// checks. core/config.hpp gathers the sections into one Config.
#pragma once

#include <cstdint>
#include <string>

namespace dmakit::base {

struct LogSettings {
  std::string level = "warn";  // trace|debug|info|warn|error|critical|off
};

struct EalSettings {
  std::string mode = "auto";   // auto | huge | nohuge
  uint32_t memory_mb = 512;    // memory for --no-huge (-m)
  std::string file_prefix;     // "" = dmakit-<pid>, unique per process; a plain name (no /)
  std::string extra_args;      // appended to the EAL argument list, space separated
};

}  // namespace dmakit::base
