#include <iostream>

#include "base/json.hpp"
#include "core/context.hpp"
#include "core/stress.hpp"
#include "tool.hpp"

namespace dmakit::tool {

namespace {

int run(Tool& tool) {
  if (!prepare(tool)) return kExitUsage;
  auto ctx = core::Context::create(tool.cfg);
  if (!ctx) return report_error(tool, ctx.error().what());
  auto r = core::run_stress(**ctx, tool.cfg.stress);
  if (!r) return report_error(tool, "stress: " + r.error().what());
  if (tool.json) {
    auto j = base::Json::object();
    j.add("ops", r->ops).add("failures", r->failures).add("seconds", r->seconds).add("backend", r->backend);
    j.add("threads", tool.cfg.stress.threads).add("seed", tool.cfg.stress.seed);
    j.add("buffer_allocs", r->buffer_allocs).add("buffer_bytes", r->buffer_bytes);
    j.add("block_allocs", r->block_allocs).add("cross_thread_frees", r->cross_thread_frees);
    j.add("device_checks", r->device_checks).add("refused_bad_frees", r->refused_bad_frees);
    j.add("alloc_errors", r->alloc_errors).add("mappings_at_end", r->mappings_at_end);
    if (!r->first_failure.empty()) j.add("first_failure", r->first_failure);
    std::cout << j.str() << "\n";
  } else {
    std::cout << fmt::format(
        "stress on {} backend, {} threads, {:.2f} s: {} ops, {} failures\n"
        "  buffers: {} allocated ({:.1f} MiB)   blocks: {} allocated, {} freed by another thread\n"
        "  device checks through the IOMMU: {}   deliberate bad frees refused: {} (pool 'stress-misuse')\n"
        "  allocations refused for lack of memory: {}\n"
        "  mappings left after freeing everything: {}\n",
        r->backend, tool.cfg.stress.threads, r->seconds, r->ops, r->failures, r->buffer_allocs,
        static_cast<double>(r->buffer_bytes) / (1 << 20), r->block_allocs, r->cross_thread_frees,
        r->device_checks, r->refused_bad_frees, r->alloc_errors, r->mappings_at_end);
    if (!r->first_failure.empty()) std::cout << "  first failure: " << r->first_failure << "\n";
  }
  return r->failures == 0 ? 0 : kExitFailed;
}

}  // namespace

void add_stress(CLI::App& app, Tool& tool) {
  auto* sub = app.add_subcommand("stress", "stress-test allocation on the configured backend");
  sub->callback([&tool] { tool.exit_code = run(tool); });
}

}  // namespace dmakit::tool
