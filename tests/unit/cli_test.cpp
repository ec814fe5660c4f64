// The dmakit command as a user meets it: help, version, config errors.
#include <gtest/gtest.h>
#include <pty.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "tool_run.hpp"

namespace {

using dmakit::test::run_tool;
using nlohmann::json;
auto run(const std::string& args) { return run_tool(args); }

// `dmakit ARGS` whose stdout must be exactly one JSON object (and a line
// end); the object, or a test failure naming what was printed.
struct JsonRun {
  int code = -1;
  json j;
  std::string err;
};
JsonRun run_json(const std::string& args) {
  auto r = dmakit::test::run_tool_split(args);
  JsonRun out{r.code, json(), r.err};
  EXPECT_FALSE(r.out.empty()) << args << ": nothing on stdout; stderr: " << r.err;
  if (r.out.empty()) return out;
  EXPECT_EQ(r.out.back(), '\n') << args;
  out.j = json::parse(r.out, nullptr, false);
  EXPECT_FALSE(out.j.is_discarded()) << args << ": stdout is not one JSON object: " << r.out;
  EXPECT_TRUE(out.j.is_object()) << args << ": " << r.out;
  return out;
}

}  // namespace

TEST(Cli, HelpListsSubcommands) {
  auto r = run("--help");
  EXPECT_EQ(r.code, 0);
  for (const char* sub : {"info", "bind", "unbind", "stress", "bench"})
    EXPECT_NE(r.out.find(std::string("  ") + sub), std::string::npos) << sub << " missing from:\n" << r.out;
}

TEST(Cli, Version) {
  auto r = run("--version");
  EXPECT_EQ(r.code, 0);
  EXPECT_EQ(r.out.rfind("dmakit ", 0), 0u) << r.out;
}

TEST(Cli, MalformedConfigIsOneLineNamingFileAndKeyExit2) {
  auto path = std::filesystem::temp_directory_path() / ("dmakit-cli-" + std::to_string(::getpid()) + ".toml");
  std::ofstream(path) << "[arena]\nshards = many\n";
  auto r = run("--config " + path.string() + " info");
  std::filesystem::remove(path);
  EXPECT_EQ(r.code, 2);
  EXPECT_EQ(r.out, "dmakit: " + path.string() + ": key 'arena.shards': 'many' is not a decimal number from 0 to 4294967295\n");
}

TEST(Cli, MissingConfigFileExit2) {
  auto r = run("--config /nonexistent/dmakit.toml info");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("/nonexistent/dmakit.toml"), std::string::npos) << r.out;
}

TEST(Cli, BadFlagValueExit2) {
  auto r = run("--arena.shards 5 info");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("arena.shards"), std::string::npos) << r.out;
}

TEST(Cli, InfoJsonIsOneObject) {
  auto r = run_json("info --json");
  EXPECT_EQ(r.code, 0) << r.j;
  EXPECT_TRUE(r.j["backend"] == "sim" || r.j["backend"] == "vfio") << r.j;
  EXPECT_TRUE(r.j["backend_reason"].is_string()) << r.j;
  EXPECT_TRUE(r.j["vfio"].is_boolean()) << r.j;
  EXPECT_TRUE(r.j["hugepages_2m"]["total"].is_number_unsigned()) << r.j;
  EXPECT_TRUE(r.j["devices"].is_array() && r.j["devices"].empty()) << r.j;
}

