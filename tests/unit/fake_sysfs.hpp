// A fake sysfs tree in a temp dir for the PCI/VFIO host tests: the same
// files and symlinks the kernel shows (bus/pci/devices/BDF, its driver and
// iommu_group links, kernel/iommu_groups/N/devices, bus/pci/drivers/NAME),
// plus a tiny model of how the kernel reacts to the binding writes.
#pragma once

#include <dirent.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace dmakit::testing {

namespace fs = std::filesystem;

// Open descriptors of this process (to prove error paths leak none).
inline size_t count_open_fds() {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

class FakeSysfs {
 public:
  FakeSysfs() {
    std::string tmpl = (fs::temp_directory_path() / "dmakit-sysfs-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    base_ = tmpl;
    fs::create_directories(root() + "/bus/pci/devices");
    fs::create_directories(root() + "/bus/pci/drivers");
    fs::create_directories(root() + "/kernel/iommu_groups");
    fs::create_directories(root() + "/devices/pci0000:00");
    touch(root() + "/bus/pci/drivers_probe");
  }
  ~FakeSysfs() {
    std::error_code ec;
    fs::remove_all(base_, ec);
  }
  FakeSysfs(const FakeSysfs&) = delete;
  FakeSysfs& operator=(const FakeSysfs&) = delete;

  std::string base() const { return base_; }
  std::string root() const { return base_ + "/sys"; }
  std::string dev_dir() const { return base_ + "/dev/vfio"; }
  std::string state_dir() const { return base_ + "/run/dmakit"; }
  std::string device_path(const std::string& bdf) const { return root() + "/bus/pci/devices/" + bdf; }

  void add_driver(const std::string& name) {
    const std::string d = root() + "/bus/pci/drivers/" + name;
    fs::create_directories(d);
    touch(d + "/bind");
    touch(d + "/unbind");
  }

  // A device, optionally in an IOMMU group and bound to a driver.
  void add_device(const std::string& bdf, std::optional<int> group, const std::string& driver = "") {
    const std::string real = root() + "/devices/pci0000:00/" + bdf;
    fs::create_directories(real);
    touch(real + "/driver_override");
    fs::create_directory_symlink("../../../devices/pci0000:00/" + bdf, device_path(bdf));
    if (group) {
      const std::string g = root() + "/kernel/iommu_groups/" + std::to_string(*group) + "/devices";
      fs::create_directories(g);
      fs::create_directory_symlink("../../../../devices/pci0000:00/" + bdf, g + "/" + bdf);
      fs::create_directory_symlink("../../../kernel/iommu_groups/" + std::to_string(*group),
                                   real + "/iommu_group");
    }
    set_driver(bdf, driver);
  }

  // Binds (or with "" unbinds) a device in the tree, as the kernel would.
  void set_driver(const std::string& bdf, const std::string& driver) {
    const std::string link = root() + "/devices/pci0000:00/" + bdf + "/driver";
    std::error_code ec;
    fs::remove(link, ec);
    if (!driver.empty()) fs::create_directory_symlink("../../../bus/pci/drivers/" + driver, link);
  }

  std::string driver_of(const std::string& bdf) const {
    std::error_code ec;
    auto t = fs::read_symlink(device_path(bdf) + "/driver", ec);
    return ec ? "" : t.filename().string();
  }

  static std::string read(const std::string& path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

  static void touch(const std::string& path) { std::ofstream(path).flush(); }

  // The kernel's part after a sysfs write (BindOptions::after_write).
  // drivers_probe binds driver_override if set, else the device's default driver.
  void kernel_write(const std::string& path, std::string_view value) {
    writes.emplace_back(path.substr(root().size()), std::string(value));
    const std::string v(value);
    const fs::path p(path);
    const std::string name = p.filename().string();
    if (name == "driver_override") {
      std::ofstream(path, std::ios::trunc) << v;  // sysfs replaces the value on each write
    } else if (name == "drivers_probe") {
      if (!driver_of(v).empty()) return;
      std::string over = read(device_path(v) + "/driver_override");
      while (!over.empty() && (over.back() == '\n' || over.back() == 0)) over.pop_back();
      std::string pick = !over.empty() ? over : default_driver[v];
      if (!pick.empty() && fs::exists(root() + "/bus/pci/drivers/" + pick)) set_driver(v, pick);
    } else if (name == "unbind") {
      if (driver_of(v) == p.parent_path().filename().string()) set_driver(v, "");
    } else if (name == "bind") {
      if (driver_of(v).empty()) set_driver(v, p.parent_path().filename().string());
    }
  }

  std::map<std::string, std::string> default_driver;  // BDF -> driver its id matches
  std::vector<std::pair<std::string, std::string>> writes;  // (path under root, value)

 private:
  std::string base_;
};

}  // namespace dmakit::testing
