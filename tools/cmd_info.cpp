#include <iostream>
#include <optional>
#include <sstream>

#include "base/eal.hpp"
#include "json.hpp"
#include "core/context.hpp"
#include "iommu/vfio.hpp"
#include "pool/dma_pool.hpp"
#include "tool.hpp"

namespace dmakit::tool {

namespace {

std::string page_sizes_text(uint64_t bitmap) {
  std::string out;
  for (int bit = 0; bit < 64; ++bit) {
    if ((bitmap >> bit & 1) == 0) continue;
    uint64_t sz = 1ull << bit;
    std::string s = sz >= (1ull << 30) ? fmt::format("{}G", sz >> 30)
                    : sz >= (1ull << 20) ? fmt::format("{}M", sz >> 20)
                                         : fmt::format("{}K", sz >> 10);
    out += (out.empty() ? "" : ",") + s;
  }
  return out;
}

Json iommu_json(const iommu::DomainInfo& d) {
  auto windows = Json::array();
  for (const auto& w : d.windows)
    windows.push_back(Json{{"start", fmt::format("{:#x}", w.start)}, {"last", fmt::format("{:#x}", w.last)}});
  auto j = Json::object();
  j["backend"] = d.backend; j["page_sizes"] = fmt::format("{:#x}", d.page_sizes); j["windows"] = windows;
  if (d.dma_avail) j["dma_avail"] = static_cast<uint64_t>(*d.dma_avail);
  return j;
}

void print_iommu(const iommu::DomainInfo& d, const char* indent) {
  std::cout << indent << "page sizes: " << fmt::format("{:#x} ({})", d.page_sizes, page_sizes_text(d.page_sizes)) << "\n";
  for (const auto& w : d.windows) std::cout << indent << fmt::format("IOVA window: {:#x}-{:#x}", w.start, w.last) << "\n";
  if (d.dma_avail) std::cout << indent << "DMA_AVAIL: " << *d.dma_avail << " mapping entries\n";
}

// Builds a context, creates the preset pools and grows each by one chunk, so
// the listing shows what a fresh pool of that shape carves from one buffer.
Result<std::string> pools_listing(Tool& tool, Json& json) {
  auto presets = DMAKIT_TRY(core::parse_pool_presets(tool.cfg.pool.presets));
  auto ctx = DMAKIT_TRY(core::Context::create(tool.cfg));
  for (const auto& p : presets) {
    auto pool = DMAKIT_TRY(ctx->create_pool(p.name, p.size, p.align, p.boundary));
    auto blk = DMAKIT_TRY(pool->alloc());
    DMAKIT_TRY(pool->free(blk.vaddr, blk.iova));
  }
  auto stats = ctx->pool_stats();
  auto arr = Json::array();
  for (const auto& s : stats)
    arr.push_back(Json{{"name", s.name}, {"size", s.size}, {"align", s.align}, {"boundary", s.boundary}, {"blocks", s.blocks}, {"active", s.active}, {"chunks", s.chunks}, {"validation_failures", s.validation_failures}, {"steals", s.steals}});
  json["pools"] = arr;
  return pool::format_pools(stats);
}

// The devices a context would attach (iommu.devices / --device): each one's
// IOMMU group and driver, or why it cannot be used.
struct DeviceLine {
  std::string bdf;
  int group = -1;
  std::string driver;
  std::string error;
};

std::vector<DeviceLine> device_lines(const Tool& tool) {
  std::vector<DeviceLine> out;
  auto list = iommu::pci::parse_bdf_list(tool.cfg.iommu.devices);  // prepare() checked it
  for (const auto& bdf : list.value_or(std::vector<std::string>{})) {
    DeviceLine d;
    d.bdf = bdf;
    auto parsed = iommu::pci::Bdf::parse(bdf);
    auto group = iommu::pci::iommu_group(*parsed);
    auto driver = iommu::pci::current_driver(*parsed);
    if (!group) d.error = group.error().what();
    else d.group = *group;
    if (driver) d.driver = *driver;
    else if (d.error.empty()) d.error = driver.error().what();
    out.push_back(std::move(d));
  }
  return out;
}

int run_info(Tool& tool, bool pools) {
  if (!prepare(tool)) return kExitUsage;
  const auto huge = base::read_hugepages();
  auto plan = base::plan_eal(tool.cfg.eal, huge);
  auto vfio = iommu::vfio::probe_vfio();
  auto j = Json::object();

  j["vfio"] = vfio && vfio->present;
  if (vfio && vfio->present) {
    j["vfio_api_version"] = vfio->api_version; j["type1v2"] = vfio->type1v2; j["type1"] = vfio->type1;
    auto groups = Json::array();
    for (const auto& g : vfio->groups) {
      auto members = Json::array();
      for (const auto& m : g.members) members.push_back(Json{{"bdf", m.bdf}, {"driver", m.driver}});
      auto gj = Json::object();
      gj["group"] = g.number; gj["devices"] = members; gj["all_vfio"] = g.all_vfio;
      if (g.viable) gj["viable"] = *g.viable;
      if (g.iommu) gj["iommu"] = iommu_json(*g.iommu);
      if (!g.error.empty()) gj["error"] = g.error;
      groups.push_back(gj);
    }
    j["groups"] = groups;
  } else {
    j["vfio_reason"] = vfio ? vfio->reason : vfio.error().what();
  }
  auto choice = core::Context::choose_backend(tool.cfg);
  if (!choice) return report_error(tool, choice.error().what(), kExitUsage);
  const bool use_vfio = choice->backend == "vfio";
  j["backend"] = choice->backend; j["backend_reason"] = choice->reason;
  const auto devices = device_lines(tool);
  auto dev_json = Json::array();
  for (const auto& d : devices) {
    auto dj = Json::object();
    dj["bdf"] = d.bdf;
    if (d.error.empty()) {
      dj["group"] = d.group;
      dj["driver"] = d.driver;
    } else {
      dj["error"] = d.error;
    }
    dev_json.push_back(dj);
  }
  j["devices"] = dev_json;
  std::optional<iommu::DomainInfo> sim_info;  // the simulated IOMMU the sim backend would use
  if (!use_vfio) {
    core::Config c = tool.cfg;
    c.iommu.backend = "sim";
    if (auto sim = core::Context::make_domain(c)) sim_info = (*sim)->info();
    if (sim_info) j["sim_iommu"] = iommu_json(*sim_info);
  }
  j["hugepages_2m"] = Json{{"total", huge.total}, {"free", huge.free}, {"overcommit", huge.overcommit}, {"available", huge.available()}};
  if (plan) {
    j["eal_mode"] = plan->hugepages ? "huge" : "nohuge";
    j["eal_reason"] = plan->reason;
  }

  std::string listing;
  if (pools) {
    auto l = pools_listing(tool, j);
    if (!l) return report_error(tool, "info --pools: " + l.error().what());
    listing = *l;
  }
  if (tool.json) {
    emit_json(j);
    return 0;
  }

  if (vfio && vfio->present) {
    std::cout << fmt::format("VFIO:      API version {}, TYPE1v2 {}, TYPE1 {}\n", vfio->api_version,
                             vfio->type1v2 ? "yes" : "no", vfio->type1 ? "yes" : "no");
    for (const auto& g : vfio->groups) {
      std::cout << fmt::format("group {}:{}\n", g.number,
                               g.viable ? (*g.viable ? " viable" : " NOT viable") : "");
      for (const auto& m : g.members)
        std::cout << "    " << m.bdf << "  driver " << (m.driver.empty() ? "(none)" : m.driver) << "\n";
      if (g.iommu) print_iommu(*g.iommu, "    ");
      if (!g.error.empty()) std::cout << "    " << g.error << "\n";
    }
  } else {
    std::cout << "VFIO:      not available: " << (vfio ? vfio->reason : vfio.error().what()) << "\n";
  }
  std::cout << "backend:   " << (use_vfio ? "vfio" : "sim (simulated VFIO type1 IOMMU)") << " - "
            << choice->reason << "\n";
  if (sim_info) print_iommu(*sim_info, "           ");
  for (const auto& d : devices) {
    if (d.error.empty())
      std::cout << fmt::format("device:    {}  IOMMU group {}, driver {}\n", d.bdf, d.group,
                               d.driver.empty() ? "(none)" : d.driver);
    else
      std::cout << fmt::format("device:    {}  {}\n", d.bdf, d.error);
  }
  std::cout << fmt::format("hugepages: 2 MiB total {}, free {}, overcommit {}\n", huge.total, huge.free, huge.overcommit);
  if (plan) std::cout << "EAL:       " << plan->reason << "\n";
  if (pools) std::cout << listing;
  return 0;
}

}  // namespace

void add_info(CLI::App& app, Tool& tool) {
  auto* sub = app.add_subcommand("info", "report the IOMMU, VFIO groups, hugepages and pools");
  static bool pools = false;
  // Devices may also be named as arguments: `dmakit info 00:03.0 00:05.0`.
  static std::vector<std::string> bdfs;
  sub->add_option("bdf", bdfs, "PCI devices to show (as --device; both may be given)");
  sub->add_flag("--pools", pools, "create the pool.presets pools and list them as the kernel's dma pools file does");
  sub->footer(
      "Examples:\n"
      "  dmakit info                       VFIO groups with their IOMMU windows, hugepages, the backend and why\n"
      "  dmakit info --device 0000:00:03.0 --device 0000:00:05.0   the devices a context would attach\n"
      "  dmakit info 0000:00:03.0 00:05.0  the same, devices as arguments\n"
      "  dmakit info --pools --json        the pool.presets pools as the kernel's dma pools file lists them");
  sub->callback([&tool] {
    tool.devices.insert(tool.devices.end(), bdfs.begin(), bdfs.end());
    tool.exit_code = run_info(tool, pools);
  });
}

}  // namespace dmakit::tool
