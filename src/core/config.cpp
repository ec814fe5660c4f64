#include "core/config.hpp"

#include <algorithm>
#include <filesystem>

#include "base/log.hpp"
#include "base/eal.hpp"
#include "base/runtime_dir.hpp"
#include "core/config_cli.hpp"
#include "iommu/pci.hpp"

namespace dmakit::core {

namespace {

// A table row: the setting and how to add it as a flag bound to a Config.
struct Entry {
  Setting setting;
  std::function<CLI::Option*(CLI::App&, Config&)> add_flag;
};

template <class T>
Entry make_entry(std::string key, std::string help, T& (*field)(Config&)) {
  Entry e;
  e.setting.key = key;
  e.setting.help = help;
  e.setting.check = [key](const std::string& text) { return base::check_value<T>(key, text); };
  e.setting.show = [field](const Config& cfg) { return base::show_value(field(const_cast<Config&>(cfg))); };
  e.add_flag = [key, help, field](CLI::App& app, Config& cfg) -> CLI::Option* {
    return base::add_setting_flag(app, key, help, field(cfg));
  };
  return e;
}

#define DMAKIT_SETTING(sect, name, help) \
  make_entry(#sect "." #name, help, +[](Config& c) -> auto& { return c.sect.name; })

const std::vector<Entry>& entries() {
  static const std::vector<Entry> table = {
      DMAKIT_SETTING(log, level, "log level: trace|debug|info|warn|error|critical|off"),
      DMAKIT_SETTING(eal, mode, "EAL memory: auto|huge|nohuge"),
      DMAKIT_SETTING(eal, memory_mb, "MiB of memory for EAL without hugepages (-m)"),
      DMAKIT_SETTING(eal, file_prefix, "EAL --file-prefix (default unique per process)"),
      DMAKIT_SETTING(eal, extra_args, "extra EAL arguments, space separated"),
      DMAKIT_SETTING(iommu, backend, "IOMMU backend: auto|vfio|sim"),
      DMAKIT_SETTING(iommu, devices, "PCI BDFs, comma separated (e.g. 0000:00:03.0,0000:00:05.0), whose IOMMU groups the VFIO container attaches"),
      DMAKIT_SETTING(iommu, sim_address_bits, "simulated IOMMU address width in bits"),
      DMAKIT_SETTING(iommu, sim_dma_entry_limit, "simulated IOMMU mapping-entry limit"),
      DMAKIT_SETTING(iommu, sim_page_sizes, "simulated IOMMU page sizes, e.g. 4K,2M,1G"),
      DMAKIT_SETTING(arena, shards, "IOVA arena shards (power of two <= 16; 0 = from CPU count)"),
      DMAKIT_SETTING(arena, large_share, "share of IOVA space for the large-request shard (0..0.9)"),
      DMAKIT_SETTING(arena, large_threshold_pages, "requests above this many pages use the large shard"),
      DMAKIT_SETTING(arena, strict, "unmap at free instead of lazily"),
      DMAKIT_SETTING(arena, stale_max_pages, "flush a shard when it holds this many stale pages"),
      DMAKIT_SETTING(arena, stale_max_age_ms, "flush a shard when its oldest stale range is this old (ms)"),
      DMAKIT_SETTING(arena, iova_start, "lowest IOVA the arena may use"),
      DMAKIT_SETTING(arena, iova_end, "highest IOVA the arena may use (0 = end of windows)"),
      DMAKIT_SETTING(buffer, orders, "chunk orders, largest first, e.g. 2M,1M,64K,4K"),
      DMAKIT_SETTING(buffer, hugepage_1g, "also use 1 GiB hugepages"),
      DMAKIT_SETTING(buffer, backoff_ms, "skip an order this long after it failed (ms)"),
      DMAKIT_SETTING(buffer, recycle_high_mb, "recycled memory above this (MiB) is released"),
      DMAKIT_SETTING(buffer, prezero, "zero recycled memory in a background thread"),
      DMAKIT_SETTING(buffer, psi, "shrink the recycler on memory pressure (PSI)"),
      DMAKIT_SETTING(buffer, slab_max, "buffers up to this many bytes are carved from slabs mapped once (0 = none)"),
      DMAKIT_SETTING(buffer, isolation, "every buffer its own mapping; freed memory has no new owner before its unmap"),
      DMAKIT_SETTING(pool, cache_size, "blocks held in each per-thread cache"),
      DMAKIT_SETTING(pool, poison, "poison blocks on free and check on alloc (no per-thread caches)"),
      DMAKIT_SETTING(pool, presets, "pools `info --pools` shows: name:size:align:boundary,..."),
      DMAKIT_SETTING(stress, seconds, "stress run length in seconds"),
      DMAKIT_SETTING(stress, threads, "stress threads"),
      DMAKIT_SETTING(stress, max_bytes, "largest buffer a stress operation requests"),
      DMAKIT_SETTING(stress, seed, "random seed for the stress run"),
      DMAKIT_SETTING(stress, ops, "stop the stress run after this many operations (0 = run for stress.seconds)"),
      DMAKIT_SETTING(stress, mix, "weights of the stress operations, buffers:blocks:maps (e.g. 40:55:5)"),
  };
  return table;
}

#undef DMAKIT_SETTING

}  // namespace

const std::vector<Setting>& settings() {
  static const std::vector<Setting> table = [] {
    std::vector<Setting> t;
    for (const auto& e : entries()) t.push_back(e.setting);
    return t;
  }();
  return table;
}

void add_config_options(CLI::App& app, Config& cfg, std::string default_path) {
  std::vector<base::SettingCheck> keys;
  for (const auto& s : settings()) keys.push_back({s.key, s.check});
  base::add_config_file_option(app, std::move(default_path), std::move(keys));
  for (const auto& e : entries()) e.add_flag(app, cfg);
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
    return fail(Errc::invalid_argument, "{}", base::describe_parse_error(e));
  }
  if (auto st = validate(cfg); !st) return fail(Errc::invalid_argument, "{}: {}", path, st.error().message);
  return cfg;
}

Status validate(const Config& c) {
  using base::check_size_list;
  using base::one_of;
  if (!base::parse_log_level(c.log.level))
    return fail(Errc::invalid_argument, "key 'log.level': unknown level '{}'", c.log.level);
  if (!one_of(c.eal.mode, {"auto", "huge", "nohuge"}))
    return fail(Errc::invalid_argument, "key 'eal.mode': '{}' is not auto, huge or nohuge", c.eal.mode);
  if (c.eal.memory_mb < 16)
    return fail(Errc::invalid_argument, "key 'eal.memory_mb': {} is below the 16 MiB minimum", c.eal.memory_mb);
  if (c.eal.memory_mb > (1u << 20))
    return fail(Errc::invalid_argument, "key 'eal.memory_mb': {} is above 1048576 (1 TiB)", c.eal.memory_mb);
  if (!c.eal.file_prefix.empty()) DMAKIT_TRY(base::check_file_prefix(c.eal.file_prefix));
  DMAKIT_TRY(base::check_eal_extra_args(c.eal.extra_args));
  if (!one_of(c.iommu.backend, {"auto", "vfio", "sim"}))
    return fail(Errc::invalid_argument, "key 'iommu.backend': '{}' is not auto, vfio or sim", c.iommu.backend);
  if (auto list = iommu::pci::parse_bdf_list(c.iommu.devices); !list)
    return std::unexpected(with_context(list.error(), "key 'iommu.devices'"));
  if (c.iommu.sim_address_bits < 32 || c.iommu.sim_address_bits > 64)
    return fail(Errc::invalid_argument, "key 'iommu.sim_address_bits': {} is outside 32..64", c.iommu.sim_address_bits);
  if (c.iommu.sim_dma_entry_limit == 0)
    return fail(Errc::invalid_argument, "key 'iommu.sim_dma_entry_limit': must be at least 1");
  DMAKIT_TRY(check_size_list("iommu.sim_page_sizes", c.iommu.sim_page_sizes));
  if (c.arena.shards > 16 || (c.arena.shards & (c.arena.shards - 1)) != 0)
    return fail(Errc::invalid_argument, "key 'arena.shards': {} is not 0 or a power of two up to 16", c.arena.shards);
  if (!(c.arena.large_share >= 0.0 && c.arena.large_share <= 0.9))
    return fail(Errc::invalid_argument, "key 'arena.large_share': {} is outside 0..0.9", c.arena.large_share);
  if (c.arena.iova_end != 0 && c.arena.iova_end <= c.arena.iova_start)
    return fail(Errc::invalid_argument, "key 'arena.iova_end': {:#x} is not above arena.iova_start {:#x}",
                c.arena.iova_end, c.arena.iova_start);
  // Bounds far above any useful value, so a slip (a byte count for a page
  // count, milliseconds for seconds) is refused rather than run.
  if (c.arena.large_threshold_pages > (1ull << 24))
    return fail(Errc::invalid_argument, "key 'arena.large_threshold_pages': {} is above 16777216 pages (64 GiB)",
                c.arena.large_threshold_pages);
  if (c.arena.stale_max_pages > (1ull << 32))
    return fail(Errc::invalid_argument, "key 'arena.stale_max_pages': {} is above 4294967296 pages (16 TiB)",
                c.arena.stale_max_pages);
  if (c.arena.stale_max_age_ms > 3600000)
    return fail(Errc::invalid_argument, "key 'arena.stale_max_age_ms': {} is above 3600000 (an hour)",
                c.arena.stale_max_age_ms);
  DMAKIT_TRY(check_size_list("buffer.orders", c.buffer.orders));
  if (c.buffer.backoff_ms > 3600000)
    return fail(Errc::invalid_argument, "key 'buffer.backoff_ms': {} is above 3600000 (an hour)", c.buffer.backoff_ms);
  if (c.buffer.recycle_high_mb > (1ull << 24))
    return fail(Errc::invalid_argument, "key 'buffer.recycle_high_mb': {} is above 16777216 (16 TiB)",
                c.buffer.recycle_high_mb);
  if (c.buffer.slab_max != 0 && (c.buffer.slab_max < 4096 || c.buffer.slab_max > (2u << 20) ||
                                 (c.buffer.slab_max & (c.buffer.slab_max - 1)) != 0))
    return fail(Errc::invalid_argument, "key 'buffer.slab_max': {} is not 0 or a power of two in 4096..2097152",
                c.buffer.slab_max);
  if (c.pool.cache_size > 65536)
    return fail(Errc::invalid_argument, "key 'pool.cache_size': {} is above 65536 blocks", c.pool.cache_size);
  if (c.stress.max_bytes < 4096 || c.stress.max_bytes > (1ull << 40))
    return fail(Errc::invalid_argument, "key 'stress.max_bytes': {} is outside 4096..1T", c.stress.max_bytes);
  if (c.stress.seconds > 366.0 * 86400)
    return fail(Errc::invalid_argument, "key 'stress.seconds': {} is more than a year", c.stress.seconds);
  if (c.stress.ops > (1ull << 48))
    return fail(Errc::invalid_argument, "key 'stress.ops': {} is above 2^48", c.stress.ops);
  if (c.stress.threads == 0 || c.stress.threads > 256)
    return fail(Errc::invalid_argument, "key 'stress.threads': {} is outside 1..256", c.stress.threads);
  if (!(c.stress.seconds > 0.0))
    return fail(Errc::invalid_argument, "key 'stress.seconds': {} is not positive", c.stress.seconds);
  DMAKIT_TRY(parse_stress_mix(c.stress.mix));
  DMAKIT_TRY(parse_pool_presets(c.pool.presets));
  return ok();
}

Result<std::vector<PoolPreset>> parse_pool_presets(std::string_view text) {
  std::vector<PoolPreset> out;
  std::string_view rest = text;
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    const std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view{} : rest.substr(comma + 1);
    std::vector<std::string_view> f;
    for (std::string_view r = item;;) {
      const size_t colon = r.find(':');
      f.push_back(r.substr(0, colon));
      if (colon == std::string_view::npos) break;
      r.remove_prefix(colon + 1);
    }
    if (f.size() != 4 || f[0].empty())
      return fail(Errc::invalid_argument, "key 'pool.presets': '{}' is not name:size:align:boundary", item);
    PoolPreset p{std::string(f[0])};
    uint64_t* dst[3] = {&p.size, &p.align, &p.boundary};
    for (int i = 0; i < 3; ++i) {
      auto v = base::parse_value<uint64_t>("pool.presets", std::string(f[i + 1]));
      if (!v)
        return fail(Errc::invalid_argument, "key 'pool.presets': '{}': '{}' is not a decimal size (K, M, G allowed)",
                    item, f[i + 1]);
      *dst[i] = *v;
    }
    out.push_back(std::move(p));
  }
  return out;
}

Result<StressMix> parse_stress_mix(std::string_view text) {
  auto bad = [&](const char* why) {
    return fail(Errc::invalid_argument, "key 'stress.mix': '{}' {}", text, why);
  };
  uint32_t w[3] = {};
  size_t n = 0;
  std::string_view rest = text;
  for (;;) {
    const size_t colon = rest.find(':');
    const std::string_view field = rest.substr(0, colon);
    if (n == 3) return bad("is not three weights buffers:blocks:maps");
    if (field.empty() || field.size() > 6 || !std::all_of(field.begin(), field.end(), [](char c) { return c >= '0' && c <= '9'; }))
      return bad("is not three decimal weights buffers:blocks:maps (each 0 to 999999)");
    w[n++] = static_cast<uint32_t>(std::stoul(std::string(field)));
    if (colon == std::string_view::npos) break;
    rest.remove_prefix(colon + 1);
  }
  if (n != 3) return bad("is not three weights buffers:blocks:maps");
  if (w[0] + w[1] + w[2] == 0) return bad("gives every kind of operation weight 0");
  return StressMix{w[0], w[1], w[2]};
}

}  // namespace dmakit::core
