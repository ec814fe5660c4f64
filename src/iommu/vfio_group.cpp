// vfio::Group: one IOMMU group, /dev/vfio/N.
#include <fcntl.h>
#include <linux/vfio.h>
#include <sys/ioctl.h>

#include "base/log.hpp"
#include "iommu/vfio.hpp"

namespace dmakit::iommu::vfio {

namespace {

// "0000:00:03.0 (nvme), ..." for error messages; the listing's own failure
// is folded into the text because it only decorates another error.
std::string members_text(int number, const std::string& sysfs) {
  auto members = pci::group_members(number, sysfs);
  if (!members) return "members unknown: " + members.error().what();
  return pci::describe_members(*members);
}

}  // namespace

Group::Group(base::UniqueFd fd, int number, std::string path, std::string sysfs)
    : fd_(std::move(fd)), number_(number), path_(std::move(path)), sysfs_(std::move(sysfs)) {}

Result<Group> Group::open(int number, const Paths& paths) {
  if (number < 0) return fail(Errc::invalid_argument, "IOMMU group number {} is negative", number);
  const std::string path = paths.group(number);
  base::UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd) {
    const int err = errno;
    switch (err) {
      case ENOENT:
        // The node appears once a device of the group is bound to vfio-pci.
        return fail_errno(err, "open {}: IOMMU group {} is not handed to VFIO; its devices: {} "
                          "(bind them with 'dmakit bind BDF')", path, number, members_text(number, paths.sysfs));
      case EBUSY:
        return fail_errno(err, "open {}: IOMMU group {} is already open (VFIO allows one open of a group "
                          "at a time; another process or another object in this one holds it)", path, number);
      case EACCES:
      case EPERM:
        return fail_errno(err, "open {}: no permission for IOMMU group {} (run as root or give "
                          "the user the device node)", path, number);
      default:
        return fail_errno(err, "open {} (IOMMU group {})", path, number);
    }
  }
  Group g(std::move(fd), number, path, paths.sysfs);
  DMAKIT_TRY(g.check_viable());
  return g;
}

Result<Group> Group::open_for_device(std::string_view bdf_text, const Paths& paths) {
  const pci::Bdf bdf = DMAKIT_TRY(pci::Bdf::parse(bdf_text));
  const int number = DMAKIT_TRY(pci::iommu_group(bdf, paths.sysfs));
  auto g = Group::open(number, paths);
  if (!g) return std::unexpected(with_context(std::move(g).error(), "device " + bdf.str()));
  return g;
}

Result<uint32_t> Group::status() const {
  vfio_group_status st{};
  st.argsz = sizeof st;
  if (::ioctl(fd_.get(), VFIO_GROUP_GET_STATUS, &st) != 0)
    return fail_errno(errno, "VFIO_GROUP_GET_STATUS on {}", path_);
  return st.flags;
}

Status Group::check_viable() const {
  // Not viable: some member is bound to a host driver, so handing the group
  // to user space would let our device DMA into memory that driver owns.
  const uint32_t flags = DMAKIT_TRY(status());
  if (flags & VFIO_GROUP_FLAGS_VIABLE) return ok();
  return fail(Errc::not_viable,
              "IOMMU group {} ({}) is not viable: every device in it must be bound to vfio-pci or to no "
              "driver; its devices: {}",
              number_, path_, members_text(number_, sysfs_));
}

Status Group::set_container(const Container& container) {
  if (attached_) return fail(Errc::busy, "{} is already attached to a container", path_);
  // Puts the group's devices behind the container's IOMMU domain.
  int cfd = container.fd();
  if (::ioctl(fd_.get(), VFIO_GROUP_SET_CONTAINER, &cfd) != 0) {
    const int err = errno;
    return fail_errno(err, "VFIO_GROUP_SET_CONTAINER {} -> {}{}", path_, container.path(),
                      err == EINVAL ? " (group not viable, or already in another container)" : "");
  }
  attached_ = true;
  return ok();
}

Status Group::unset_container() {
  if (!attached_) return ok();
  // Last group out also drops the container's IOMMU and all its mappings.
  if (::ioctl(fd_.get(), VFIO_GROUP_UNSET_CONTAINER) != 0)
    return fail_errno(errno, "VFIO_GROUP_UNSET_CONTAINER on {}", path_);
  attached_ = false;
  return ok();
}

Result<Device> Group::open_device(std::string_view bdf_text) const {
  const pci::Bdf bdf = DMAKIT_TRY(pci::Bdf::parse(bdf_text));
  const std::string name = bdf.str();
  if (!attached_)
    return fail(Errc::invalid_argument,
                "open device {} from {}: the group is in no container yet (attach it and set the IOMMU first)",
                name, path_);
  // The kernel matches the name against the group's devices; the fd it
  // returns is the device: regions, config space, reset.
  base::UniqueFd fd(::ioctl(fd_.get(), VFIO_GROUP_GET_DEVICE_FD, name.c_str()));
  if (!fd) {
    const int err = errno;
    return fail_errno(err, "VFIO_GROUP_GET_DEVICE_FD {} on {}{}", name, path_,
                      (err == ENODEV || err == EINVAL) ? " (is the device in this group and bound to vfio-pci?)"
                                                       : "");
  }
  vfio_device_info di{};
  di.argsz = sizeof di;
  if (::ioctl(fd.get(), VFIO_DEVICE_GET_INFO, &di) != 0)
    return fail_errno(errno, "VFIO_DEVICE_GET_INFO on {}", name);
  DeviceInfo info{di.flags, di.num_regions, di.num_irqs};
  if (!info.is_pci() || di.num_regions <= VFIO_PCI_CONFIG_REGION_INDEX)
    return fail(Errc::unsupported, "{}: not a vfio-pci device (flags {:#x}, {} regions)", name, di.flags,
                di.num_regions);
  vfio_region_info cfg{};
  cfg.argsz = sizeof cfg;
  cfg.index = VFIO_PCI_CONFIG_REGION_INDEX;
  if (::ioctl(fd.get(), VFIO_DEVICE_GET_REGION_INFO, &cfg) != 0)
    return fail_errno(errno, "VFIO_DEVICE_GET_REGION_INFO config region of {}", name);
  return Device(std::move(fd), name, info, cfg.offset, cfg.size);
}

}  // namespace dmakit::iommu::vfio