// Under --json every error is the one object {"error", "exit_code"} on
// stdout with the exit code: flag and config errors found while parsing
// (whether --json comes before or after them), and an EAL that cannot start.
TEST(Cli, JsonErrorsAreOneObjectWithTheExitCode) {
  struct Case {
    std::string args, expect;
    int code;
  } cases[] = {
      {"--arena.shards 5 info --json", "arena.shards", 2},
      {"--json --arena.shards 5 info", "arena.shards", 2},
      {"info --json --config /nonexistent/dmakit.toml", "/nonexistent/dmakit.toml", 2},
      {"stress --json --threads many", "'many'", 2},
      {"stress --json --mix 1:2", "'1:2'", 2},
      {"info --json nvme0", "nvme0", 2},
      {"bench --json nosuch", "nosuch", 2},
  };
  for (const auto& c : cases) {
    auto r = run_json(c.args);
    EXPECT_EQ(r.code, c.code) << c.args << ": " << r.j;
    ASSERT_TRUE(r.j["error"].is_string()) << c.args << ": " << r.j;
    EXPECT_NE(r.j["error"].get<std::string>().find(c.expect), std::string::npos) << c.args << ": " << r.j;
    EXPECT_EQ(r.j["exit_code"], c.code) << c.args << ": " << r.j;
  }
  // A file prefix whose EAL runtime directory exists belongs to another
  // process: the EAL does not start, a runtime failure (exit 1).
  const std::string prefix = "dmakit-cli-busy-" + std::to_string(::getpid());
  const auto dir = std::filesystem::path("/var/run/dpdk") / prefix;
  std::filesystem::create_directories(dir);
  auto busy = run_json("stress --json --quiet --seconds 0.1 --eal.file_prefix " + prefix);
  std::filesystem::remove(dir);
  EXPECT_EQ(busy.code, 1) << busy.j;
  ASSERT_TRUE(busy.j["error"].is_string()) << busy.j;
  EXPECT_NE(busy.j["error"].get<std::string>().find(prefix), std::string::npos) << busy.j;
  EXPECT_EQ(busy.j["exit_code"], 1) << busy.j;
}

// The README's main job (`dmakit stress`, shortened): the summary table
// with every check, the tool's deliberate misuse counted, not logged as
// warnings about the user's code.
TEST(Cli, StressSummaryIsATableWithoutWarnings) {
  auto r = run("stress --seconds 0.5 --quiet");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(r.out.find("warn"), std::string::npos) << r.out;
  for (const char* row : {"  kind", "  buffers ", "  blocks ", "  maps ", "  all ", "p50", "p99", "max",
                          "validation failures:", "arena flushes:", "order fallbacks:", "peak bytes live:",
                          "peak RSS (process):", "mappings left after freeing everything: ",
                          "result:                                   PASS"})
    EXPECT_NE(r.out.find(row), std::string::npos) << row << " missing: " << r.out;
  const std::string misuse = "deliberate misuse refused (counted):";
  const auto at = r.out.find(misuse);
  ASSERT_NE(at, std::string::npos) << r.out;
  const auto value = r.out.find_first_not_of(' ', at + misuse.size());
  EXPECT_NE(r.out[value], '0') << r.out;
}

// --device names the context's devices (repeatable); info lists each with
// its group and driver, or why it cannot be used (this host has no such
// PCI devices), and a malformed address is a usage error naming it.
TEST(Cli, InfoListsEveryDeviceGivenWithDevice) {
  auto r = run_json("info --json --device 00:1e.0 --device 0000:00:1e.1");
  EXPECT_EQ(r.code, 0) << r.j;
  ASSERT_EQ(r.j["devices"].size(), 2u) << r.j;
  EXPECT_EQ(r.j["devices"][0]["bdf"], "0000:00:1e.0") << r.j;
  EXPECT_EQ(r.j["devices"][1]["bdf"], "0000:00:1e.1") << r.j;
  EXPECT_TRUE(r.j["devices"][0]["error"].is_string()) << r.j;  // no such device on this host
  // Devices as arguments, with --device too.
  auto pos = run_json("info 00:1e.0 --json --device 0000:00:1e.1 0000:00:1e.2");
  EXPECT_EQ(pos.code, 0) << pos.j;
  std::vector<std::string> bdfs;
  for (const auto& d : pos.j["devices"]) bdfs.push_back(d["bdf"]);
  std::sort(bdfs.begin(), bdfs.end());
  EXPECT_EQ(bdfs, (std::vector<std::string>{"0000:00:1e.0", "0000:00:1e.1", "0000:00:1e.2"})) << pos.j;
  auto badpos = run("info 00:1e.0 00:1e.z");
  EXPECT_EQ(badpos.code, 2) << badpos.out;
  EXPECT_NE(badpos.out.find("00:1e.z"), std::string::npos) << badpos.out;
  EXPECT_EQ(std::count(badpos.out.begin(), badpos.out.end(), '\n'), 1) << badpos.out;
  auto text = run("info --device 00:1e.0");
  EXPECT_EQ(text.code, 0) << text.out;
  EXPECT_NE(text.out.find("device:    0000:00:1e.0  "), std::string::npos) << text.out;

  auto bad = run("info --device 00:1e.0 --device nvme0");
  EXPECT_EQ(bad.code, 2) << bad.out;
  EXPECT_NE(bad.out.find("iommu.devices"), std::string::npos) << bad.out;
  EXPECT_NE(bad.out.find("nvme0"), std::string::npos) << bad.out;
  auto twice = run("info --device 00:1e.0 --device 0000:00:1e.0");
  EXPECT_EQ(twice.code, 2) << twice.out;
  EXPECT_NE(twice.out.find("named twice"), std::string::npos) << twice.out;
}

