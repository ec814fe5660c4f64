#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <iostream>
#include <optional>

#include "base/config_cli.hpp"
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

std::string latency_text(uint64_t ns) {
  if (ns < 10'000) return fmt::format("{} ns", ns);
  if (ns < 10'000'000) return fmt::format("{:.1f} us", static_cast<double>(ns) / 1e3);
  return fmt::format("{:.1f} ms", static_cast<double>(ns) / 1e6);
}

// Progress on stderr, so stdout keeps only the report (or the JSON object):
// one line rewritten in place on a terminal, a plain line each second
// otherwise.
std::function<void(const core::StressProgress&)> progress_printer(bool tty) {
  return [tty](const core::StressProgress& p) {
    const double rate = p.seconds > 0 ? static_cast<double>(p.ops) / p.seconds : 0;
    const std::string line = fmt::format("stress: {:.1f} s, {} ops ({:.0f} ops/s), {} failures", p.seconds, p.ops,
                                         rate, p.failures);
    if (tty) std::cerr << "\r" << line << "\x1b[K" << std::flush;
    else std::cerr << line << "\n";
  };
}

int run(Tool& tool, bool quiet) {
  if (!prepare(tool)) return kExitUsage;
  catch_interrupts();
  auto ctx = core::Context::create(tool.cfg);
  if (!ctx) return report_error(tool, ctx.error().what());
  const bool tty = ::isatty(STDERR_FILENO) == 1;
  auto r = core::run_stress(**ctx, tool.cfg.stress, &g_interrupt,
                            quiet ? std::function<void(const core::StressProgress&)>{} : progress_printer(tty),
                            tty ? std::chrono::milliseconds(250) : std::chrono::seconds(1));
  if (tty && !quiet) std::cerr << "\r\x1b[K" << std::flush;
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
    auto lat = base::Json::object();
    for (size_t k = 0; k < core::kStressOps; ++k) {
      const auto& h = r->latency[k];
      std::string key = core::kStressOpNames[k];
      std::replace(key.begin(), key.end(), ' ', '_');
      lat.add(key, base::Json::object()
                       .add("count", h.count)
                       .add("p50_ns", h.quantile_ns(0.5))
                       .add("p99_ns", h.quantile_ns(0.99))
                       .add("max_ns", h.max_ns));
    }
    j.add("latency", lat);
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
    std::cout << fmt::format("  {:<14}{:>10}{:>12}{:>11}{:>11}{:>11}\n", "operation", "count", "ops/s", "p50", "p99",
                             "max");
    for (size_t k = 0; k < core::kStressOps; ++k) {
      const auto& h = r->latency[k];
      std::cout << fmt::format("  {:<14}{:>10}{:>12.0f}{:>11}{:>11}{:>11}\n", core::kStressOpNames[k], h.count,
                               r->seconds > 0 ? static_cast<double>(h.count) / r->seconds : 0.0,
                               latency_text(h.quantile_ns(0.5)), latency_text(h.quantile_ns(0.99)),
                               latency_text(h.max_ns));
    }
    if (!r->first_failure.empty()) std::cout << "  first failure: " << r->first_failure << "\n";
    if (r->interrupted)
      std::cout << "  interrupted by SIG" << sigabbrev_np(g_signal.load()) << " before the time was up\n";
  }
  return r->failures == 0 && !r->interrupted ? 0 : kExitFailed;
}

}  // namespace

// The run's own flags. Each overrides its stress.* setting (from the file or
// --stress.*); they are applied in the callback, after the config file.
struct StressFlags {
  std::optional<uint32_t> threads;
  std::optional<double> seconds;
  std::optional<uint64_t> seed, max_bytes, ops;
};

template <class T>
void add_flag(CLI::App* sub, const std::string& name, const std::string& help, std::optional<T>& out) {
  base::add_parsed_option<T>(*sub, name, name, help, [&out](T v) { out = v; });
}

void add_stress(CLI::App& app, Tool& tool) {
  auto* sub = app.add_subcommand("stress", "stress-test allocation on the configured backend");
  static StressFlags flags;
  static bool quiet = false;
  sub->add_flag("--quiet", quiet, "no progress lines on stderr");
  add_flag(sub, "--threads", "worker threads (default stress.threads)", flags.threads);
  add_flag(sub, "--seconds", "run length in seconds (default stress.seconds)", flags.seconds);
  add_flag(sub, "--seed", "random seed; the same seed repeats the run's choices (default stress.seed)", flags.seed);
  add_flag(sub, "--max-bytes", "largest buffer requested, e.g. 4M (default stress.max_bytes)", flags.max_bytes);
  add_flag(sub, "--ops", "stop once this many operations are done (--seconds stays the limit; default stress.ops)",
           flags.ops);
  sub->footer(
      "Examples:\n"
      "  dmakit stress                                   the configured run (simulated IOMMU without VFIO)\n"
      "  dmakit stress --threads 8 --seconds 30 --seed 7\n"
      "  dmakit stress --device 0000:00:03.0 --device 0000:00:05.0   one container, two devices\n"
      "  dmakit stress --json --max-bytes 64M\n"
      "Exit status: 0 every check passed, 1 a check failed or the run was interrupted, 2 bad usage.");
  sub->callback([&tool] {
    if (flags.threads) tool.cfg.stress.threads = *flags.threads;
    if (flags.seconds) tool.cfg.stress.seconds = *flags.seconds;
    if (flags.seed) tool.cfg.stress.seed = *flags.seed;
    if (flags.max_bytes) tool.cfg.stress.max_bytes = *flags.max_bytes;
    if (flags.ops) {
      tool.cfg.stress.ops = *flags.ops;
      // An operation count alone runs until it is reached (within a day).
      if (!flags.seconds) tool.cfg.stress.seconds = 86400;
    }
    tool.exit_code = run(tool, quiet);
  });
}

}  // namespace dmakit::tool
