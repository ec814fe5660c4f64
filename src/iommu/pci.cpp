#include "iommu/pci.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <sys/syscall.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>

#include "base/fd.hpp"
#include "base/log.hpp"

namespace dmakit::iommu::pci {

namespace {

// Parses exactly `digits` hex digits.
std::optional<unsigned> parse_hex(std::string_view s, size_t digits) {
  if (s.size() != digits) return std::nullopt;
  unsigned v = 0;
  for (char c : s) {
    v <<= 4;
    if (c >= '0' && c <= '9') v |= static_cast<unsigned>(c - '0');
    else if (c >= 'a' && c <= 'f') v |= static_cast<unsigned>(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') v |= static_cast<unsigned>(c - 'A' + 10);
    else return std::nullopt;
  }
  return v;
}

std::string device_dir(std::string_view sysfs, const std::string& bdf) {
  return fmt::format("{}/bus/pci/devices/{}", sysfs, bdf);
}

std::string driver_dir(std::string_view sysfs, std::string_view driver) {
  return fmt::format("{}/bus/pci/drivers/{}", sysfs, driver);
}

// The last path component a symlink points at ("../../kernel/iommu_groups/7" -> "7");
// nullopt when the link does not exist.
Result<std::optional<std::string>> link_target_name(const std::string& link) {
  char buf[4096];
  ssize_t n = ::readlink(link.c_str(), buf, sizeof buf - 1);
  if (n < 0) {
    if (errno == ENOENT) return std::optional<std::string>{};
    return fail_errno(errno, "readlink {}", link);
  }
  std::string_view target(buf, static_cast<size_t>(n));
  auto slash = target.rfind('/');
  return std::optional<std::string>(std::string(slash == std::string_view::npos ? target : target.substr(slash + 1)));
}

// Writes one value to a sysfs attribute in a single write(2), as the kernel
// parses each write separately.
Status write_attr(const std::string& path, std::string_view value) {
  base::UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd) {
    int err = errno;
    if (err == EACCES || err == EPERM)
      return fail_errno(err, "open {} for writing (changing driver bindings needs root)", path);
    return fail_errno(err, "open {} for writing", path);
  }
  ssize_t n = ::write(fd.get(), value.data(), value.size());
  if (n < 0) return fail_errno(errno, "write '{}' to {}", value, path);
  if (static_cast<size_t>(n) != value.size())
    return fail(Errc::io, "short write of '{}' to {} ({} of {} bytes)", value, path, n, value.size());
  return ok();
}

// write_attr plus the after_write hook.
Status write_sysfs(const BindOptions& opt, const std::string& path, std::string_view value) {
  DMAKIT_TRY(write_attr(path, value));
  if (opt.after_write) opt.after_write(path, value);
  return ok();
}

bool path_exists(const std::string& path, int* err) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) return true;
  *err = errno;
  return false;
}

std::string state_file_path(const BindOptions& opt, const std::string& bdf) {
  return fmt::format("{}/{}.driver", opt.state_dir, bdf);
}

// The driver recorded by bind_vfio: nullopt when there is no record, "" when
// the device had no driver.
Result<std::optional<std::string>> read_state(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    if (errno == ENOENT || errno == 0) return std::optional<std::string>{};
    return fail_errno(errno, "open state file {}", path);
  }
  std::string line;
  std::getline(in, line);
  return std::optional<std::string>(line);
}

// Writes the state file via a temp file and rename so a reader never sees half of it.
Status write_state(const BindOptions& opt, const std::string& path, std::string_view driver) {
  std::error_code ec;
  std::filesystem::create_directories(opt.state_dir, ec);
  if (ec) return fail_errno(ec.value(), "create directory {} (state of bound devices)", opt.state_dir);
  const std::string tmp = path + ".tmp";
  {
    base::UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd) return fail_errno(errno, "create state file {}", tmp);
    std::string text = std::string(driver) + "\n";
    if (::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size()))
      return fail_errno(errno, "write state file {}", tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) return fail_errno(errno, "rename {} to {}", tmp, path);
  return ok();
}

}  // namespace

