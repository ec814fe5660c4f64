// The dmakit command as a user meets it: help, version, config errors.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>

namespace {

struct Run {
  int code = -1;
  std::string out;  // stdout and stderr together
};

Run run(const std::string& args) {
  std::string cmd = std::string(DMAKIT_BINARY_DIR) + "/tools/dmakit " + args + " 2>&1";
  Run r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  int status = ::pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
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
  EXPECT_EQ(r.out, "dmakit: " + path.string() + ": key 'arena.shards': 'many' is not a non-negative integer in range\n");
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
