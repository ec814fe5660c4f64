// The dmakit command as a user meets it: help, version, config errors.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "tool_run.hpp"

namespace {

using dmakit::test::run_tool;
auto run(const std::string& args) { return run_tool(args); }

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
  auto r = run("info --json");
  EXPECT_EQ(r.code, 0) << r.out;
  ASSERT_FALSE(r.out.empty());
  EXPECT_EQ(r.out.front(), '{');
  EXPECT_EQ(r.out.substr(r.out.size() - 2), "}\n");
  EXPECT_NE(r.out.find("\"backend\""), std::string::npos);
}

// The README's main job: the tool's own deliberate bad frees are counted in
// the report, not logged as warnings about the user's code.
TEST(Cli, StressReportsItsDeliberateBadFreesWithoutWarnings) {
  auto r = run("stress --stress.seconds 0.3 --iommu.backend sim --eal.mode nohuge");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(r.out.find("[warning]"), std::string::npos) << r.out;
  const auto at = r.out.find("deliberate bad frees refused: ");
  ASSERT_NE(at, std::string::npos) << r.out;
  EXPECT_NE(r.out[at + std::string("deliberate bad frees refused: ").size()], '0') << r.out;
}

// --device names the context's devices (repeatable); info lists each with
// its group and driver, or why it cannot be used (this host has no such
// PCI devices), and a malformed address is a usage error naming it.
TEST(Cli, InfoListsEveryDeviceGivenWithDevice) {
  auto r = run("info --json --device 00:1e.0 --device 0000:00:1e.1");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("\"devices\":[{\"bdf\":\"0000:00:1e.0\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("{\"bdf\":\"0000:00:1e.1\""), std::string::npos) << r.out;
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
  auto r = run("stress --json --threads 3 --seconds 0.2 --seed 11 --max-bytes 64K --stress.threads 5");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("\"threads\":3,"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"seed\":11,"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"failures\":0,"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"mappings_at_end\":0"), std::string::npos) << r.out;

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
  for (const char* row : {"operation", "buffer alloc", "buffer free", "block alloc", "block free", "p99"})
    EXPECT_NE(r.out.find(row), std::string::npos) << row << " missing: " << r.out;
  EXPECT_EQ(r.out.find('\r'), std::string::npos) << "terminal control in a pipe: " << r.out;

  auto q = run("stress --seconds 2.5 --threads 1 --quiet");
  EXPECT_EQ(q.code, 0) << q.out;
  EXPECT_EQ(q.out.find(" ops/s), "), std::string::npos) << q.out;

  auto j = run("stress --json --quiet --seconds 0.2");
  EXPECT_EQ(j.code, 0) << j.out;
  EXPECT_NE(j.out.find("\"latency\":{\"buffer_alloc\":{\"count\":"), std::string::npos) << j.out;
  EXPECT_NE(j.out.find("\"block_free\":{\"count\":"), std::string::npos) << j.out;
}

TEST(Cli, EverySubcommandsHelpShowsExamples) {
  for (const char* sub : {"info", "bind", "unbind", "stress", "bench"}) {
    auto r = run(std::string(sub) + " --help");
    EXPECT_EQ(r.code, 0) << sub << ": " << r.out;
    EXPECT_NE(r.out.find("Examples:\n  dmakit " + std::string(sub)), std::string::npos) << sub << ": " << r.out;
  }
}

// --ops ends the run by operation count (at least that many are done).
TEST(Cli, StressStopsAfterAnOperationCount) {
  auto r = run("stress --ops 3000 --quiet --json");
  EXPECT_EQ(r.code, 0) << r.out;
  const auto at = r.out.find("\"ops\":");
  ASSERT_NE(at, std::string::npos) << r.out;
  const uint64_t ops = std::stoull(r.out.substr(at + 6));
  EXPECT_GE(ops, 3000u) << r.out;
  EXPECT_NE(r.out.find("\"failures\":0,"), std::string::npos) << r.out;
  auto bad = run("stress --ops -5");
  EXPECT_EQ(bad.code, 2) << bad.out;
  EXPECT_NE(bad.out.find("'-5' is not a non-negative decimal number"), std::string::npos) << bad.out;
}
