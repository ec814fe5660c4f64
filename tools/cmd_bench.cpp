#include <iostream>

#include "bench.hpp"
#include "core/context.hpp"
#include "tool.hpp"

namespace dmakit::tool {

namespace {

Result<Json> run_one(core::Context& ctx, const std::string& name, bool quick) {
  if (name == "dmapool") return bench::run_dmapool(ctx, quick);
  if (name == "arena") return bench::run_arena(ctx, quick);
  return bench::run_buffer(ctx, quick);
}

int run(Tool& tool, const std::string& name, bool quick) {
  if (!prepare(tool)) return kExitUsage;
  auto ctx = core::Context::create(tool.cfg);
  if (!ctx) return report_error(tool, ctx.error().what());
  Json out;
  if (name == "all") {
    // One object: {"bench": "all", "benches": {NAME: that bench's object, ...}}.
    auto benches = Json::object();
    for (const char* one : {"dmapool", "arena", "buffer"}) {
      auto r = run_one(**ctx, one, quick);
      if (!r) return report_error(tool, std::string("bench ") + one + ": " + r.error().what());
      benches[one] = std::move(*r);
    }
    out = Json{{"bench", "all"}, {"benches", std::move(benches)}};
  } else {
    auto r = run_one(**ctx, name, quick);
    if (!r) return report_error(tool, "bench " + name + ": " + r.error().what());
    out = std::move(*r);
  }
  // The benchmark object is JSON either way; without --json it is indented for reading.
  if (tool.json) emit_json(out);
  else std::cout << out.dump(2) << "\n";
  return 0;
}

}  // namespace

void add_bench(CLI::App& app, Tool& tool) {
  auto* sub = app.add_subcommand("bench", "run a benchmark: dmapool, arena, buffer or all");
  static std::string name;
  sub->add_option("name", name, "dmapool, arena, buffer, or all of them in one object")
      ->required()
      ->check(CLI::IsMember({"dmapool", "arena", "buffer", "all"}));
  static bool quick = false;
  sub->add_flag("--quick", quick, "every case with few repeats and small sizes: checks a benchmark runs");
  sub->footer(
      "Examples:\n"
      "  dmakit bench dmapool --json       small-block pools against DPDK's mempool and the C API\n"
      "  dmakit bench arena                IOVA alloc/free and lazy against strict unmapping\n"
      "  dmakit bench all --json           every benchmark, one object {\"bench\":\"all\",\"benches\":{...}}\n"
      "  dmakit bench all --quick          every case, run small: does each benchmark work here?\n"
      "  dmakit bench buffer --device 0000:00:03.0   on a real VFIO container\n"
      "Figures are for comparison within one run; see docs/PERFORMANCE.md.");
  sub->callback([&tool] { tool.exit_code = run(tool, name, quick); });
}

}  // namespace dmakit::tool
