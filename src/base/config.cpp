#include "base/config.hpp"
#include "base/runtime_dir.hpp"

#include <charconv>
#include <cstdlib>
#include <filesystem>
#include <fmt/format.h>
#include <sstream>

#include "base/log.hpp"

namespace dmakit::base {

namespace {

template <class T>
Status check_value(const std::string& key, const std::string& text) {
  if constexpr (std::is_same_v<T, bool>) {
    if (text == "true" || text == "false") return ok();
    return fail(Errc::invalid_argument, "key '{}': '{}' is not a boolean (true or false)", key, text);
  } else if constexpr (std::is_integral_v<T>) {
    T v{};
    auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc() || p != text.data() + text.size())
      return fail(Errc::invalid_argument, "key '{}': '{}' is not a non-negative integer in range", key, text);
    return ok();
  } else if constexpr (std::is_floating_point_v<T>) {
    char* end = nullptr;
    std::strtod(text.c_str(), &end);
    if (text.empty() || end != text.c_str() + text.size())
      return fail(Errc::invalid_argument, "key '{}': '{}' is not a number", key, text);
    return ok();
  } else {
    return ok();
  }
}

template <class T>
std::string show_value(const T& v) {
  if constexpr (std::is_same_v<T, bool>) return v ? "true" : "false";
  else if constexpr (std::is_same_v<T, std::string>) return v;
  else if constexpr (std::is_floating_point_v<T>) return fmt::format("{}", v);
  else return std::to_string(v);
}

template <class T>
Setting make_setting(std::string key, std::string help, T& (*field)(Config&)) {
  Setting s;
  s.key = key;
  s.help = help;
  s.add_flag = [key, help, field](CLI::App& app, Config& cfg) -> CLI::Option* {
    return app.add_option("--" + key, field(cfg), help)->capture_default_str()->group("Settings");
  };
  s.check = [key](const std::string& text) { return check_value<T>(key, text); };
  s.show = [field](const Config& cfg) { return show_value(field(const_cast<Config&>(cfg))); };
  return s;
}

#define DMAKIT_SETTING(sect, name, help) \
  make_setting(#sect "." #name, help, +[](Config& c) -> auto& { return c.sect.name; })

// The config file reader: CLI11's TOML parser, with [section] key flattened
// to the option "--section.key" and every key checked against the table.
class FlatToml : public CLI::ConfigTOML {
 public:
  explicit FlatToml(const CLI::App* app) : app_(app) {}

  std::vector<CLI::ConfigItem> from_config(std::istream& in) const override {
    const CLI::Option* opt = app_->get_option_no_throw("--config");
    std::string file = opt != nullptr ? opt->as<std::string>() : std::string("config");
    std::vector<CLI::ConfigItem> out;
    for (auto& item : CLI::ConfigTOML::from_config(in)) {
      if (item.name == "++" || item.name == "--") continue;  // section markers
      std::string key;
      for (const auto& p : item.parents) key += p + ".";
      key += item.name;
      const Setting* s = nullptr;
      for (const auto& candidate : settings())
        if (candidate.key == key) s = &candidate;
      if (s == nullptr)
        throw CLI::ConfigError(fmt::format("{}: key '{}': unknown setting", file, key));
      if (item.inputs.size() != 1)
        throw CLI::ConfigError(fmt::format("{}: key '{}': expected one value", file, key));
      if (auto st = s->check(item.inputs.front()); !st)
        throw CLI::ConfigError(fmt::format("{}: {}", file, st.error().message));
      CLI::ConfigItem flat;
      flat.name = key;
      flat.inputs = item.inputs;
      out.push_back(std::move(flat));
    }
    return out;
  }

 private:
  const CLI::App* app_;
};

}  // namespace

const std::vector<Setting>& settings() {
  static const std::vector<Setting> table = {
      DMAKIT_SETTING(log, level, "log level: trace|debug|info|warn|error|critical|off"),
      DMAKIT_SETTING(eal, mode, "EAL memory: auto|huge|nohuge"),
      DMAKIT_SETTING(eal, memory_mb, "MiB of memory for EAL without hugepages (-m)"),
      DMAKIT_SETTING(eal, file_prefix, "EAL --file-prefix (default unique per process)"),
      DMAKIT_SETTING(eal, extra_args, "extra EAL arguments, space separated"),
      DMAKIT_SETTING(iommu, backend, "IOMMU backend: auto|vfio|sim"),
      DMAKIT_SETTING(iommu, device, "PCI BDF (e.g. 0000:00:03.0) whose group the VFIO container attaches"),
      DMAKIT_SETTING(iommu, sim_address_bits, "simulated IOMMU address width in bits"),
      DMAKIT_SETTING(iommu, sim_dma_entry_limit, "simulated IOMMU mapping-entry limit"),
      DMAKIT_SETTING(iommu, sim_page_sizes, "simulated IOMMU page sizes, e.g. 4K,2M,1G"),
      DMAKIT_SETTING(arena, pools, "IOVA pools (power of two <= 16; 0 = from CPU count)"),
      DMAKIT_SETTING(arena, large_share, "share of IOVA space for the large-request pool (0..0.9)"),
      DMAKIT_SETTING(arena, large_threshold_pages, "requests above this many pages use the large pool"),
      DMAKIT_SETTING(arena, strict, "unmap at free instead of lazily"),
      DMAKIT_SETTING(arena, stale_max_pages, "flush a pool when it holds this many stale pages"),
      DMAKIT_SETTING(arena, stale_max_age_ms, "flush a pool when its oldest stale range is this old (ms)"),
      DMAKIT_SETTING(arena, iova_start, "lowest IOVA the arena may use"),
      DMAKIT_SETTING(arena, iova_end, "highest IOVA the arena may use (0 = end of windows)"),
      DMAKIT_SETTING(buffer, orders, "chunk orders, largest first, e.g. 2M,1M,64K,4K"),
      DMAKIT_SETTING(buffer, hugepage_1g, "also use 1 GiB hugepages"),
      DMAKIT_SETTING(buffer, backoff_ms, "skip an order this long after it failed (ms)"),
      DMAKIT_SETTING(buffer, recycle_high_mb, "recycled memory above this (MiB) is released"),
      DMAKIT_SETTING(buffer, prezero, "zero recycled memory in a background thread"),
      DMAKIT_SETTING(buffer, psi, "shrink the recycle pool on memory pressure (PSI)"),
      DMAKIT_SETTING(pool, cache_size, "blocks held in each per-thread cache"),
      DMAKIT_SETTING(pool, poison, "poison blocks on free and check on alloc (no per-thread caches)"),
      DMAKIT_SETTING(pool, presets, "pools `info --pools` shows: name:size:align:boundary,..."),
      DMAKIT_SETTING(stress, seconds, "stress run length in seconds"),
      DMAKIT_SETTING(stress, threads, "stress threads"),
      DMAKIT_SETTING(stress, max_bytes, "largest buffer a stress operation requests"),
      DMAKIT_SETTING(stress, seed, "random seed for the stress run"),
  };
  return table;
}

void add_config_options(CLI::App& app, Config& cfg, std::string default_path) {
  app.set_config("--config", std::move(default_path), "TOML config file (see config/dmakit.toml)",
                 false);
  app.config_formatter(std::make_shared<FlatToml>(&app));
  app.allow_config_extras(CLI::config_extras_mode::error);
  for (const auto& s : settings()) s.add_flag(app, cfg);
}

std::string describe_parse_error(const CLI::Error& e) {
  // Config-file errors already carry "file: key 'k': reason".
  return e.what();
}

Result<Config> load_config_file(const std::string& path) {
  if (!std::filesystem::exists(path)) return fail(Errc::not_found, "{}: config file not found", path);
  Config cfg;
  CLI::App app{"dmakit-config"};
  add_config_options(app, cfg, "");
  std::vector<std::string> args = {path, "--config"};  // CLI11 parses a reversed vector
  try {
    app.parse(args);
  } catch (const CLI::Error& e) {
    return fail(Errc::invalid_argument, "{}", describe_parse_error(e));
  }
  if (auto st = validate(cfg); !st) return fail(Errc::invalid_argument, "{}: {}", path, st.error().message);
  return cfg;
}

Result<uint64_t> parse_size(std::string_view text) {
  if (text.empty()) return fail(Errc::invalid_argument, "empty size");
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || p == text.data()) return fail(Errc::invalid_argument, "'{}' is not a size", text);
  std::string_view suffix(p, static_cast<size_t>(text.data() + text.size() - p));
  uint64_t mult = 1;
  if (suffix.empty() || suffix == "B") mult = 1;
  else if (suffix == "K" || suffix == "KiB") mult = 1ull << 10;
  else if (suffix == "M" || suffix == "MiB") mult = 1ull << 20;
  else if (suffix == "G" || suffix == "GiB") mult = 1ull << 30;
  else return fail(Errc::invalid_argument, "'{}': unknown size suffix '{}' (K, M or G)", text, suffix);
  if (v > UINT64_MAX / mult) return fail(Errc::invalid_argument, "'{}' overflows 64 bits", text);
  return v * mult;
}