// Usage errors exit 2 with one line naming the input; the EAL never sees
// an argument that would make it print its usage.
TEST(Cli, BadNumbersConfigFilesAndEalArgumentsExit2) {
  struct Case {
    std::string args, expect;
  } cases[] = {
      {"stress --stress.max_bytes -1", "'-1' is not a non-negative decimal number"},
      {"stress --stress.seconds inf", "'inf' is not a finite, non-negative decimal number"},
      {"stress --pool.cache_size 4294967295", "pool.cache_size"},
      {"stress --stress.max_bytes 0", "stress.max_bytes"},
      {"stress --eal.extra_args --help", "'--help' is not passed to the EAL"},
      {"stress --eal.extra_args=--bogus", "'--bogus' is not passed to the EAL"},
      {"info --config /dev/zero", "/dev/zero: not a regular file"},
      {"info --device 00:03.x", "00:03.x"},
      {"info --pool.presets x:64abc:64:0", "'64abc' is not a decimal size"},
      {"info --pool.presets x:12x:64:0", "'12x' is not a decimal size"},
      {"info --pool.presets x:-1:64:0", "'-1' is not a decimal size"},
      {"info --pool.presets x:64:64", "'x:64:64' is not name:size:align:boundary"},
      {"info --pool.presets a:64:64:0,,b:64:64:0", "'' is not name:size:align:boundary"},
  };
  for (const auto& c : cases) {
    auto r = run(c.args);
    EXPECT_EQ(r.code, 2) << c.args << ": " << r.out;
    EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.args << ": " << r.out;
    EXPECT_EQ(r.out.find("Usage:"), std::string::npos) << c.args << ": DPDK's usage leaked: " << r.out;
  }
  ::setenv("DMAKIT_CONFIG", "/nonexistent/dmakit.toml", 1);
  auto env = run("info");
  ::unsetenv("DMAKIT_CONFIG");
  EXPECT_EQ(env.code, 2) << env.out;
  EXPECT_NE(env.out.find("DMAKIT_CONFIG: /nonexistent/dmakit.toml: config file not found"), std::string::npos)
      << env.out;
}

