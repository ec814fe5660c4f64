// dmakit bind BDF / dmakit unbind BDF: move a PCI device to vfio-pci and back.
#include <iostream>
#include <memory>

#include "json.hpp"
#include "iommu/pci.hpp"
#include "tool.hpp"

namespace dmakit::tool {

namespace {

namespace pci = iommu::pci;

std::string driver_text(const std::string& d) { return d.empty() ? "no driver" : d; }

int run_bind(Tool& tool, const std::string& bdf) {
  if (!prepare(tool)) return kExitUsage;
  auto r = pci::bind_vfio(bdf);
  if (!r) return report_error(tool, "bind: " + r.error().what());
  if (tool.json) {
    emit_json(Json{{"bdf", r->bdf}, {"driver", std::string(pci::kVfioPci)}, {"iommu_group", r->group}, {"previous_driver", r->previous_driver}, {"already_bound", r->already_bound}, {"state_file", r->state_file}});
  } else if (r->already_bound) {
    std::cout << r->bdf << " is already bound to vfio-pci (IOMMU group " << r->group << ")\n";
  } else {
    std::cout << r->bdf << ": " << driver_text(r->previous_driver) << " -> vfio-pci (IOMMU group " << r->group
              << "; /dev/vfio/" << r->group << "; 'dmakit unbind " << r->bdf << "' restores it)\n";
  }
  return 0;
}

int run_unbind(Tool& tool, const std::string& bdf) {
  if (!prepare(tool)) return kExitUsage;
  auto r = pci::unbind_vfio(bdf);
  if (!r) return report_error(tool, "unbind: " + r.error().what());
  if (tool.json) {
    emit_json(Json{{"bdf", r->bdf}, {"driver", r->restored_driver}, {"was_bound", r->was_bound}});
  } else if (!r->was_bound) {
    std::cout << r->bdf << " is not bound to vfio-pci (" << driver_text(r->restored_driver)
              << "); nothing to do\n";
  } else {
    std::cout << r->bdf << ": vfio-pci -> " << driver_text(r->restored_driver) << "\n";
  }
  return 0;
}

}  // namespace

void add_bind(CLI::App& app, Tool& tool) {
  // CLI11 keeps pointers to the option targets; they live as long as the app.
  auto bind_bdf = std::make_shared<std::string>();
  auto unbind_bdf = std::make_shared<std::string>();
  auto* bind = app.add_subcommand(
      "bind", "bind a PCI device to vfio-pci via driver_override (its driver is remembered in /run/dmakit)");
  auto* unbind = app.add_subcommand("unbind", "return a PCI device from vfio-pci to the driver it had before");
  bind->add_option("bdf", *bind_bdf, "PCI address, e.g. 0000:00:03.0 or 00:03.0")->required();
  unbind->add_option("bdf", *unbind_bdf, "PCI address, e.g. 0000:00:03.0 or 00:03.0")->required();
  bind->footer(
      "Examples:\n"
      "  dmakit bind 0000:00:03.0          hand the NVMe controller to vfio-pci\n"
      "  dmakit bind 00:03.0 --json\n"
      "Every device of its IOMMU group must be on vfio-pci (or no driver) before a context can use it.");
  unbind->footer(
      "Examples:\n"
      "  dmakit unbind 0000:00:03.0        give it back to the driver bind recorded (e.g. nvme)");
  bind->callback([&tool, bind_bdf] { tool.exit_code = run_bind(tool, *bind_bdf); });
  unbind->callback([&tool, unbind_bdf] { tool.exit_code = run_unbind(tool, *unbind_bdf); });
}

}  // namespace dmakit::tool
