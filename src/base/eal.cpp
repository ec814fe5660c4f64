#include "base/eal.hpp"

#include <pthread.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_lcore.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>

#include "base/fault_inject.hpp"
#include "base/log.hpp"
#include "base/runtime_dir.hpp"

namespace dmakit::base {

uint64_t HugepageCounts::available() const {
  uint64_t from_pool = free > reserved ? free - reserved : 0;
  uint64_t from_overcommit = overcommit > surplus ? overcommit - surplus : 0;
  return from_pool + from_overcommit;
}

namespace {

uint64_t read_u64(const std::filesystem::path& p) {
  std::ifstream in(p);
  uint64_t v = 0;
  in >> v;
  return in ? v : 0;
}

std::mutex g_mu;
EalInfo g_info;
std::atomic<const EalInfo*> g_ready{nullptr};

// The runtime directory this process's EAL made, or "" (set once, under g_mu).
std::string g_runtime_dir;

void release_at_exit() noexcept {
  try {
    if (!g_runtime_dir.empty()) release_runtime_dir(g_runtime_dir);
  } catch (...) {  // nothing may escape an exit hook
  }
}

// The EAL's main lcore: the first CPU this thread may run on (the EAL
// refuses a CPU outside the process's mask).
unsigned main_cpu() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (pthread_getaffinity_np(pthread_self(), sizeof set, &set) == 0)
    for (unsigned c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) return c;
  return 0;
}

// The application's EAL, detected before any EAL call, so that its log
// stream is never replaced: lcores exist only after a successful init.
bool eal_already_running() { return rte_lcore_count() > 0; }

// The host application owns the EAL: dmakit uses its memory as it is.
void adopt_application_eal(EalInfo& info) {
  info.started_by_dmakit = false;
  info.hugepages = rte_eal_has_hugepages() != 0;
  info.file_prefix.clear();
  info.args.clear();
  info.reason = fmt::format("EAL already started by the application ({})",
                            info.hugepages ? "hugepages" : "4 KiB pages");
}

// Under g_mu: makes info the process's EAL state.
const EalInfo* publish(EalInfo info) {
  log().info("EAL: {}", info.reason);
  g_info = std::move(info);
  g_ready.store(&g_info, std::memory_order_release);
  return &g_info;
}

}  // namespace

HugepageCounts read_hugepages(uint64_t page_kb) {
  std::filesystem::path dir = fmt::format("/sys/kernel/mm/hugepages/hugepages-{}kB", page_kb);
  HugepageCounts c;
  c.total = read_u64(dir / "nr_hugepages");
  c.free = read_u64(dir / "free_hugepages");
  c.reserved = read_u64(dir / "resv_hugepages");
  c.surplus = read_u64(dir / "surplus_hugepages");
  c.overcommit = read_u64(dir / "nr_overcommit_hugepages");
  return c;
}

Result<EalInfo> plan_eal(const EalSettings& s, const HugepageCounts& huge) {
  EalInfo info;
  info.started_by_dmakit = true;
  info.file_prefix = s.file_prefix.empty() ? fmt::format("dmakit-{}", ::getpid()) : s.file_prefix;
  DMAKIT_TRY(check_file_prefix(info.file_prefix));
  if (s.mode == "huge") {
    if (huge.available() == 0)
      return fail(Errc::no_memory,
                  "eal.mode is 'huge' but no 2 MiB hugepage is free (nr_hugepages={}, free={}, "
                  "nr_overcommit_hugepages={}); reserve some in /proc/sys/vm/nr_hugepages",
                  huge.total, huge.free, huge.overcommit);
    info.hugepages = true;
    info.reason = fmt::format("eal.mode=huge: {} 2 MiB hugepages available", huge.available());
  } else if (s.mode == "nohuge") {
    info.hugepages = false;
    info.reason = "eal.mode=nohuge: running on 4 KiB pages";
  } else if (s.mode == "auto") {
    info.hugepages = huge.available() > 0;
    info.reason = info.hugepages
                      ? fmt::format("{} 2 MiB hugepages available: running on hugepages", huge.available())
                      : fmt::format("no 2 MiB hugepages free (nr_hugepages={}, nr_overcommit_hugepages={}): "
                                    "running on 4 KiB pages",
                                    huge.total, huge.overcommit);
  } else {
    return fail(Errc::invalid_argument, "key 'eal.mode': '{}' is not auto, huge or nohuge", s.mode);
  }

  // EAL is quiet unless dmakit's logger asks for detail; its lines are routed into it anyway.
  bool verbose = log().should_log(spdlog::level::debug);
  info.args = {"dmakit", "-l", std::to_string(main_cpu()), "--no-telemetry", "--file-prefix", info.file_prefix,
               verbose ? "--log-level=lib.eal:info" : "--log-level=lib.eal:warning"};
  if (info.hugepages) {
    // memfd-backed pages need no hugetlbfs mount; IOVA=VA because dmakit picks IOVAs itself.
    for (const char* a : {"--in-memory", "--iova-mode=va", "--no-pci"}) info.args.emplace_back(a);
  } else {
    for (const char* a : {"--no-huge", "--no-shconf", "--no-pci", "-m"}) info.args.emplace_back(a);
    info.args.push_back(std::to_string(s.memory_mb));
  }
  std::istringstream extra(s.extra_args);
  for (std::string a; extra >> a;) info.args.push_back(a);
  return info;
}

