#include "tool.hpp"

namespace dmakit::tool {

void add_bench(CLI::App& app, Tool& tool) {
  auto* sub = app.add_subcommand("bench", "run a benchmark: dmapool, arena or buffer");
  static std::string name;
  sub->add_option("name", name, "benchmark name")->required()->check(CLI::IsMember({"dmapool", "arena", "buffer"}));
  sub->callback([&tool] { tool.exit_code = report_error(tool, "bench: not implemented yet"); });
}

}  // namespace dmakit::tool