Result<Bdf> Bdf::parse(std::string_view text) {
  auto bad = [&] {
    return fail(Errc::invalid_argument,
                "malformed PCI address '{}' (expected DDDD:BB:DD.F or BB:DD.F in hex, e.g. 0000:00:03.0)",
                text);
  };
  std::string_view rest = text;
  Bdf b;
  // Optional 4-digit domain: present when there are two colons.
  if (std::count(rest.begin(), rest.end(), ':') == 2) {
    auto dom = parse_hex(rest.substr(0, rest.find(':')), 4);
    if (!dom) return bad();
    b.domain = static_cast<uint16_t>(*dom);
    rest.remove_prefix(5);
  }
  if (rest.size() != 7 || rest[2] != ':' || rest[5] != '.') return bad();
  auto bus = parse_hex(rest.substr(0, 2), 2);
  auto dev = parse_hex(rest.substr(3, 2), 2);
  auto fn = parse_hex(rest.substr(6, 1), 1);
  if (!bus || !dev || !fn) return bad();
  if (*dev > 0x1f)
    return fail(Errc::invalid_argument, "PCI address '{}': device {:#x} is above 0x1f", text, *dev);
  if (*fn > 7)
    return fail(Errc::invalid_argument, "PCI address '{}': function {} is above 7", text, *fn);
  b.bus = static_cast<uint8_t>(*bus);
  b.device = static_cast<uint8_t>(*dev);
  b.function = static_cast<uint8_t>(*fn);
  return b;
}

Result<std::vector<std::string>> parse_bdf_list(std::string_view text) {
  std::vector<std::string> out;
  auto blank = [](char c) { return c == ' ' || c == '\t'; };
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    if (comma == std::string_view::npos) comma = text.size();
    std::string_view item = text.substr(pos, comma - pos);
    while (!item.empty() && blank(item.front())) item.remove_prefix(1);
    while (!item.empty() && blank(item.back())) item.remove_suffix(1);
    if (item.empty()) {
      if (out.empty() && comma == text.size()) return out;  // the whole list is blank
      return fail(Errc::invalid_argument, "device list '{}': empty entry", text);
    }
    const std::string bdf = DMAKIT_TRY(Bdf::parse(item)).str();
    if (std::find(out.begin(), out.end(), bdf) != out.end())
      return fail(Errc::invalid_argument, "device list '{}': {} is named twice", text, bdf);
    out.push_back(bdf);
    pos = comma + 1;
  }
  return out;
}

std::string Bdf::str() const {
  return fmt::format("{:04x}:{:02x}:{:02x}.{:x}", domain, bus, device, function);
}

Status check_device_exists(const Bdf& bdf, std::string_view sysfs) {
  const std::string dir = device_dir(sysfs, bdf.str());
  int err = 0;
  if (path_exists(dir, &err)) return ok();
  if (err == ENOENT) return fail(Errc::not_found, "no PCI device {} ({} does not exist)", bdf.str(), dir);
  return fail_errno(err, "stat {}", dir);
}

Result<int> iommu_group(const Bdf& bdf, std::string_view sysfs) {
  DMAKIT_TRY(check_device_exists(bdf, sysfs));
  const std::string link = device_dir(sysfs, bdf.str()) + "/iommu_group";
  auto name = DMAKIT_TRY(link_target_name(link));
  if (!name)
    return fail(Errc::not_found,
                "PCI device {} has no IOMMU group ({} missing): the IOMMU is off or absent "
                "(boot with intel_iommu=on or amd_iommu=on)",
                bdf.str(), link);
  int n = -1;
  auto [p, ec] = std::from_chars(name->data(), name->data() + name->size(), n);
  if (ec != std::errc{} || p != name->data() + name->size() || n < 0)
    return fail(Errc::io, "{} points at '{}', not an IOMMU group number", link, *name);
  return n;
}

Result<std::string> current_driver(const Bdf& bdf, std::string_view sysfs) {
  DMAKIT_TRY(check_device_exists(bdf, sysfs));
  auto name = DMAKIT_TRY(link_target_name(device_dir(sysfs, bdf.str()) + "/driver"));
  return name.value_or("");
}

