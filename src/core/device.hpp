// core::Device: a PCI function a driver drives, opened in a Context's IOMMU
// domain. Owns the VFIO device fd, its BAR mappings and its interrupt
// eventfds. What it adds to vfio::Device is the lifecycle a driver needs:
// BARs mapped once and kept, one interrupt kind enabled at a time with
// eventfds it creates, and a close that first stops the device (interrupts
// off, bus mastering off) so no DMA or interrupt outlives the handle.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "base/fd.hpp"
#include "iommu/vfio.hpp"

namespace dmakit::core {

class Device {
 public:
  Device(iommu::vfio::Device dev, int group);
  ~Device();  // stop(), then the BARs are unmapped and the fd closed
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  const std::string& bdf() const { return dev_.bdf(); }
  int group() const { return group_; }
  const iommu::vfio::Device& vfio() const { return dev_; }

  Result<iommu::vfio::RegionInfo> region_info(uint32_t index) const { return dev_.region_info(index); }

  // The whole BAR, mapped on first use and kept until the device closes.
  Result<const iommu::vfio::BarMapping*> map_bar(uint32_t bar);

  Status config_read(uint64_t off, std::span<std::byte> out) const { return dev_.read_config(off, out); }
  Status config_write(uint64_t off, std::span<const std::byte> in) const { return dev_.write_config(off, in); }
  Status set_bus_master(bool enable) const;

  // Interrupts off, then VFIO_DEVICE_RESET.
  Status reset();

  // Interrupts. type is a VFIO IRQ index (INTx 0, MSI 1, MSI-X 2).
  Result<uint32_t> irq_count(uint32_t type) const;
  // Enables vectors [0, count) of type with fresh eventfds; returns them
  // (owned here). Errc::busy while another type is enabled.
  Result<std::vector<int>> irq_enable(uint32_t type, uint32_t count);
  Status irq_disable(uint32_t type);
  Status irq_mask(uint32_t type, uint32_t vector, bool masked);
  // Interrupts counted on vector's eventfd, waiting up to timeout_ms (-1 =
  // no limit); Errc::timeout when none came.
  Result<uint64_t> irq_wait(uint32_t type, uint32_t vector, int timeout_ms) const;

  // Interrupts off, bus mastering off; errors are logged. Idempotent.
  void stop() noexcept;

 private:
  Status check_enabled(uint32_t type, uint32_t vector, const char* what) const;
  Status disable_locked();

  iommu::vfio::Device dev_;
  int group_ = -1;
  std::mutex bars_mu_;
  std::map<uint32_t, iommu::vfio::BarMapping> bars_;  // by BAR index; node addresses are stable

  mutable std::mutex irq_mu_;
  int irq_type_ = -1;                  // the enabled kind, -1 = none
  std::vector<base::UniqueFd> efds_;   // one per enabled vector
  std::vector<bool> masked_;           // MSI/MSI-X vectors whose eventfd is detached
};

}  // namespace dmakit::core
