// Runs the built dmakit tool as a user would, for the tests that drive it.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>

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
inline ToolRun run_command(const std::string& cmd) {
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

inline ToolRun run_tool(const std::string& args) { return run_command(tool_path() + " " + args + " 2>&1"); }

// `dmakit ARGS` with stdout alone in out (stderr in err): what a program
// reading --json output gets.
struct SplitRun {
  int code = -1;
  std::string out, err;
};
inline SplitRun run_tool_split(const std::string& args) {
  char path[] = "/tmp/dmakit-tool-err-XXXXXX";
  const int fd = ::mkstemp(path);
  SplitRun r;
  if (fd < 0) return r;
  ::close(fd);
  const ToolRun t = run_command(tool_path() + " " + args + " 2>" + path);
  r.code = t.code;
  r.out = t.out;
  std::FILE* f = std::fopen(path, "r");
  if (f != nullptr) {
    std::array<char, 4096> buf{};
    size_t n;
    while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) r.err.append(buf.data(), n);
    std::fclose(f);
  }
  ::unlink(path);
  return r;
}

}  // namespace dmakit::test