// The run's own flags override the stress.* settings (and the file), and
// are parsed as strictly; --help shows examples.
TEST(Cli, StressFlagsOverrideTheSettings) {
  auto r = run_json("stress --json --threads 3 --seconds 0.2 --seed 11 --max-bytes 64K --stress.threads 5");
  EXPECT_EQ(r.code, 0) << r.j;
  EXPECT_EQ(r.j["threads"], 3) << r.j;
  EXPECT_EQ(r.j["seed"], 11) << r.j;
  EXPECT_EQ(r.j["failures"], 0) << r.j;
  EXPECT_EQ(r.j["passed"], true) << r.j;
  EXPECT_EQ(r.j["mappings_at_end"], r.j["mappings_at_start"]) << r.j;

  auto zero = run("stress --threads 0");
  EXPECT_EQ(zero.code, 2) << zero.out;
  EXPECT_NE(zero.out.find("stress.threads"), std::string::npos) << zero.out;
  auto word = run("stress --seconds soon");
  EXPECT_EQ(word.code, 2) << word.out;
  EXPECT_NE(word.out.find("'soon' is not a finite, non-negative decimal number"), std::string::npos) << word.out;

  auto help = run("stress --help");
  EXPECT_EQ(help.code, 0) << help.out;
  EXPECT_NE(help.out.find("Examples:"), std::string::npos) << help.out;
  EXPECT_NE(help.out.find("--device 0000:00:03.0 --device"), std::string::npos) << help.out;
}

// Progress goes to stderr once a second when it is not a terminal (none
// with --quiet); the summary ends with the per-operation latency table.
TEST(Cli, StressShowsProgressAndALatencyTable) {
  // 2.5 s leave room for a late wake-up; the first line says about 1 s.
  auto r = run("stress --seconds 2.5 --threads 1");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("stress: 1."), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" ops/s), 0 failures\n"), std::string::npos) << r.out;
  for (const char* row : {"kind", "buffers", "blocks", "maps", "p99"})
    EXPECT_NE(r.out.find(row), std::string::npos) << row << " missing: " << r.out;
  EXPECT_EQ(r.out.find('\r'), std::string::npos) << "terminal control in a pipe: " << r.out;

  auto q = run("stress --seconds 2.5 --threads 1 --quiet");
  EXPECT_EQ(q.code, 0) << q.out;
  EXPECT_EQ(q.out.find(" ops/s), "), std::string::npos) << q.out;

  auto j = run_json("stress --json --quiet --seconds 0.3");
  EXPECT_EQ(j.code, 0) << j.j;
  for (const char* kind : {"buffers", "blocks", "maps"}) {
    const auto& k = j.j["kinds"][kind];
    EXPECT_GT(k["ops"].get<uint64_t>(), 0u) << kind << ": " << j.j;
    EXPECT_GT(k["ops_per_sec"].get<double>(), 0.0) << kind << ": " << j.j;
    EXPECT_LE(k["p50_ns"].get<uint64_t>(), k["p99_ns"].get<uint64_t>()) << kind << ": " << j.j;
    EXPECT_LE(k["p99_ns"].get<uint64_t>(), k["max_ns"].get<uint64_t>()) << kind << ": " << j.j;
  }
  for (const char* field : {"device_checks", "misuse_checks", "validation_failures", "flushes", "order_fallbacks",
                            "alloc_errors", "peak_live_bytes", "peak_rss_bytes", "mappings_at_end"})
    EXPECT_TRUE(j.j[field].is_number_unsigned()) << field << ": " << j.j;
  EXPECT_GT(j.j["misuse_checks"].get<uint64_t>(), 0u) << j.j;
  EXPECT_GT(j.j["peak_live_bytes"].get<uint64_t>(), 0u) << j.j;
  EXPECT_GT(j.j["peak_rss_bytes"].get<uint64_t>(), j.j["peak_live_bytes"].get<uint64_t>() / 2) << j.j;
  EXPECT_EQ(j.j["validation_failures"], 0) << j.j;
  EXPECT_EQ(j.j["ops"].get<uint64_t>(), j.j["kinds"]["buffers"]["ops"].get<uint64_t>() +
                                            j.j["kinds"]["blocks"]["ops"].get<uint64_t>() +
                                            j.j["kinds"]["maps"]["ops"].get<uint64_t>())
      << j.j;
}

TEST(Cli, EverySubcommandsHelpShowsExamples) {
  for (const char* sub : {"info", "bind", "unbind", "stress", "bench"}) {
    auto r = run(std::string(sub) + " --help");
    EXPECT_EQ(r.code, 0) << sub << ": " << r.out;
    EXPECT_NE(r.out.find("Examples:\n  dmakit " + std::string(sub)), std::string::npos) << sub << ": " << r.out;
  }
}

