#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <iostream>
#include <optional>

#include "base/config_cli.hpp"
#include "json.hpp"
#include "core/config.hpp"
#include "core/context.hpp"
#include "stress.hpp"
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
  if (ns < 1'000'000) return fmt::format("{:.1f} us", static_cast<double>(ns) / 1e3);
  return fmt::format("{:.1f} ms", static_cast<double>(ns) / 1e6);
}

std::string bytes_text(uint64_t b) {
  if (b < (1ull << 20)) return fmt::format("{:.1f} KiB", static_cast<double>(b) / 1024);
  return fmt::format("{:.1f} MiB", static_cast<double>(b) / (1 << 20));
}

// Progress on stderr, so stdout keeps only the report (or the JSON object):
// one line rewritten in place on a terminal, a plain line each second
// otherwise.
std::function<void(const StressProgress&)> progress_printer(bool tty) {
  return [tty](const StressProgress& p) {
    const double rate = p.seconds > 0 ? static_cast<double>(p.ops) / p.seconds : 0;
    const std::string line = fmt::format("stress: {:.1f} s, {} ops ({:.0f} ops/s), {} failures", p.seconds, p.ops,
                                         rate, p.failures);
    if (tty) std::cerr << "\r" << line << "\x1b[K" << std::flush;
    else std::cerr << line << "\n";
  };
}

double per_second(uint64_t n, double seconds) { return seconds > 0 ? static_cast<double>(n) / seconds : 0.0; }

Json soak_json(const StressReport& r) {
  auto series = [](const SoakSample& s) {
    return Json{{"rss_bytes", s.rss_bytes}, {"mappings", s.mappings}, {"fds", s.fds}};
  };
  const auto& v = r.soak_verdict;
  Json j{{"flat", v.flat}, {"samples", v.samples}, {"warmup_samples", v.warmup},
         {"first_third_max", series(v.first_max)}, {"last_third_max", series(v.last_max)}};
  if (!v.why.empty()) j["why"] = v.why;
  return j;
}

Json report_json(const Tool& tool, const core::Context& ctx, const StressReport& r, bool passed) {
  const auto& s = tool.cfg.stress;
  const auto mix = core::parse_stress_mix(s.mix);  // validated by prepare()
  Json j{{"passed", passed}, {"ops", r.ops}, {"failures", r.failures}, {"seconds", r.seconds},
         {"backend", r.backend}, {"devices", ctx.devices()}, {"threads", s.threads}, {"seed", s.seed},
         {"mix", Json{{"buffers", mix->buffers}, {"blocks", mix->blocks}, {"maps", mix->maps}}}};
  auto kinds = Json::object();
  for (size_t k = 0; k < kStressKinds; ++k) {
    const auto& kr = r.kinds[k];
    kinds[kStressKindNames[k]] = Json{{"ops", kr.ops},
                                      {"ops_per_sec", per_second(kr.ops, r.seconds)},
                                      {"p50_ns", kr.latency.quantile_ns(0.5)},
                                      {"p99_ns", kr.latency.quantile_ns(0.99)},
                                      {"max_ns", kr.latency.max_ns}};
  }
  j["kinds"] = kinds;
  j["ops_per_sec"] = per_second(r.ops, r.seconds);
  j["buffer_bytes"] = r.buffer_bytes;
  j["cross_thread_frees"] = r.cross_thread_frees;
  j["device_checks"] = r.device_checks;
  j["misuse_checks"] = r.misuse_checks;
  j["validation_failures"] = r.validation_failures;
  j["flushes"] = r.flushes;
  j["order_fallbacks"] = r.order_fallbacks;
  j["alloc_errors"] = r.alloc_errors;
  j["peak_live_bytes"] = r.peak_live_bytes;
  j["peak_rss_bytes"] = r.peak_rss_bytes;
  j["mappings_at_start"] = r.mappings_at_start;
  j["mappings_at_end"] = r.mappings_at_end;
  if (r.soak) j["soak"] = soak_json(r);
  if (!r.first_failure.empty()) j["first_failure"] = r.first_failure;
  if (r.interrupted) j["interrupted_by"] = std::string("SIG") + sigabbrev_np(g_signal.load());
  return j;
}