Status check_eal_extra_args(const std::string& extra_args) {
  // Options and whether they take a value (as "--opt=v" or "--opt v").
  static constexpr std::pair<std::string_view, bool> kAllowed[] = {
      {"--log-level", true},       {"--iova-mode", true},     {"--base-virtaddr", true},
      {"--socket-mem", true},      {"--socket-limit", true},  {"--huge-dir", true},
      {"--legacy-mem", false},     {"--single-file-segments", false}, {"--match-allocations", false},
      {"--huge-unlink", false},    {"--no-shconf", false},    {"--in-memory", false},
      {"--vfio-intr", true},       {"--vfio-vf-token", true}, {"--no-telemetry", false},
      {"--syslog", true},          {"--log-color", false},
  };
  std::istringstream in(extra_args);
  for (std::string a; in >> a;) {
    const std::string name = a.substr(0, a.find('='));
    const auto* hit = std::find_if(std::begin(kAllowed), std::end(kAllowed),
                                   [&](const auto& o) { return o.first == name; });
    if (hit == std::end(kAllowed)) {
      std::string allowed;
      for (const auto& o : kAllowed) allowed += (allowed.empty() ? "" : " ") + std::string(o.first);
      return fail(Errc::invalid_argument,
                  "key 'eal.extra_args': '{}' is not passed to the EAL (dmakit sets the cores, file prefix, memory "
                  "mode and PCI scan itself); allowed: {}",
                  a, allowed);
    }
    if (hit->second && a.find('=') == std::string::npos) {
      std::string value;
      if (!(in >> value) || value.starts_with("-"))
        return fail(Errc::invalid_argument, "key 'eal.extra_args': {} needs a value", name);
    } else if (!hit->second && a.find('=') != std::string::npos) {
      return fail(Errc::invalid_argument, "key 'eal.extra_args': {} takes no value", name);
    }
  }
  return ok();
}

Result<const EalInfo*> ensure_eal(const EalSettings& s) {
  if (const EalInfo* ready = g_ready.load(std::memory_order_acquire)) return ready;
  std::lock_guard lock(g_mu);
  if (const EalInfo* ready = g_ready.load(std::memory_order_relaxed)) return ready;

  EalInfo info = DMAKIT_TRY(plan_eal(s, read_hugepages()));
  if (eal_already_running()) {
    // Its memory, its log stream, its runtime directory, all as they are.
    adopt_application_eal(info);
    return publish(std::move(info));
  }
  DMAKIT_TRY(route_dpdk_log());
  // Only a directory this process is about to create may be removed later.
  const std::string runtime_base = eal_runtime_base();
  DMAKIT_TRY(prepare_runtime_dir(runtime_base, info.file_prefix));

  std::vector<char*> argv;
  for (auto& a : info.args) argv.push_back(a.data());
  argv.push_back(nullptr);
  // rte_eal_init pins the calling thread to the main lcore, and every thread
  // it creates later would inherit that; the application's mask is put back.
  cpu_set_t mask;
  const bool have_mask = pthread_getaffinity_np(pthread_self(), sizeof mask, &mask) == 0;
  rte_errno = 0;
  int rc = -1;
  if (const int err = fault::inject(fault::Point::eal_init))
    rte_errno = err;
  else
    rc = rte_eal_init(static_cast<int>(argv.size() - 1), argv.data());
  const int init_errno = rte_errno;
  if (have_mask && pthread_setaffinity_np(pthread_self(), sizeof mask, &mask) != 0)
    log().warn("could not restore the calling thread's CPU affinity after rte_eal_init");
  rte_errno = init_errno;
  if (rc < 0 && rte_errno == EALREADY) {
    adopt_application_eal(info);
  } else if (rc < 0) {
    int err = rte_errno;
    std::string joined;
    for (const auto& a : info.args) joined += (joined.empty() ? "" : " ") + a;
    // prepare_runtime_dir saw no such directory: an empty one is this attempt's.
    ::rmdir((runtime_base + "/" + info.file_prefix).c_str());
    return fail_errno(err, "rte_eal_init({}) failed", joined);
  } else {
    g_runtime_dir = rte_eal_get_runtime_dir();
    if (auto st = claim_runtime_dir(g_runtime_dir); !st)
      log().warn("{}; the directory stays after exit", st.error().what());
    std::atexit(release_at_exit);
  }
  return publish(std::move(info));
}

const EalInfo* eal_info() { return g_ready.load(std::memory_order_acquire); }

}  // namespace dmakit::base