namespace {

bool one_of(const std::string& v, std::initializer_list<std::string_view> options) {
  for (auto o : options)
    if (v == o) return true;
  return false;
}

Status check_size_list(const char* key, const std::string& list) {
  std::stringstream ss(list);
  std::string item;
  int n = 0;
  while (std::getline(ss, item, ',')) {
    auto sz = parse_size(item);
    if (!sz) return fail(Errc::invalid_argument, "key '{}': {}", key, sz.error().message);
    if (*sz == 0 || (*sz & (*sz - 1)) != 0)
      return fail(Errc::invalid_argument, "key '{}': '{}' is not a power of two", key, item);
    ++n;
  }
  if (n == 0) return fail(Errc::invalid_argument, "key '{}': empty list", key);
  return ok();
}

}  // namespace

Status validate(const Config& c) {
  if (!parse_log_level(c.log.level))
    return fail(Errc::invalid_argument, "key 'log.level': unknown level '{}'", c.log.level);
  if (!one_of(c.eal.mode, {"auto", "huge", "nohuge"}))
    return fail(Errc::invalid_argument, "key 'eal.mode': '{}' is not auto, huge or nohuge", c.eal.mode);
  if (c.eal.memory_mb < 16)
    return fail(Errc::invalid_argument, "key 'eal.memory_mb': {} is below the 16 MiB minimum", c.eal.memory_mb);
  if (!c.eal.file_prefix.empty()) DMAKIT_TRY(check_file_prefix(c.eal.file_prefix));
  if (!one_of(c.iommu.backend, {"auto", "vfio", "sim"}))
    return fail(Errc::invalid_argument, "key 'iommu.backend': '{}' is not auto, vfio or sim", c.iommu.backend);
  if (c.iommu.sim_address_bits < 32 || c.iommu.sim_address_bits > 64)
    return fail(Errc::invalid_argument, "key 'iommu.sim_address_bits': {} is outside 32..64", c.iommu.sim_address_bits);
  if (c.iommu.sim_dma_entry_limit == 0)
    return fail(Errc::invalid_argument, "key 'iommu.sim_dma_entry_limit': must be at least 1");
  DMAKIT_TRY(check_size_list("iommu.sim_page_sizes", c.iommu.sim_page_sizes));
  if (c.arena.pools > 16 || (c.arena.pools & (c.arena.pools - 1)) != 0)
    return fail(Errc::invalid_argument, "key 'arena.pools': {} is not 0 or a power of two up to 16", c.arena.pools);
  if (!(c.arena.large_share >= 0.0 && c.arena.large_share <= 0.9))
    return fail(Errc::invalid_argument, "key 'arena.large_share': {} is outside 0..0.9", c.arena.large_share);
  if (c.arena.iova_end != 0 && c.arena.iova_end <= c.arena.iova_start)
    return fail(Errc::invalid_argument, "key 'arena.iova_end': {:#x} is not above arena.iova_start {:#x}",
                c.arena.iova_end, c.arena.iova_start);
  DMAKIT_TRY(check_size_list("buffer.orders", c.buffer.orders));
  if (c.stress.threads == 0 || c.stress.threads > 256)
    return fail(Errc::invalid_argument, "key 'stress.threads': {} is outside 1..256", c.stress.threads);
  if (!(c.stress.seconds > 0.0))
    return fail(Errc::invalid_argument, "key 'stress.seconds': {} is not positive", c.stress.seconds);
  return ok();
}

std::string default_config_path() {
  if (const char* env = std::getenv("DMAKIT_CONFIG"); env != nullptr && *env != '\0') return env;
  for (const char* p : {"config/dmakit.toml", "/etc/dmakit/dmakit.toml"})
    if (std::filesystem::exists(p)) return p;
  return "";
}

}  // namespace dmakit::base
