// rte_eal_init failing (fault point eal_init): ensure_eal reports the call,
// its arguments and the errno's text, removes the runtime directory it
// prepared and leaves the EAL unstarted. In a child process, because a
// process starts the EAL at most once.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>

#include "base/eal.hpp"
#include "base/fault_inject.hpp"
#include "base/runtime_dir.hpp"

using namespace dmakit;

TEST(EalFault, InitFailureIsReportedAndLeavesNoRuntimeDirectory) {
  ASSERT_EQ(base::eal_info(), nullptr) << "this binary must not start the EAL before the test";
  const std::string prefix = "dmakit-ealfault-" + std::to_string(::getpid());
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(fds[0]);
    base::EalSettings e;
    e.mode = "nohuge";
    e.memory_mb = 64;
    e.file_prefix = prefix;
    base::fault::Arm arm(base::fault::Point::eal_init, 0, ENOMEM);
    auto r = base::ensure_eal(e);
    std::string out = r ? std::string("started") : r.error().what();
    if (!r && r.error().code != Errc::no_memory) out = "wrong code: " + out;
    if (base::eal_info() != nullptr) out = "eal_info set after a failed start: " + out;
    (void)!::write(fds[1], out.data(), out.size());
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string text;
  char buf[512];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) text.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child died: " << text;
  EXPECT_NE(text.find("rte_eal_init("), std::string::npos) << text;
  EXPECT_NE(text.find("--no-huge"), std::string::npos) << "names its arguments: " << text;
  EXPECT_NE(text.find(std::strerror(ENOMEM)), std::string::npos) << text;
  EXPECT_FALSE(std::filesystem::exists(std::filesystem::path(base::eal_runtime_base()) / prefix))
      << "the runtime directory prepared for the failed start stays behind";
}
