#include <signal.h>

#include <atomic>
#include <iostream>

#include "base/json.hpp"
#include "core/context.hpp"
#include "core/stress.hpp"
#include "tool.hpp"

namespace dmakit::tool {

namespace {

// SIGINT/SIGTERM end the run early: the workers stop, everything is freed
// and checked, the report is printed, and the exit code says it did not
// finish. The handlers belong to the tool, never to the library. A second
// signal takes the default action; the next dmakit reclaims what it left.
std::atomic<bool> g_interrupt{false};
std::atomic<int> g_signal{0};

extern "C" void on_interrupt(int sig) {
  g_signal.store(sig, std::memory_order_relaxed);
  g_interrupt.store(true, std::memory_order_relaxed);
}

void catch_interrupts() {
  struct sigaction sa {};
  sa.sa_handler = on_interrupt;
  sa.sa_flags = SA_RESETHAND;  // a second signal ends the process at once
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

int run(Tool& tool) {
  if (!prepare(tool)) return kExitUsage;
  catch_interrupts();
  auto ctx = core::Context::create(tool.cfg);
  if (!ctx) return report_error(tool, ctx.error().what());
  auto r = core::run_stress(**ctx, tool.cfg.stress, &g_interrupt);
  if (!r) return report_error(tool, "stress: " + r.error().what());
  if (tool.json) {
    auto j = base::Json::object();
    j.add("ops", r->ops).add("failures", r->failures).add("seconds", r->seconds).add("backend", r->backend);
    auto devices = base::Json::array();  // the attached devices; none on the simulated backend
    for (const auto& d : (*ctx)->devices()) devices.push(d);
    j.add("devices", devices);
    j.add("threads", tool.cfg.stress.threads).add("seed", tool.cfg.stress.seed);
    j.add("buffer_allocs", r->buffer_allocs).add("buffer_bytes", r->buffer_bytes);
    j.add("block_allocs", r->block_allocs).add("cross_thread_frees", r->cross_thread_frees);
    j.add("device_checks", r->device_checks).add("refused_bad_frees", r->refused_bad_frees);
    j.add("alloc_errors", r->alloc_errors).add("mappings_at_end", r->mappings_at_end);
    if (!r->first_failure.empty()) j.add("first_failure", r->first_failure);
    if (r->interrupted) j.add("interrupted_by", std::string("SIG") + sigabbrev_np(g_signal.load()));
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
    if (r->interrupted)
      std::cout << "  interrupted by SIG" << sigabbrev_np(g_signal.load()) << " before the time was up\n";
  }
  return r->failures == 0 && !r->interrupted ? 0 : kExitFailed;
}

}  // namespace

void add_stress(CLI::App& app, Tool& tool) {
  auto* sub = app.add_subcommand("stress", "stress-test allocation on the configured backend");
  sub->callback([&tool] { tool.exit_code = run(tool); });
}

}  // namespace dmakit::tool
