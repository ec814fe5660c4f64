#include <unistd.h>

#include <filesystem>
#include <iostream>

#include "base/eal.hpp"
#include "base/json.hpp"
#include "tool.hpp"

namespace dmakit::tool {

namespace {

int run_info(Tool& tool) {
  if (!prepare(tool)) return kExitUsage;
  const bool vfio = std::filesystem::exists("/dev/vfio/vfio");
  const auto huge = base::read_hugepages();
  auto plan = base::plan_eal(tool.cfg.eal, huge);
  if (tool.json) {
    auto j = base::Json::object();
    j.add("vfio", vfio);
    j.add("backend", vfio ? "vfio" : "sim");
    j.add("hugepages_2m", base::Json::object()
                              .add("total", huge.total)
                              .add("free", huge.free)
                              .add("overcommit", huge.overcommit)
                              .add("available", huge.available()));
    if (plan) j.add("eal_mode", plan->hugepages ? "huge" : "nohuge").add("eal_reason", plan->reason);
    std::cout << j.str() << "\n";
  } else {
    std::cout << "VFIO:       " << (vfio ? "/dev/vfio/vfio present" : "not available (no /dev/vfio/vfio)") << "\n";
    std::cout << "backend:    " << (vfio ? "vfio" : "sim (simulated type1 IOMMU)") << "\n";
    std::cout << "hugepages:  2 MiB total " << huge.total << ", free " << huge.free << ", overcommit "
              << huge.overcommit << "\n";
    if (plan) std::cout << "EAL:        " << plan->reason << "\n";
  }
  return 0;
}

}  // namespace

void add_info(CLI::App& app, Tool& tool) {
  auto* sub = app.add_subcommand("info", "report the IOMMU, VFIO groups, hugepages and pools");
  sub->callback([&tool] { tool.exit_code = run_info(tool); });
}

}  // namespace dmakit::tool
