// PCI devices as sysfs shows them, and moving a device between its kernel
// driver and vfio-pci.
//
// VFIO hands a device to user space per IOMMU group: the group is the
// smallest set of devices the IOMMU can isolate from each other
// (/sys/bus/pci/devices/BDF/iommu_group -> ../../kernel/iommu_groups/N).
// A group is usable ("viable") only when every device in it is bound to
// vfio-pci or to no driver, so these helpers report every member of a group
// and the driver it is bound to.
//
// Binding uses driver_override, the per-device way that does not touch
// other devices with the same vendor/device id:
//   1. remember the current driver,
//   2. write "vfio-pci" to .../BDF/driver_override,
//   3. write BDF to .../drivers/<current>/unbind (when bound),
//   4. write BDF to /sys/bus/pci/drivers_probe (the kernel now picks vfio-pci).
// The original driver is written to a small state file <state_dir>/<BDF>.driver
// (default /run/dmakit, a tmpfs: a reboot forgets it together with the
// binding itself), so `dmakit unbind` in a later process can give the device
// back to the driver it came from. Unbind clears driver_override, unbinds
// from vfio-pci and re-probes, which binds the original driver again (or
// leaves the device without one when it had none).
//
// Every function takes the sysfs root as a parameter ("/sys" in production)
// so tests run against a fake tree of files and symlinks in a temp dir.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.hpp"

namespace dmakit::iommu::pci {

inline constexpr std::string_view kDefaultSysfs = "/sys";
inline constexpr std::string_view kDefaultStateDir = "/run/dmakit";
inline constexpr std::string_view kVfioPci = "vfio-pci";

// A PCI address domain:bus:device.function.
struct Bdf {
  uint16_t domain = 0;
  uint8_t bus = 0;
  uint8_t device = 0;    // 0..31
  uint8_t function = 0;  // 0..7

  // Accepts "0000:00:03.0" and the short form "00:03.0" (domain 0000), hex
  // digits in either case. Anything else is Errc::invalid_argument naming the text.
  static Result<Bdf> parse(std::string_view text);

  // Canonical sysfs spelling "0000:00:03.0".
  std::string str() const;

  bool operator==(const Bdf&) const = default;
};

// A comma-separated device list ("0000:00:03.0,00:05.0"; blanks around
// entries allowed) in canonical form. "" is an empty list; an empty entry,
// a malformed address or one named twice is Errc::invalid_argument.
Result<std::vector<std::string>> parse_bdf_list(std::string_view text);

// One device of an IOMMU group and the driver bound to it ("" = none).
struct GroupMember {
  std::string bdf;
  std::string driver;
};

// /sys/bus/pci/devices/BDF exists; else Errc::not_found naming the path.
Status check_device_exists(const Bdf& bdf, std::string_view sysfs = kDefaultSysfs);

// The IOMMU group number of a device. Errors: no such device (not_found),
// no iommu_group link (not_found: the IOMMU is off, e.g. intel_iommu=on missing).
Result<int> iommu_group(const Bdf& bdf, std::string_view sysfs = kDefaultSysfs);

// The driver bound to a device ("" when none).
Result<std::string> current_driver(const Bdf& bdf, std::string_view sysfs = kDefaultSysfs);

// Every device in IOMMU group N with its driver, sorted by BDF.
Result<std::vector<GroupMember>> group_members(int group, std::string_view sysfs = kDefaultSysfs);

// Every IOMMU group number present in sysfs, sorted (empty when the IOMMU is off).
Result<std::vector<int>> iommu_groups(std::string_view sysfs = kDefaultSysfs);

// "0000:00:03.0 (vfio-pci), 0000:00:03.1 (nvme), 0000:00:03.2 (no driver)".
std::string describe_members(const std::vector<GroupMember>& members);

// /sys/bus/pci/drivers/vfio-pci exists; else not_found saying "modprobe vfio-pci".
Status check_vfio_pci_loaded(std::string_view sysfs = kDefaultSysfs);

struct BindOptions {
  std::string sysfs = std::string(kDefaultSysfs);
  std::string state_dir = std::string(kDefaultStateDir);
  // Called after each successful sysfs write with the file and the value.
  // The kernel reacts to these writes (binding, unbinding); a test tree of
  // plain files does not, so tests play the kernel's part here.
  std::function<void(const std::string& path, std::string_view value)> after_write;
};

struct BindResult {
  std::string bdf;              // canonical form
  int group = -1;               // its IOMMU group
  std::string previous_driver;  // "" = none; what unbind restores
  bool already_bound = false;   // it was bound to vfio-pci before this call
  std::string state_file;       // where previous_driver was recorded
};

// Binds a device to vfio-pci via driver_override (see the file comment).
// Binding a device that is already on vfio-pci succeeds with already_bound
// and keeps an existing state file. Errors name the BDF and the sysfs file:
// malformed BDF, missing device, vfio-pci not loaded, no IOMMU group,
// EACCES/EPERM on sysfs (permission), and a probe that left the device on
// another driver.
Result<BindResult> bind_vfio(std::string_view bdf, const BindOptions& opt = {});

struct UnbindResult {
  std::string bdf;
  std::string restored_driver;  // driver bound after the call ("" = none)
  bool was_bound = false;       // it was on vfio-pci before this call
};

// Returns a device from vfio-pci to the driver recorded by bind_vfio (or to
// whatever driver the kernel probes when no record exists), and removes the
// state file. A device not on vfio-pci is left alone (was_bound = false).
Result<UnbindResult> unbind_vfio(std::string_view bdf, const BindOptions& opt = {});

// Locked-memory budget: VFIO pins every mapped page and charges it to
// RLIMIT_MEMLOCK, unless the process has CAP_IPC_LOCK (root has it).
struct MemlockState {
  bool cap_ipc_lock = false;
  uint64_t soft_limit = 0;  // bytes; UINT64_MAX = unlimited
};

// This process's state (getrlimit + the effective capabilities from capget).
MemlockState current_memlock();

// OK when `need` bytes can be pinned; else Errc::permission with the limit,
// the amount needed and how to raise it.
Status check_memlock(uint64_t need, const MemlockState& state);

}  // namespace dmakit::iommu::pci
