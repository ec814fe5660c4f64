// The EAL runtime directory: dmakit removes only what it created, never
// recursively, never outside DPDK's runtime base; stale directories of dead
// dmakit processes are reclaimed, others' never touched. Also the tool's
// handling of SIGINT during a stress run.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <thread>

#include "base/runtime_dir.hpp"
#include "tool_run.hpp"

using namespace dmakit;
namespace fs = std::filesystem;

namespace {

// A pid that belonged to a process that has exited and been reaped.
pid_t dead_pid() {
  pid_t pid = ::fork();
  if (pid == 0) ::_exit(0);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return pid;
}

struct TempBase {
  fs::path dir = fs::temp_directory_path() / ("dmakit-rtdir-" + std::to_string(::getpid()));
  TempBase() {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~TempBase() { fs::remove_all(dir); }
  fs::path make(const std::string& name) const {
    fs::create_directories(dir / name);
    return dir / name;
  }
};

void write_file(const fs::path& p, const std::string& text) { std::ofstream(p) << text; }

using dmakit::test::run_tool;
using dmakit::test::tool_path;
auto run(const std::string& args) { return run_tool(args); }

}  // namespace

TEST(FilePrefix, OnlyPlainNamesAreAccepted) {
  for (const char* bad : {"../x", "a/b", "/abs", "..", ".", "", "../../../some/dir", "x y", "a\\b"}) {
    auto st = base::check_file_prefix(bad);
    ASSERT_FALSE(st) << "'" << bad << "' was accepted";
    EXPECT_EQ(st.error().code, Errc::invalid_argument);
    EXPECT_NE(st.error().message.find("eal.file_prefix"), std::string::npos) << st.error().message;
  }
  EXPECT_FALSE(base::check_file_prefix(std::string(65, 'a')));
  for (const char* good : {"dmakit-42", "my_app.2", "A-b_c.d", "...x"}) EXPECT_TRUE(base::check_file_prefix(good)) << good;
}

TEST(RuntimeDir, AnotherProcesssDirectoryIsRefusedAndUntouched) {
  TempBase base;
  auto other = base.make("otherapp");
  write_file(other / "config", "theirs");
  auto r = base::prepare_runtime_dir(base.dir.string(), "otherapp");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::exists);
  EXPECT_NE(r.error().message.find((base.dir / "otherapp").string()), std::string::npos) << r.error().message;
  EXPECT_TRUE(fs::exists(other / "config"));
  // A bad prefix is refused before anything is looked at.
  auto bad = base::prepare_runtime_dir(base.dir.string(), "../otherapp");
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::invalid_argument);
}

TEST(RuntimeDir, StaleDirectoriesOfDeadDmakitProcessesAreReclaimedOthersKept) {
  TempBase base;
  const pid_t gone = dead_pid();
  // Left by a dmakit killed before it wrote its owner file: empty, pid free.
  auto killed_early = base.make("dmakit-" + std::to_string(gone));
  // Left by a dmakit with a custom prefix: its owner file names a dead process.
  auto custom = base.make("nightly");
  write_file(custom / base::kRuntimeOwnerFile, "pid " + std::to_string(gone) + " start 1\n");
  // A live process's default directory (pid 1 always runs).
  auto live = base.make("dmakit-1");
  // Owner file of a live pid but another start time: the pid was reused, the owner is dead.
  auto reused = base.make("reused");
  write_file(reused / base::kRuntimeOwnerFile, "pid " + std::to_string(::getpid()) + " start 1\n");
  // A dead dmakit's directory that holds a file dmakit never writes: kept.
  auto foreign_file = base.make("dmakit-" + std::to_string(gone) + "0");
  write_file(foreign_file / "precious", "x");
  // Not dmakit's at all.
  auto stranger = base.make("someapp");

  auto r = base::prepare_runtime_dir(base.dir.string(), "dmakit-test");
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_EQ(*r, 3u);
  EXPECT_FALSE(fs::exists(killed_early));
  EXPECT_FALSE(fs::exists(custom));
  EXPECT_FALSE(fs::exists(reused));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_TRUE(fs::exists(foreign_file / "precious"));
  EXPECT_TRUE(fs::exists(stranger));
}

