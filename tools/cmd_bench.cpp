#include <iostream>

#include "bench.hpp"
#include "core/context.hpp"
#include "tool.hpp"

namespace dmakit::tool {

namespace {

int run(Tool& tool, const std::string& name) {
  if (!prepare(tool)) return kExitUsage;
  auto ctx = core::Context::create(tool.cfg);
  if (!ctx) return report_error(tool, ctx.error().what());
  Result<base::Json> r = name == "dmapool" ? bench::run_dmapool(**ctx)
                         : name == "arena" ? bench::run_arena(**ctx)
                                           : bench::run_buffer(**ctx);
  if (!r) return report_error(tool, "bench " + name + ": " + r.error().what());
  // The benchmark object is JSON either way; --json only promises nothing else is printed.
  std::cout << r->str() << "\n";
  return 0;
}

}  // namespace

void add_bench(CLI::App& app, Tool& tool) {
  auto* sub = app.add_subcommand("bench", "run a benchmark: dmapool, arena or buffer");
  static std::string name;
  sub->add_option("name", name, "dmapool, arena or buffer")
      ->required()
      ->check(CLI::IsMember({"dmapool", "arena", "buffer"}));
  sub->footer(
      "Examples:\n"
      "  dmakit bench dmapool --json       small-block pools against DPDK's mempool and the C API\n"
      "  dmakit bench arena                IOVA alloc/free and lazy against strict unmapping\n"
      "  dmakit bench buffer --device 0000:00:03.0   on a real VFIO container\n"
      "Figures are for comparison within one run; see docs/PERFORMANCE.md.");
  sub->callback([&tool] { tool.exit_code = run(tool, name); });
}

}  // namespace dmakit::tool
