// dmakit configuration: one struct gathering every layer's settings section
// (each defined by the layer that reads it), and the table of every setting:
// its key "section.key", help, check and printed value. Defaults are kept
// identical to config/dmakit.toml, which a unit test checks. The table lives
// here because only the top floor sees every section; the generic reading of
// TOML and flags is base's (base/config_cli.hpp), bound to this table by
// core/config_cli.hpp. This header does not include CLI11.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "alloc_buffer/settings.hpp"
#include "base/config.hpp"
#include "base/settings.hpp"
#include "core/settings.hpp"
#include "base/error.hpp"
#include "iommu/settings.hpp"
#include "pool/settings.hpp"

namespace dmakit::core {

struct Config {
  base::LogSettings log;
  base::EalSettings eal;
  iommu::IommuSettings iommu;
  iommu::ArenaSettings arena;
  alloc_buffer::BufferSettings buffer;
  pool::PoolSettings pool;
  StressSettings stress;
};

// One setting: its dotted key, help text, how to check a textual value, and
// how to print the current value.
struct Setting {
  std::string key;
  std::string help;
  std::function<Status(const std::string&)> check;
  std::function<std::string(const Config&)> show;
};

const std::vector<Setting>& settings();

// Reads a TOML file into a Config (defaults for what the file omits).
Result<Config> load_config_file(const std::string& path);

// Cross-field checks (ranges, enumerations); the message names the key.
Status validate(const Config& cfg);

// stress.mix: three decimal weights buffers:blocks:maps, not all 0; the
// error names the key and the text.
Result<StressMix> parse_stress_mix(std::string_view text);

// pool.presets: comma-separated name:size:align:boundary, each number
// decimal (K, M, G allowed) as every size setting is read; the error names
// the key and the entry.
struct PoolPreset {
  std::string name;
  uint64_t size = 0, align = 0, boundary = 0;
};
Result<std::vector<PoolPreset>> parse_pool_presets(std::string_view text);

}  // namespace dmakit::core
