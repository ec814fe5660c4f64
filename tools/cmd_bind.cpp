#include "tool.hpp"

namespace dmakit::tool {

void add_bind(CLI::App& app, Tool& tool) {
  auto* bind = app.add_subcommand("bind", "bind a PCI device (BDF) to vfio-pci");
  auto* unbind = app.add_subcommand("unbind", "return a PCI device (BDF) to its original driver");
  static std::string bdf;
  bind->add_option("bdf", bdf, "PCI address, e.g. 0000:00:03.0")->required();
  unbind->add_option("bdf", bdf, "PCI address, e.g. 0000:00:03.0")->required();
  bind->callback([&tool] { tool.exit_code = report_error(tool, "bind: not implemented yet"); });
  unbind->callback([&tool] { tool.exit_code = report_error(tool, "unbind: not implemented yet"); });
}

}  // namespace dmakit::tool