TEST(RuntimeDir, ReleaseRemovesOnlyTheOwnersEmptyDirectory) {
  TempBase base;
  auto mine = base.make("mine");
  ASSERT_TRUE(base::claim_runtime_dir(mine.string()));
  EXPECT_FALSE(base::claim_runtime_dir(mine.string())) << "a second claim must not overwrite the owner";
  // A forked child inherits exit hooks but not the directory.
  pid_t child = ::fork();
  if (child == 0) ::_exit(base::release_runtime_dir(mine.string()) ? 1 : 0);
  int status = 0;
  ::waitpid(child, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the child removed its parent's directory";
  EXPECT_TRUE(fs::exists(mine));
  // Something dmakit did not create inside: the directory stays.
  write_file(mine / "socket", "");
  EXPECT_FALSE(base::release_runtime_dir(mine.string()));
  EXPECT_TRUE(fs::exists(mine / "socket"));
  // Not owned (its owner file is gone now): nothing happens.
  fs::remove(mine / "socket");
  EXPECT_FALSE(base::release_runtime_dir(mine.string()));
  EXPECT_TRUE(fs::exists(mine));
  // Owned and empty: removed.
  ASSERT_TRUE(base::claim_runtime_dir(mine.string()));
  EXPECT_TRUE(base::release_runtime_dir(mine.string()));
  EXPECT_FALSE(fs::exists(mine));
}

// The reported bug: a prefix that climbs out of /var/run/dpdk made the tool
// remove the directory it named.
TEST(RuntimeDirTool, PrefixOutsideTheRuntimeBaseIsRefusedAndNothingRemoved) {
  ASSERT_EQ(::geteuid(), 0u) << "the runtime base is /var/run/dpdk only for root";
  fs::path victim = fs::temp_directory_path() / ("dmakit-victim-" + std::to_string(::getpid()));
  fs::create_directories(victim);
  write_file(victim / "keep", "data");
  const std::string climb = "../../.." + victim.string();
  for (const std::string& prefix : {climb, std::string("a/b")}) {
    auto r = run("stress --stress.seconds 0.1 --eal.file_prefix " + prefix);
    EXPECT_EQ(r.code, 2) << r.out;
    EXPECT_NE(r.out.find("eal.file_prefix"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find(prefix), std::string::npos) << r.out;
  }
  EXPECT_TRUE(fs::exists(victim / "keep"));
  fs::remove_all(victim);
}

TEST(RuntimeDirTool, AnotherApplicationsPrefixIsRefusedAndUntouched) {
  ASSERT_EQ(::geteuid(), 0u) << "the runtime base is /var/run/dpdk only for root";
  const std::string prefix = "otherapp-" + std::to_string(::getpid());
  fs::path theirs = fs::path(base::eal_runtime_base()) / prefix;
  fs::create_directories(theirs);
  write_file(theirs / "config", "theirs");
  auto r = run("stress --stress.seconds 0.1 --eal.file_prefix " + prefix);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find(theirs.string() + " already exists"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(theirs / "config"));
  fs::remove_all(theirs);
}

TEST(RuntimeDirTool, ARunReclaimsADeadRunsDirectoryAndLeavesNoneOfItsOwn) {
  ASSERT_EQ(::geteuid(), 0u) << "the runtime base is /var/run/dpdk only for root";
  fs::path stale = fs::path(base::eal_runtime_base()) / ("dmakit-" + std::to_string(dead_pid()));
  fs::create_directories(stale);
  const std::string prefix = "dmakit-reclaim-" + std::to_string(::getpid());
  // nohuge: other tests raise and lower the hugepage pool while this runs.
  auto r = run("stress --stress.seconds 0.2 --eal.mode nohuge --eal.file_prefix " + prefix);
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_FALSE(fs::exists(fs::path(base::eal_runtime_base()) / prefix));
}

TEST(RuntimeDirTool, SigintStopsStressWhichReportsFreesAndRemovesItsDirectory) {
  ASSERT_EQ(::geteuid(), 0u) << "the runtime base is /var/run/dpdk only for root";
  const std::string prefix = "dmakit-sigint-" + std::to_string(::getpid());
  const fs::path dir = fs::path(base::eal_runtime_base()) / prefix;
  const fs::path out = fs::temp_directory_path() / (prefix + ".out");
  pid_t child = ::fork();
  if (child == 0) {
    std::FILE* f = std::freopen(out.c_str(), "w", stdout);
    if (f == nullptr) ::_exit(99);
    // nohuge: other tests raise and lower the hugepage pool while this runs.
    ::execl(tool_path().c_str(), "dmakit", "stress", "--stress.seconds", "60", "--eal.mode", "nohuge",
            "--eal.file_prefix", prefix.c_str(), static_cast<char*>(nullptr));
    ::_exit(98);
  }
  // The owner file appears once the EAL is up and the run is under way.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  int early = 0;
  while (!fs::exists(dir / base::kRuntimeOwnerFile) && std::chrono::steady_clock::now() < give_up) {
    ASSERT_EQ(::waitpid(child, &early, WNOHANG), 0) << "the stress run ended before it started (status " << early
                                                    << "; its errors are above)";
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(fs::exists(dir / base::kRuntimeOwnerFile)) << "the stress run never started";
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ::kill(child, SIGINT);
  int status = 0;
  ::waitpid(child, &status, 0);
  std::ifstream in(out);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  fs::remove(out);
  ASSERT_TRUE(WIFEXITED(status)) << "killed by the signal instead of handling it";
  EXPECT_EQ(WEXITSTATUS(status), 1) << text;
  EXPECT_TRUE(std::regex_search(text, std::regex("\n  interrupted: +by SIGINT before the time was up\n"))) << text;
  EXPECT_NE(text.find(", 0 failures"), std::string::npos) << text;
  EXPECT_TRUE(std::regex_search(text, std::regex("\n  mappings left after freeing everything: +0\n"))) << text;
  EXPECT_TRUE(std::regex_search(text, std::regex("\n  result: +FAIL\n"))) << text;
  EXPECT_FALSE(fs::exists(dir)) << "the run left its runtime directory";
}
