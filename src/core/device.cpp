#include "core/device.hpp"

#include <linux/vfio.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>

#include "base/fault_inject.hpp"
#include "base/log.hpp"

namespace dmakit::core {

namespace {

Status check_kind(const std::string& bdf, uint32_t type) {
  if (type > VFIO_PCI_MSIX_IRQ_INDEX)
    return fail(Errc::invalid_argument, "{}: interrupt type {} is not INTx (0), MSI (1) or MSI-X (2)", bdf, type);
  return ok();
}

}  // namespace

Device::Device(iommu::vfio::Device dev, int group) : dev_(std::move(dev)), group_(group) {}

Device::~Device() { stop(); }

void Device::stop() noexcept {
  {
    std::lock_guard lock(irq_mu_);
    if (auto st = disable_locked(); !st) base::log().warn("closing {}: {}", bdf(), st.error().what());
  }
  // After this the device can reach no IOVA, whatever its state.
  if (auto st = dev_.disable_bus_master(); !st) base::log().warn("closing {}: {}", bdf(), st.error().what());
}

Result<const iommu::vfio::BarMapping*> Device::map_bar(uint32_t bar) {
  std::lock_guard lock(bars_mu_);
  if (auto it = bars_.find(bar); it != bars_.end()) return &it->second;
  auto m = DMAKIT_TRY(dev_.map_bar(bar));
  auto [it, inserted] = bars_.emplace(bar, std::move(m));
  return &it->second;
}

Status Device::set_bus_master(bool enable) const {
  return enable ? dev_.enable_bus_master() : dev_.disable_bus_master();
}

Status Device::reset() {
  {
    std::lock_guard lock(irq_mu_);
    DMAKIT_TRY(disable_locked());
  }
  return dev_.reset();
}

Result<uint32_t> Device::irq_count(uint32_t type) const {
  DMAKIT_TRY(check_kind(bdf(), type));
  const auto info = DMAKIT_TRY(dev_.irq_info(type));
  return info.count;
}

Result<std::vector<int>> Device::irq_enable(uint32_t type, uint32_t count) {
  DMAKIT_TRY(check_kind(bdf(), type));
  const auto info = DMAKIT_TRY(dev_.irq_info(type));
  if (count == 0 || count > info.count)
    return fail(Errc::invalid_argument, "{}: {} vectors asked for {}, the device offers {}", bdf(), count,
                iommu::vfio::irq_name(type), info.count);
  if ((info.flags & VFIO_IRQ_INFO_EVENTFD) == 0)
    return fail(Errc::unsupported, "{}: VFIO cannot signal {} through an eventfd", bdf(), iommu::vfio::irq_name(type));
  std::lock_guard lock(irq_mu_);
  if (irq_type_ >= 0 && static_cast<uint32_t>(irq_type_) != type)
    return fail(Errc::busy, "{}: {} is enabled; disable it before enabling {}", bdf(),
                iommu::vfio::irq_name(static_cast<uint32_t>(irq_type_)), iommu::vfio::irq_name(type));
  // Re-enabling the same kind starts over with fresh vectors.
  DMAKIT_TRY(disable_locked());
  std::vector<base::UniqueFd> fds;
  std::vector<int32_t> raw;
  fds.reserve(count);
  raw.reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    // Non-blocking: irq_wait polls first and never stalls in read().
    const int injected = base::fault::inject(base::fault::Point::device_eventfd);
    base::UniqueFd fd(injected != 0 ? -1 : ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!fd)
      return fail_errno(injected != 0 ? injected : errno, "{}: eventfd for {} vector {}", bdf(),
                        iommu::vfio::irq_name(type), i);
    raw.push_back(fd.get());
    fds.push_back(std::move(fd));
  }
  // Everything the success needs is allocated before the kernel is told:
  // nothing may fail once the vectors are live.
  std::vector<bool> masked(count, false);
  std::vector<int> out(raw.begin(), raw.end());
  DMAKIT_TRY(dev_.set_irq_eventfds(type, 0, raw));
  irq_type_ = static_cast<int>(type);
  efds_ = std::move(fds);
  masked_ = std::move(masked);
  return out;
}

Status Device::disable_locked() {
  if (irq_type_ < 0) return ok();
  const auto type = static_cast<uint32_t>(irq_type_);
  irq_type_ = -1;
  // The kernel lets go of the eventfds before they are closed here.
  auto st = dev_.disable_irqs(type);
  efds_.clear();
  masked_.clear();
  return st;
}

Status Device::irq_disable(uint32_t type) {
  DMAKIT_TRY(check_kind(bdf(), type));
  std::lock_guard lock(irq_mu_);
  if (irq_type_ != static_cast<int>(type))
    return fail(Errc::not_found, "{}: {} is not enabled", bdf(), iommu::vfio::irq_name(type));
  return disable_locked();
}

Status Device::check_enabled(uint32_t type, uint32_t vector, const char* what) const {
  DMAKIT_TRY(check_kind(bdf(), type));
  if (irq_type_ != static_cast<int>(type))
    return fail(Errc::invalid_argument, "{}: {} of {} vector {}: {} is not enabled", bdf(), what, iommu::vfio::irq_name(type),
                vector, iommu::vfio::irq_name(type));
  if (vector >= efds_.size())
    return fail(Errc::invalid_argument, "{}: {} of {} vector {}: only {} vectors are enabled", bdf(), what,
                iommu::vfio::irq_name(type), vector, efds_.size());
  return ok();
}

Status Device::irq_mask(uint32_t type, uint32_t vector, bool masked) {
  std::lock_guard lock(irq_mu_);
  DMAKIT_TRY(check_enabled(type, vector, masked ? "mask" : "unmask"));
  if (type == VFIO_PCI_INTX_IRQ_INDEX) return dev_.mask_irq(type, vector, masked);
  // vfio-pci has no mask for MSI/MSI-X: take the vector's eventfd away and
  // give it back. The vector stays allocated; what fires in between is lost.
  if (masked_[vector] == masked) return ok();
  const int32_t fd = masked ? -1 : efds_[vector].get();
  DMAKIT_TRY(dev_.set_irq_eventfds(type, vector, std::span(&fd, 1)));
  masked_[vector] = masked;
  return ok();
}

Result<uint64_t> Device::irq_wait(uint32_t type, uint32_t vector, int timeout_ms) const {
  int fd;
  {
    std::lock_guard lock(irq_mu_);
    DMAKIT_TRY(check_enabled(type, vector, "wait"));
    fd = efds_[vector].get();
  }
  pollfd p{fd, POLLIN, 0};
  for (;;) {
    const int n = ::poll(&p, 1, timeout_ms);
    if (n < 0 && errno == EINTR) continue;  // a signal of the application's: keep waiting
    if (n < 0) return fail_errno(errno, "{}: poll on the eventfd of {} vector {}", bdf(), iommu::vfio::irq_name(type), vector);
    if (n == 0)
      return fail(Errc::timeout, "{}: no {} interrupt on vector {} within {} ms", bdf(), iommu::vfio::irq_name(type), vector,
                  timeout_ms);
    uint64_t count = 0;
    if (::read(fd, &count, sizeof count) == static_cast<ssize_t>(sizeof count)) return count;
    if (errno != EAGAIN && errno != EINTR)
      return fail_errno(errno, "{}: read of the eventfd of {} vector {}", bdf(), iommu::vfio::irq_name(type), vector);
  }
}

}  // namespace dmakit::core
