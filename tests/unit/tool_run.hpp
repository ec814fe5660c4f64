// Runs the built dmakit tool as a user would, for the tests that drive it.
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <string>

namespace dmakit::test {

inline std::string tool_path() { return std::string(DMAKIT_BINARY_DIR) + "/tools/dmakit"; }

struct ToolRun {
  int code = -1;    // exit status; -1 when it did not exit normally
  std::string out;  // stdout and stderr together
};

// `dmakit ARGS` through the shell, its output collected.
inline ToolRun run_tool(const std::string& args) {
  const std::string cmd = tool_path() + " " + args + " 2>&1";
  ToolRun r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = ::pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

}  // namespace dmakit::test