void print_report(const Tool& tool, const StressReport& r, bool passed) {
  const auto& s = tool.cfg.stress;
  std::string out = fmt::format("stress on {} backend, {} threads, seed {}, mix {} (buffers:blocks:maps), {:.2f} s: "
                                "{} ops, {} failures\n",
                                r.backend, s.threads, s.seed, s.mix, r.seconds, r.ops, r.failures);
  out += fmt::format("  {:<10}{:>12}{:>12}{:>11}{:>11}{:>11}\n", "kind", "ops", "ops/s", "p50", "p99", "max");
  for (size_t k = 0; k < kStressKinds; ++k) {
    const auto& kr = r.kinds[k];
    out += fmt::format("  {:<10}{:>12}{:>12.0f}{:>11}{:>11}{:>11}\n", kStressKindNames[k], kr.ops,
                       per_second(kr.ops, r.seconds), latency_text(kr.latency.quantile_ns(0.5)),
                       latency_text(kr.latency.quantile_ns(0.99)), latency_text(kr.latency.max_ns));
  }
  out += fmt::format("  {:<10}{:>12}{:>12.0f}\n", "all", r.ops, per_second(r.ops, r.seconds));
  auto row = [&out](const char* what, const std::string& value) { out += fmt::format("  {:<42}{}\n", what, value); };
  row("device checks through the IOMMU:", std::to_string(r.device_checks));
  row("deliberate misuse refused (counted):", std::to_string(r.misuse_checks));
  row("validation failures:", std::to_string(r.validation_failures));
  row("arena flushes:", std::to_string(r.flushes));
  row("order fallbacks:", std::to_string(r.order_fallbacks));
  row("allocations refused for lack of memory:", std::to_string(r.alloc_errors));
  row("blocks freed by another thread:", std::to_string(r.cross_thread_frees));
  row("peak bytes live:", bytes_text(r.peak_live_bytes));
  row("peak RSS (process):", bytes_text(r.peak_rss_bytes));
  row("mappings left after freeing everything:", std::to_string(r.mappings_at_end));
  if (r.soak) {
    const auto& v = r.soak_verdict;
    row("soak (RSS, mappings, fds after warm-up):",
        v.flat ? fmt::format("flat over {} samples (last third max: RSS {}, {} mappings, {} fds)", v.samples,
                             bytes_text(v.last_max.rss_bytes), v.last_max.mappings, v.last_max.fds)
               : "NOT flat: " + v.why);
  }
  if (!r.first_failure.empty()) row("first failure:", r.first_failure);
  if (r.interrupted) row("interrupted:", std::string("by SIG") + sigabbrev_np(g_signal.load()) + " before the time was up");
  row("result:", passed ? "PASS (every check passed)" : "FAIL");
  std::cout << out;
}

int run(Tool& tool, bool quiet, bool soak) {
  if (!prepare(tool)) return kExitUsage;
  catch_interrupts();
  auto ctx = core::Context::create(tool.cfg);
  if (!ctx) return report_error(tool, ctx.error().what());
  const bool tty = ::isatty(STDERR_FILENO) == 1;
  StressOptions opts;
  opts.stop = &g_interrupt;
  if (!quiet) opts.progress = progress_printer(tty);
  opts.progress_every = tty ? std::chrono::milliseconds(250) : std::chrono::seconds(1);
  opts.soak = soak;
  auto r = run_stress(**ctx, tool.cfg.stress, opts);
  if (tty && !quiet) std::cerr << "\r\x1b[K" << std::flush;
  if (!r) return report_error(tool, "stress: " + r.error().what());
  const bool passed = r->failures == 0 && !r->interrupted;
  if (tool.json) emit_json(report_json(tool, **ctx, *r, passed));
  else print_report(tool, *r, passed);
  return passed ? 0 : kExitFailed;
}

}  // namespace

// The run's own flags. Each overrides its stress.* setting (from the file or
// --stress.*); they are applied in the callback, after the config file.
struct StressFlags {
  std::optional<uint32_t> threads;
  std::optional<double> seconds;
  std::optional<uint64_t> seed, max_bytes, ops;
  std::optional<std::string> mix;
};

template <class T>
void add_flag(CLI::App* sub, const std::string& name, const std::string& help, std::optional<T>& out) {
  base::add_parsed_option<T>(*sub, name, name, help, [&out](T v) { out = v; });
}

void add_stress(CLI::App& app, Tool& tool) {
  auto* sub = app.add_subcommand("stress", "stress-test allocation on the configured backend");
  static StressFlags flags;
  static bool quiet = false, soak = false;
  sub->add_flag("--quiet", quiet, "no progress lines on stderr");
  sub->add_flag("--soak", soak,
                "sample RSS, mappings and open fds; fail unless they stay flat after warm-up (run 10 s or more)");
  sub->add_option_function<std::string>(
      "--mix", [](const std::string& m) { flags.mix = m; },
      "weights buffers:blocks:maps of the operations, e.g. 0:1:0 for pool blocks alone (default stress.mix)");
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
      "  dmakit stress --mix 0:1:0 --ops 100000 --seed 3   pool blocks alone; the same counts every time\n"
      "  dmakit stress --soak --seconds 600                memory, mappings and fds must stay flat\n"
      "Exit status: 0 every check passed, 1 a check failed or the run was interrupted, 2 bad usage.");
  sub->callback([&tool] {
    if (flags.threads) tool.cfg.stress.threads = *flags.threads;
    if (flags.seconds) tool.cfg.stress.seconds = *flags.seconds;
    if (flags.seed) tool.cfg.stress.seed = *flags.seed;
    if (flags.max_bytes) tool.cfg.stress.max_bytes = *flags.max_bytes;
    if (flags.mix) tool.cfg.stress.mix = *flags.mix;
    if (flags.ops) {
      tool.cfg.stress.ops = *flags.ops;
      // An operation count alone runs until it is reached (within a day).
      if (!flags.seconds) tool.cfg.stress.seconds = 86400;
    }
    tool.exit_code = run(tool, quiet, soak);
  });
}

}  // namespace dmakit::tool
