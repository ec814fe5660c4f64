// dmakit configuration: one struct with every setting, its defaults (kept
// identical to config/dmakit.toml, which a unit test checks), a table that
// registers every setting as a CLI flag "--section.key", and the TOML reader
// built on CLI11's config support.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/error.hpp"

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

struct IommuSettings {
  std::string backend = "auto";         // auto (vfio when /dev/vfio/vfio exists, else sim) | vfio | sim
  std::string device;                   // PCI BDF whose group the VFIO container attaches
  uint32_t sim_address_bits = 39;       // simulated IOMMU address width
  uint32_t sim_dma_entry_limit = 65535; // as vfio_iommu_type1's dma_entry_limit
  std::string sim_page_sizes = "4K,2M,1G";
};

struct ArenaSettings {
  uint32_t pools = 0;                  // 0 = from hardware threads (power of two, <= 16)
  double large_share = 0.25;           // share of the IOVA space for the large pool
  uint64_t large_threshold_pages = 64; // requests above this page count use the large pool
  bool strict = false;                 // unmap at free instead of lazily
  uint64_t stale_max_pages = 8192;     // flush a pool when this many pages are stale
  uint32_t stale_max_age_ms = 50;      // ... or when its oldest stale range is this old
  uint64_t iova_start = 0;             // narrow the space to [iova_start, iova_end]
  uint64_t iova_end = 0;               // 0 = up to the end of the last window
};

struct BufferSettings {
  std::string orders = "2M,1M,64K,4K"; // chunk orders, largest first
  bool hugepage_1g = false;            // also use 1 GiB hugepages where EAL has them
  uint32_t backoff_ms = 100;           // skip an order this long after it failed
  uint64_t recycle_high_mb = 256;      // recycled memory kept above this is released
  bool prezero = true;                 // background thread zeroes recycled memory
  bool psi = true;                     // shrink on /proc/pressure/memory events
};

struct PoolSettings {
  uint32_t cache_size = 256;           // blocks per per-thread cache (two magazines of half)
  bool poison = false;                 // poison on free, check on alloc; pools have no per-thread caches
  // Pools `dmakit info --pools` creates to show their geometry: name:size:align:boundary,...
  std::string presets = "nvme-sqe:64:64:0,nvme-cqe:16:16:0,prp-list:4096:4096:0,sgl-odd:68:32:4096";
};

struct StressSettings {
  double seconds = 3.0;
  uint32_t threads = 2;
  uint64_t max_bytes = 4 << 20;        // largest buffer a stress op asks for
  uint64_t seed = 1;
};

struct Config {
  LogSettings log;
  EalSettings eal;
  IommuSettings iommu;
  ArenaSettings arena;
  BufferSettings buffer;
  PoolSettings pool;
  StressSettings stress;
};

// One setting: its dotted key, help text, how to add it as a flag, how to
// check a textual value, and how to print the current value.
struct Setting {
  std::string key;
  std::string help;
  std::function<CLI::Option*(CLI::App&, Config&)> add_flag;
  std::function<Status(const std::string&)> check;
  std::function<std::string(const Config&)> show;
};

const std::vector<Setting>& settings();

// Adds "--config FILE" and every setting as "--section.key" to app, bound to
// cfg. Values from the file are checked by the settings table before CLI11
// applies them; flags given on the command line override the file.
void add_config_options(CLI::App& app, Config& cfg, std::string default_path);

// Turns a CLI11 parse error into one line naming the file and key when the
// error came from the config file.
std::string describe_parse_error(const CLI::Error& e);

// Reads a TOML file into a Config (defaults for what the file omits).
Result<Config> load_config_file(const std::string& path);

// Cross-field checks (ranges, enumerations); the message names the key.
Status validate(const Config& cfg);

// Where the tool looks for its config when --config is not given:
// $DMAKIT_CONFIG, then ./config/dmakit.toml, then /etc/dmakit/dmakit.toml; "" if none.
std::string default_config_path();

// Parses "4K", "2M", "1G", "65536" into bytes.
Result<uint64_t> parse_size(std::string_view text);

}  // namespace dmakit::base