// --ops N: the threads share N steps; the same seed repeats the same
// choices, so the operation counts per kind repeat; another seed differs.
TEST(Cli, StressOpsWithOneSeedRepeatsTheCountsPerKind) {
  auto counts = [](const json& j) {
    std::vector<uint64_t> c;
    for (const char* kind : {"buffers", "blocks", "maps"}) c.push_back(j["kinds"][kind]["ops"]);
    c.push_back(j["device_checks"]);
    c.push_back(j["misuse_checks"]);
    return c;
  };
  const std::string args = "stress --json --quiet --ops 20000 --threads 2 --max-bytes 256K --seed ";
  auto a = run_json(args + "5"), b = run_json(args + "5"), other = run_json(args + "6");
  for (const auto* r : {&a, &b, &other}) {
    EXPECT_EQ(r->code, 0) << r->j;
    EXPECT_EQ(r->j["alloc_errors"], 0) << "memory ran out: the counts need not repeat: " << r->j;
  }
  EXPECT_GT(counts(a.j)[1], 0u) << a.j;
  EXPECT_EQ(counts(a.j), counts(b.j)) << a.j << "\n" << b.j;
  EXPECT_NE(counts(a.j), counts(other.j)) << a.j << "\n" << other.j;

  auto bad = run("stress --ops -5");
  EXPECT_EQ(bad.code, 2) << bad.out;
  EXPECT_NE(bad.out.find("'-5' is not a non-negative decimal number"), std::string::npos) << bad.out;
}

// --mix weighs buffers:blocks:maps; a kind of weight 0 is never run, and a
// malformed mix is one line naming it, exit 2.
TEST(Cli, StressMixWeighsTheKinds) {
  auto blocks = run_json("stress --json --quiet --ops 5000 --mix 0:1:0");
  EXPECT_EQ(blocks.code, 0) << blocks.j;
  EXPECT_EQ(blocks.j["kinds"]["buffers"]["ops"], 0) << blocks.j;
  EXPECT_EQ(blocks.j["kinds"]["maps"]["ops"], 0) << blocks.j;
  EXPECT_GT(blocks.j["kinds"]["blocks"]["ops"].get<uint64_t>(), 0u) << blocks.j;
  EXPECT_EQ(blocks.j["mix"], (json{{"buffers", 0}, {"blocks", 1}, {"maps", 0}})) << blocks.j;
  auto maps = run_json("stress --json --quiet --ops 2000 --stress.mix 0:0:3");
  EXPECT_EQ(maps.code, 0) << maps.j;
  EXPECT_GT(maps.j["kinds"]["maps"]["ops"].get<uint64_t>(), 0u) << maps.j;
  EXPECT_EQ(maps.j["kinds"]["blocks"]["ops"], 0) << maps.j;

  for (const char* bad : {"1:2", "a:b:c", "0:0:0", "1:2:3:4", "1::2", "-1:2:3"}) {
    auto r = run(std::string("stress --mix=") + bad);
    EXPECT_EQ(r.code, 2) << bad << ": " << r.out;
    EXPECT_NE(r.out.find(std::string("'") + bad + "'"), std::string::npos) << bad << ": " << r.out;
    EXPECT_NE(r.out.find("stress.mix"), std::string::npos) << bad << ": " << r.out;
    EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << bad << ": " << r.out;
  }
}

