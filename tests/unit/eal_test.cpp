// The EAL owner: both memory modes, reuse of an application's EAL, and the
// log bridge. rte_eal_init runs once per process, so each case runs in a
// forked child (gtest death-test machinery) and reports through its exit code.
#include <gtest/gtest.h>
#include <rte_eal.h>
#include <rte_log.h>
#include <rte_malloc.h>
#include <spdlog/sinks/ostream_sink.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "base/eal.hpp"
#include "core/context.hpp"
#include "base/log.hpp"
#include "hugepage_reservation.hpp"

using namespace dmakit;

namespace {

// Exit codes of the children: 0 = all checks passed, other = which check failed.
// exit(), not _Exit(): the EAL owner's atexit hook removes its runtime directory.
[[noreturn]] void finish(int code) { std::exit(code); }

[[noreturn]] void child_StartsWithoutHugepages() {
  base::EalSettings s;
  s.mode = "nohuge";
  s.memory_mb = 64;
  auto info = base::ensure_eal(s);
  if (!info) finish(1);
  if ((*info)->hugepages || !(*info)->started_by_dmakit) finish(2);
  if (rte_eal_has_hugepages() != 0) finish(3);
  void* p = rte_malloc(nullptr, 1 << 20, 4096);  // the memory is really there
  if (p == nullptr) finish(4);
  rte_free(p);
  auto again = base::ensure_eal(s);  // second call: same EAL, no re-init
  if (!again || *again != *info) finish(5);
  finish(0);
}

[[noreturn]] void child_StartsOnHugepagesWhenReserved() {
  base::EalSettings s;  // mode auto: must see the reservation
  auto info = base::ensure_eal(s);
  if (!info) finish(1);
  if (!(*info)->hugepages) finish(2);
  if ((*info)->reason.find("running on hugepages") == std::string::npos) finish(3);
  if (rte_eal_has_hugepages() == 0) finish(4);
  void* p = rte_malloc(nullptr, 4 << 20, 2 << 20);
  if (p == nullptr) finish(5);
  rte_free(p);
  finish(0);
}

[[noreturn]] void child_ReusesTheApplicationsEal() {
  std::string prefix = "--file-prefix=dmakit-app-" + std::to_string(::getpid());
  std::vector<std::string> args = {"app", "--no-huge", "--no-shconf", "-m", "64", "--no-pci",
                                   "-l", "0", "--no-telemetry", prefix, "--log-level=lib.eal:error"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  if (rte_eal_init(static_cast<int>(argv.size()), argv.data()) < 0) finish(1);
  FILE* app_stream = rte_log_get_stream();
  auto info = base::ensure_eal(base::EalSettings{});
  if (!info) finish(2);
  if ((*info)->started_by_dmakit) finish(3);
  if ((*info)->reason.find("already started by the application") == std::string::npos) finish(4);
  if (rte_log_get_stream() != app_stream) finish(5);  // the application's log stays where it was
  std::string dir = rte_eal_get_runtime_dir();
  rte_eal_cleanup();
  std::filesystem::remove_all(dir);  // the application's EAL: the application cleans up
  finish(0);
}

cpu_set_t affinity() {
  cpu_set_t set;
  CPU_ZERO(&set);
  pthread_getaffinity_np(pthread_self(), sizeof set, &set);
  return set;
}

[[noreturn]] void child_LeavesTheCallersCpuAffinityAlone() {
  const cpu_set_t before = affinity();
  if (CPU_COUNT(&before) < 2) finish(10);  // nothing to tell apart on one CPU
  base::EalSettings s;
  s.mode = "nohuge";
  s.memory_mb = 64;
  if (!base::ensure_eal(s)) finish(1);
  cpu_set_t after = affinity();
  if (!CPU_EQUAL(&before, &after)) finish(2);
  // A thread the application starts afterwards may run on every CPU it could before.
  cpu_set_t seen;
  std::thread([&] { seen = affinity(); }).join();
  if (!CPU_EQUAL(&before, &seen)) finish(3);
  finish(0);
}

// The same through the whole library: a Context (EAL, domain, arena,
// buffer allocator with its threads, pools) leaves the caller's mask alone.
[[noreturn]] void child_ThreadsAfterContextCreateMayRunOnEveryCpu() {
  const cpu_set_t before = affinity();
  if (CPU_COUNT(&before) < 2) finish(10);
  core::Config cfg;
  cfg.eal.mode = "nohuge";
  cfg.eal.memory_mb = 64;
  cfg.iommu.backend = "sim";
  auto ctx = core::Context::create(cfg);
  if (!ctx) finish(1);
  cpu_set_t after = affinity();
  if (!CPU_EQUAL(&before, &after)) finish(2);
  cpu_set_t seen;
  std::thread([&] { seen = affinity(); }).join();
  if (!CPU_EQUAL(&before, &seen)) finish(3);
  ctx->reset();
  finish(0);
}

[[noreturn]] void child_EalMessagesReachTheDmakitLogger() {
  auto captured = std::make_shared<std::ostringstream>();
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(*captured);
  base::log().sinks().push_back(sink);
  base::log().set_level(spdlog::level::trace);
  base::EalSettings s;
  s.mode = "nohuge";
  s.memory_mb = 64;
  if (!base::ensure_eal(s)) finish(1);
  // Start-up lines arrive at debug (EAL INFO/NOTICE are quiet by default).
  if (captured->str().find("eal: ") == std::string::npos) finish(2);
  // An EAL error arrives at error level.
  rte_log(RTE_LOG_ERR, RTE_LOGTYPE_EAL, "EAL: synthetic failure 42\n");
  const std::string text = captured->str();
  auto at = text.find("synthetic failure 42");
  if (at == std::string::npos) finish(3);
  if (text.rfind("[error]", at) == std::string::npos) finish(4);
  // At the default level (warn) EAL's info lines are filtered out.
  captured->str("");
  base::log().set_level(spdlog::level::warn);
  rte_log(RTE_LOG_INFO, RTE_LOGTYPE_EAL, "EAL: chatty detail\n");
  if (captured->str().find("chatty detail") != std::string::npos) finish(5);
  finish(0);
}

}  // namespace

TEST(EalPlan, AutoPicksHugepagesOnlyWhenOneCanBeHad) {
  base::EalSettings s;
  base::HugepageCounts none;
  auto plan = base::plan_eal(s, none);
  ASSERT_TRUE(plan);
  EXPECT_FALSE(plan->hugepages);
  EXPECT_NE(plan->reason.find("no 2 MiB hugepages free"), std::string::npos) << plan->reason;
  EXPECT_NE(plan->reason.find("running on 4 KiB pages"), std::string::npos);
  auto has = [&](const std::vector<std::string>& args, const std::string& a) {
    return std::find(args.begin(), args.end(), a) != args.end();
  };
  EXPECT_TRUE(has(plan->args, "--no-huge"));
  EXPECT_TRUE(has(plan->args, "--no-shconf"));
  EXPECT_TRUE(has(plan->args, "512"));
  EXPECT_FALSE(has(plan->args, "--in-memory"));
  EXPECT_TRUE(has(plan->args, "dmakit-" + std::to_string(::getpid()))) << "unique file prefix per process";

  base::HugepageCounts some;
  some.overcommit = 8;
  plan = base::plan_eal(s, some);
  ASSERT_TRUE(plan);
  EXPECT_TRUE(plan->hugepages);
  EXPECT_TRUE(has(plan->args, "--in-memory"));
  EXPECT_TRUE(has(plan->args, "--iova-mode=va"));
  EXPECT_TRUE(has(plan->args, "--no-pci"));
  EXPECT_FALSE(has(plan->args, "--no-huge"));
}

TEST(EalPlan, HugeModeWithoutPagesIsAClearError) {
  base::EalSettings s;
  s.mode = "huge";
  auto plan = base::plan_eal(s, base::HugepageCounts{});
  ASSERT_FALSE(plan);
  EXPECT_EQ(plan.error().code, Errc::no_memory);
  EXPECT_NE(plan.error().message.find("/proc/sys/vm/nr_hugepages"), std::string::npos);
  s.mode = "turbo";
  EXPECT_FALSE(base::plan_eal(s, base::HugepageCounts{}));
}

TEST(EalOwner, StartsWithoutHugepages) {
  EXPECT_EXIT(child_StartsWithoutHugepages(), ::testing::ExitedWithCode(0), "");
}

TEST(EalOwner, StartsOnHugepagesWhenReserved) {
  ASSERT_EQ(::geteuid(), 0u) << "this test reserves hugepages and must run as root";
  test::HugepageReservation reserve(16);
  ASSERT_TRUE(reserve.ok()) << "could not set " << test::HugepageReservation::kOvercommit;
  EXPECT_EXIT(child_StartsOnHugepagesWhenReserved(), ::testing::ExitedWithCode(0), "");
}

TEST(EalOwner, ReusesTheApplicationsEal) {
  EXPECT_EXIT(child_ReusesTheApplicationsEal(), ::testing::ExitedWithCode(0), "");
}

TEST(EalOwner, LeavesTheCallersCpuAffinityAlone) {
  EXPECT_EXIT(child_LeavesTheCallersCpuAffinityAlone(), ::testing::ExitedWithCode(0), "");
}

TEST(EalOwner, ThreadsAfterContextCreateMayRunOnEveryCpu) {
  EXPECT_EXIT(child_ThreadsAfterContextCreateMayRunOnEveryCpu(), ::testing::ExitedWithCode(0), "");
}

TEST(EalLog, EalMessagesReachTheDmakitLogger) {
  EXPECT_EXIT(child_EalMessagesReachTheDmakitLogger(), ::testing::ExitedWithCode(0), "");
}
