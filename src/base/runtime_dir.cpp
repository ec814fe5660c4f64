#include "base/runtime_dir.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>

#include "base/log.hpp"

namespace dmakit::base {

namespace {

// Field 22 of /proc/<pid>/stat: the start time in clock ticks since boot.
// With the pid it names one process for as long as the system runs.
std::optional<uint64_t> start_time(long pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string line;
  if (!std::getline(in, line)) return std::nullopt;
  auto close = line.rfind(')');  // the command name may hold spaces and parentheses
  if (close == std::string::npos) return std::nullopt;
  std::istringstream rest(line.substr(close + 1));
  std::string field;
  for (int i = 3; i <= 22 && rest >> field; ++i)
    if (i == 22) return std::strtoull(field.c_str(), nullptr, 10);
  return std::nullopt;
}

struct Owner {
  long pid = 0;
  uint64_t start = 0;
};

std::string owner_path(const std::string& dir) { return dir + "/" + std::string(kRuntimeOwnerFile); }

std::optional<Owner> read_owner(const std::string& dir) {
  std::ifstream in(owner_path(dir));
  std::string k1, k2;
  Owner o;
  if (!(in >> k1 >> o.pid >> k2 >> o.start) || k1 != "pid" || k2 != "start" || o.pid <= 0) return std::nullopt;
  return o;
}

// The process the owner file names still runs.
bool alive(const Owner& o) {
  auto st = start_time(o.pid);
  return st && *st == o.start;
}

bool pid_alive(long pid) { return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM; }

// "dmakit-<digits>": the default prefix; returns the pid.
std::optional<long> default_prefix_pid(std::string_view name) {
  constexpr std::string_view kStem = "dmakit-";
  if (name.size() <= kStem.size() || name.substr(0, kStem.size()) != kStem) return std::nullopt;
  long pid = 0;
  for (char c : name.substr(kStem.size())) {
    if (c < '0' || c > '9' || pid > 1'000'000'000) return std::nullopt;
    pid = pid * 10 + (c - '0');
  }
  return pid > 0 ? std::optional<long>(pid) : std::nullopt;
}

bool is_empty_dir(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return false;
  bool empty = true;
  while (dirent* e = ::readdir(d)) {
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
      empty = false;
      break;
    }
  }
  ::closedir(d);
  return empty;
}

// A directory a dead dmakit process left: its owner file names a process
// that is gone, or it is an empty dmakit-<pid> whose pid is free (or ours,
// which no other live process can have).
bool stale(const std::string& dir, std::string_view name) {
  if (auto o = read_owner(dir)) return !alive(*o);
  auto pid = default_prefix_pid(name);
  if (!pid) return false;
  if (*pid != ::getpid() && pid_alive(*pid)) return false;
  return is_empty_dir(dir);
}

// Owner file first, then rmdir: a directory holding anything else stays.
bool reclaim(const std::string& dir) {
  if (::unlink(owner_path(dir).c_str()) != 0 && errno != ENOENT) return false;
  if (::rmdir(dir.c_str()) == 0) return true;
  log().warn("EAL runtime directory {} of a dead dmakit process holds other files; left in place", dir);
  return false;
}

}  // namespace

Status check_file_prefix(std::string_view prefix) {
  if (prefix.empty()) return fail(Errc::invalid_argument, "key 'eal.file_prefix': empty name");
  if (prefix.size() > 64)
    return fail(Errc::invalid_argument, "key 'eal.file_prefix': '{}' is longer than 64 bytes", prefix);
  if (prefix == "." || prefix == "..")
    return fail(Errc::invalid_argument, "key 'eal.file_prefix': '{}' is not a plain name", prefix);
  for (char c : prefix) {
    bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                 c == '-' || c == '.';
    if (!plain)
      return fail(Errc::invalid_argument,
                  "key 'eal.file_prefix': '{}' is not a plain name (letters, digits, '_', '-', '.'; no '/')",
                  prefix);
  }
  return ok();
}

std::string eal_runtime_base() {
  // As DPDK's eal_create_runtime_dir decides it.
  if (::getuid() == 0) return "/var/run/dpdk";
  const char* xdg = std::getenv("XDG_RUNTIME_DIR");
  return std::string(xdg != nullptr && *xdg != '\0' ? xdg : "/tmp") + "/dpdk";
}

Result<unsigned> prepare_runtime_dir(const std::string& base, std::string_view prefix) {
  DMAKIT_TRY(check_file_prefix(prefix));
  unsigned reclaimed = 0;
  if (DIR* d = ::opendir(base.c_str())) {
    while (dirent* e = ::readdir(d)) {
      std::string_view name = e->d_name;
      if (name == "." || name == "..") continue;
      const std::string dir = base + "/" + std::string(name);
      struct stat st {};
      if (::lstat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) continue;
      if (stale(dir, name) && reclaim(dir)) {
        ++reclaimed;
        log().info("reclaimed the EAL runtime directory {} of a dead dmakit process", dir);
      }
    }
    ::closedir(d);
  }
  const std::string mine = base + "/" + std::string(prefix);
  struct stat st {};
  if (::lstat(mine.c_str(), &st) == 0)
    return fail(Errc::exists,
                "EAL runtime directory {} already exists: another DPDK process uses file prefix '{}' "
                "(choose another eal.file_prefix, or leave it empty for a unique one)",
                mine, prefix);
  return reclaimed;
}

Status claim_runtime_dir(const std::string& dir) {
  auto st = start_time(::getpid());
  if (!st) return fail(Errc::io, "EAL runtime directory {}: cannot read this process's start time", dir);
  const std::string path = owner_path(dir);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return fail_errno(errno, "EAL runtime directory: creating {}", path);
  const std::string text = fmt::format("pid {} start {}\n", ::getpid(), *st);
  const bool wrote = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  int err = errno;
  ::close(fd);
  if (!wrote) {
    ::unlink(path.c_str());
    return fail_errno(err, "EAL runtime directory: writing {}", path);
  }
  return ok();
}

bool release_runtime_dir(const std::string& dir) {
  auto o = read_owner(dir);
  // A forked child inherits the exit hook, not the directory.
  if (!o || o->pid != ::getpid() || !alive(*o)) return false;
  if (::unlink(owner_path(dir).c_str()) != 0) return false;
  if (::rmdir(dir.c_str()) == 0) return true;
  log().warn("EAL runtime directory {} holds files dmakit did not create; left in place", dir);
  return false;
}

}  // namespace dmakit::base