// --soak samples RSS, mappings and fds; a healthy short run is flat.
TEST(Cli, StressSoakRunIsFlat) {
  auto r = run_json("stress --json --quiet --soak --seconds 4");
  EXPECT_EQ(r.code, 0) << r.j;
  ASSERT_TRUE(r.j["soak"].is_object()) << r.j;
  EXPECT_EQ(r.j["soak"]["flat"], true) << r.j;
  EXPECT_GE(r.j["soak"]["samples"].get<uint64_t>(), 20u) << r.j;
  EXPECT_GT(r.j["soak"]["last_third_max"]["rss_bytes"].get<uint64_t>(), 0u) << r.j;
  EXPECT_GT(r.j["soak"]["last_third_max"]["fds"].get<uint64_t>(), 0u) << r.j;
  // Too short for a verdict: that fails, and says why.
  auto short_run = run_json("stress --json --quiet --soak --seconds 0.3");
  EXPECT_EQ(short_run.code, 1) << short_run.j;
  EXPECT_EQ(short_run.j["soak"]["flat"], false) << short_run.j;
  EXPECT_NE(short_run.j["first_failure"].get<std::string>().find("too few samples"), std::string::npos)
      << short_run.j;
}

// On a terminal the progress is one line rewritten in place (\r, then the
// line, then erase-to-end), cleared before the summary.
TEST(Cli, StressProgressOnATerminalRewritesOneLine) {
  int master = -1;
  const std::string tool = dmakit::test::tool_path();
  const pid_t pid = ::forkpty(&master, nullptr, nullptr, nullptr);
  ASSERT_GE(pid, 0) << std::strerror(errno);
  if (pid == 0) {
    ::execl(tool.c_str(), tool.c_str(), "stress", "--seconds", "1.6", "--threads", "1", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  std::string out;
  std::array<char, 4096> buf{};
  for (;;) {
    const ssize_t n = ::read(master, buf.data(), buf.size());
    if (n > 0) out.append(buf.data(), static_cast<size_t>(n));
    else if (n < 0 && errno == EINTR) continue;
    else break;  // EIO once the child has exited and the terminal is closed
  }
  ::close(master);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 0) << out;
  const auto first = out.find("\rstress: ");
  ASSERT_NE(first, std::string::npos) << "no rewritten progress line: " << out;
  EXPECT_NE(out.find(" ops/s), 0 failures\x1b[K", first), std::string::npos) << out;
  EXPECT_NE(out.find("\rstress: ", first + 1), std::string::npos) << "one progress line only: " << out;
  const auto cleared = out.find("\r\x1b[K");
  const auto summary = out.find("stress on ");
  ASSERT_NE(summary, std::string::npos) << out;
  EXPECT_LT(cleared, summary) << "the progress line is not cleared before the summary: " << out;
  EXPECT_EQ(out.find("stress: 0.", summary), std::string::npos) << out;
  EXPECT_EQ(out.find("\nstress: "), std::string::npos) << "a progress line ended with a newline: " << out;
}

// bench all: one object holding each benchmark's own object (run small).
TEST(Cli, BenchAllIsOneObjectWithEveryBench) {
  auto r = run_json("bench all --quick --json");
  EXPECT_EQ(r.code, 0) << r.j;
  EXPECT_EQ(r.j["bench"], "all") << r.j;
  ASSERT_TRUE(r.j["benches"].is_object()) << r.j;
  EXPECT_EQ(r.j["benches"].size(), 3u) << r.j;
  for (const char* name : {"dmapool", "arena", "buffer"}) {
    const auto& b = r.j["benches"][name];
    EXPECT_EQ(b["bench"], name) << r.j;
    ASSERT_TRUE(b["results"].is_array()) << name << ": " << r.j;
    EXPECT_FALSE(b["results"].empty()) << name << ": " << r.j;
  }
  // Each case of the arena bench is there, with its figures.
  std::vector<std::string> cases;
  for (const auto& row : r.j["benches"]["arena"]["results"]) {
    cases.push_back(row["case"]);
    EXPECT_TRUE(row.contains("ns_per_op") || row.contains("unmap_calls")) << row;
  }
  EXPECT_EQ(std::count(cases.begin(), cases.end(), "alloc_free"), 4) << r.j["benches"]["arena"];
  EXPECT_EQ(std::count(cases.begin(), cases.end(), "map_unmap"), 2) << r.j["benches"]["arena"];
}
