// For tests that change process-wide limits (RLIMIT_AS, RLIMIT_MEMLOCK,
// capabilities): run the body in a forked child, so the test process keeps
// its own, and get back a code and a message through a pipe.
#pragma once

#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <utility>

namespace dmakit::testing_child {

// Runs fn() -> std::pair<int, std::string> in a child; {-1, why} when the
// child died or said nothing.
template <class Fn>
std::pair<int, std::string> run_in_child(Fn fn) {
  int p[2];
  if (::pipe(p) != 0) return {-1, "pipe failed"};
  const pid_t pid = ::fork();
  if (pid < 0) return {-1, "fork failed"};
  if (pid == 0) {
    ::close(p[0]);
    auto [code, msg] = fn();
    const std::string line = std::to_string(code) + " " + msg;
    [[maybe_unused]] ssize_t n = ::write(p[1], line.data(), line.size());
    ::_exit(0);
  }
  ::close(p[1]);
  std::string got;
  char buf[512];
  ssize_t n;
  while ((n = ::read(p[0], buf, sizeof buf)) > 0) got.append(buf, static_cast<size_t>(n));
  ::close(p[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  const auto sp = got.find(' ');
  if (sp == std::string::npos)
    return {-1, "the child said nothing (status " + std::to_string(status) + "): " + got};
  return {std::stoi(got.substr(0, sp)), got.substr(sp + 1)};
}

// Removes CAP_IPC_LOCK from this process's effective and permitted sets
// (root keeps its uid, loses the memlock exemption). False on failure.
inline bool drop_cap_ipc_lock() {
  __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3]{};
  if (::syscall(SYS_capget, &hdr, data) != 0) return false;
  data[CAP_IPC_LOCK / 32].effective &= ~(1u << (CAP_IPC_LOCK % 32));
  data[CAP_IPC_LOCK / 32].permitted &= ~(1u << (CAP_IPC_LOCK % 32));
  data[CAP_IPC_LOCK / 32].inheritable &= ~(1u << (CAP_IPC_LOCK % 32));
  return ::syscall(SYS_capset, &hdr, data) == 0;
}

// Sets the soft RLIMIT_MEMLOCK (the hard one stays, so it can be raised again).
inline bool set_memlock_soft(uint64_t bytes) {
  rlimit rl{};
  if (::getrlimit(RLIMIT_MEMLOCK, &rl) != 0) return false;
  rl.rlim_cur = bytes;
  return ::setrlimit(RLIMIT_MEMLOCK, &rl) == 0;
}

// This process's address space (VmSize), bytes.
inline uint64_t vm_size() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmSize:", 0) == 0) return std::stoull(line.substr(7)) << 10;
  return 0;
}

// Caps the address space at what is mapped now plus `headroom` bytes.
inline bool limit_address_space(uint64_t headroom) {
  const uint64_t cap = vm_size() + headroom;
  rlimit rl{cap, cap};
  return ::setrlimit(RLIMIT_AS, &rl) == 0;
}

}  // namespace dmakit::testing_child
