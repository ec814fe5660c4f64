#include "tool.hpp"

namespace dmakit::tool {

void add_stress(CLI::App& app, Tool& tool) {
  auto* sub = app.add_subcommand("stress", "stress-test allocation on the configured backend");
  sub->callback([&tool] { tool.exit_code = report_error(tool, "stress: not implemented yet"); });
}

}  // namespace dmakit::tool