Result<std::vector<GroupMember>> group_members(int group, std::string_view sysfs) {
  const std::string dir = fmt::format("{}/kernel/iommu_groups/{}/devices", sysfs, group);
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    if (errno == ENOENT) return fail(Errc::not_found, "no IOMMU group {} ({} does not exist)", group, dir);
    return fail_errno(errno, "opendir {}", dir);
  }
  std::unique_ptr<DIR, int (*)(DIR*)> closer(d, ::closedir);
  std::vector<GroupMember> out;
  while (const dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    auto drv = DMAKIT_TRY(link_target_name(dir + "/" + name + "/driver"));
    out.push_back({name, drv.value_or("")});
  }
  std::sort(out.begin(), out.end(), [](auto& a, auto& b) { return a.bdf < b.bdf; });
  return out;
}

Result<std::vector<int>> iommu_groups(std::string_view sysfs) {
  const std::string dir = fmt::format("{}/kernel/iommu_groups", sysfs);
  std::vector<int> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    if (errno == ENOENT) return out;  // no IOMMU: no groups
    return fail_errno(errno, "opendir {}", dir);
  }
  std::unique_ptr<DIR, int (*)(DIR*)> closer(d, ::closedir);
  while (const dirent* e = ::readdir(d)) {
    std::string_view name = e->d_name;
    int n = -1;
    auto [p, ec] = std::from_chars(name.data(), name.data() + name.size(), n);
    if (ec == std::errc{} && p == name.data() + name.size()) out.push_back(n);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string describe_members(const std::vector<GroupMember>& members) {
  std::string s;
  for (const auto& m : members) {
    if (!s.empty()) s += ", ";
    s += fmt::format("{} ({})", m.bdf, m.driver.empty() ? "no driver" : m.driver);
  }
  return s.empty() ? "no devices" : s;
}

Status check_vfio_pci_loaded(std::string_view sysfs) {
  const std::string dir = driver_dir(sysfs, kVfioPci);
  int err = 0;
  if (path_exists(dir, &err)) return ok();
  if (err == ENOENT)
    return fail(Errc::not_found, "the vfio-pci driver is not loaded ({} does not exist): run 'modprobe vfio-pci'",
                dir);
  return fail_errno(err, "stat {}", dir);
}

Result<BindResult> bind_vfio(std::string_view text, const BindOptions& opt) {
  const Bdf bdf = DMAKIT_TRY(Bdf::parse(text));
  BindResult r;
  r.bdf = bdf.str();
  DMAKIT_TRY(check_device_exists(bdf, opt.sysfs));
  DMAKIT_TRY(check_vfio_pci_loaded(opt.sysfs));
  r.group = DMAKIT_TRY(iommu_group(bdf, opt.sysfs));
  const std::string driver = DMAKIT_TRY(current_driver(bdf, opt.sysfs));
  r.state_file = state_file_path(opt, r.bdf);
  if (driver == kVfioPci) {
    r.already_bound = true;
    auto recorded = DMAKIT_TRY(read_state(r.state_file));
    r.previous_driver = recorded.value_or("");
    return r;
  }
  r.previous_driver = driver;
  const std::string dev = device_dir(opt.sysfs, r.bdf);

  // Record first: if a later step fails, unbind can still restore the driver.
  DMAKIT_TRY(write_state(opt, r.state_file, driver));
  // driver_override makes the next probe of this one device pick vfio-pci,
  // without a new_id that would grab every device of the same model.
  DMAKIT_TRY(write_sysfs(opt, dev + "/driver_override", kVfioPci));
  if (!driver.empty()) DMAKIT_TRY(write_sysfs(opt, driver_dir(opt.sysfs, driver) + "/unbind", r.bdf));
  DMAKIT_TRY(write_sysfs(opt, fmt::format("{}/bus/pci/drivers_probe", opt.sysfs), r.bdf));

  const std::string now = DMAKIT_TRY(current_driver(bdf, opt.sysfs));
  if (now != kVfioPci)
    return fail(Errc::io, "bind {}: after drivers_probe the device is on {} instead of vfio-pci "
                "(check dmesg; 'dmakit unbind {}' restores {})",
                r.bdf, now.empty() ? "no driver" : now, r.bdf, driver.empty() ? "no driver" : driver);
  base::log().info("bound {} (IOMMU group {}) to vfio-pci, was {}", r.bdf, r.group,
                   driver.empty() ? "unbound" : driver);
  return r;
}

Result<UnbindResult> unbind_vfio(std::string_view text, const BindOptions& opt) {
  const Bdf bdf = DMAKIT_TRY(Bdf::parse(text));
  UnbindResult r;
  r.bdf = bdf.str();
  DMAKIT_TRY(check_device_exists(bdf, opt.sysfs));
  const std::string driver = DMAKIT_TRY(current_driver(bdf, opt.sysfs));
  if (driver != kVfioPci) {
    r.restored_driver = driver;
    return r;
  }
  r.was_bound = true;
  const std::string state = state_file_path(opt, r.bdf);
  const auto recorded = DMAKIT_TRY(read_state(state));
  const std::string dev = device_dir(opt.sysfs, r.bdf);

  // An empty write clears driver_override, so probing uses the normal id match again.
  DMAKIT_TRY(write_sysfs(opt, dev + "/driver_override", "\n"));
  DMAKIT_TRY(write_sysfs(opt, driver_dir(opt.sysfs, kVfioPci) + "/unbind", r.bdf));
  // A device that had no driver stays without one; otherwise let the kernel
  // probe, which binds the driver that matches (normally the original one).
  if (!recorded || !recorded->empty())
    DMAKIT_TRY(write_sysfs(opt, fmt::format("{}/bus/pci/drivers_probe", opt.sysfs), r.bdf));
  r.restored_driver = DMAKIT_TRY(current_driver(bdf, opt.sysfs));
  if (recorded && !recorded->empty() && r.restored_driver != *recorded) {
    // The probe picked another driver or none: ask the recorded one directly.
    const std::string bind = driver_dir(opt.sysfs, *recorded) + "/bind";
    if (r.restored_driver.empty()) DMAKIT_TRY(write_sysfs(opt, bind, r.bdf));
    r.restored_driver = DMAKIT_TRY(current_driver(bdf, opt.sysfs));
    if (r.restored_driver != *recorded)
      return fail(Errc::io, "unbind {}: released from vfio-pci but {} did not take it back (now: {}; is its module loaded?)",
                  r.bdf, *recorded, r.restored_driver.empty() ? "no driver" : r.restored_driver);
  }
  if (recorded && ::unlink(state.c_str()) != 0 && errno != ENOENT)
    return fail_errno(errno, "remove state file {}", state);
  base::log().info("released {} from vfio-pci, now {}", r.bdf,
                   r.restored_driver.empty() ? "unbound" : r.restored_driver);
  return r;
}

MemlockState current_memlock() {
  MemlockState s;
  rlimit rl{};
  if (::getrlimit(RLIMIT_MEMLOCK, &rl) == 0)
    s.soft_limit = rl.rlim_cur == RLIM_INFINITY ? std::numeric_limits<uint64_t>::max() : rl.rlim_cur;
  // The effective set, straight from capget (two system calls in all, so a
  // caller may ask at every pin as the kernel does). VFIO skips the memlock
  // accounting for tasks that have CAP_IPC_LOCK.
  __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3]{};
  if (::syscall(SYS_capget, &hdr, data) == 0)
    s.cap_ipc_lock = (data[CAP_IPC_LOCK / 32].effective >> (CAP_IPC_LOCK % 32)) & 1;
  return s;
}

Status check_memlock(uint64_t need, const MemlockState& state) {
  if (state.cap_ipc_lock || need <= state.soft_limit) return ok();
  return fail(Errc::permission,
              "RLIMIT_MEMLOCK is {} KiB but {} KiB of DMA memory must be pinned: raise it "
              "(ulimit -l, or memlock in /etc/security/limits.conf) or run with CAP_IPC_LOCK",
              state.soft_limit / 1024, (need + 1023) / 1024);
}

}  // namespace dmakit::iommu::pci
