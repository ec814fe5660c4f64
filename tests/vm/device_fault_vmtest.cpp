// The failure point of a device's interrupt eventfds
// (base::fault::Point::device_eventfd), on the real vfio-pci driver in the
// guest: the host has no VFIO device to reach it. A failed eventfd surfaces
// with the vector and the errno text, and leaves no fd and no enabled
// vector behind; the same enable then works.
#include <dirent.h>
#include <gtest/gtest.h>
#include <linux/vfio.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "base/fault_inject.hpp"
#include "core/context.hpp"
#include "core/device.hpp"

namespace dmakit {
namespace {

constexpr const char* kNvme = "0000:00:03.0";

size_t open_fds() {
  size_t n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (::readdir(d) != nullptr) ++n;
    ::closedir(d);
  }
  return n;
}

TEST(DeviceFaults, AFailedInterruptEventfdSurfacesAndLeavesNothingEnabled) {
  core::Config cfg;
  cfg.iommu.backend = "vfio";
  cfg.iommu.devices = kNvme;
  auto ctx = core::Context::create(cfg);
  ASSERT_TRUE(ctx) << ctx.error().what();
  auto dev = (*ctx)->open_device(kNvme);
  ASSERT_TRUE(dev) << dev.error().what();
  const size_t baseline = open_fds();

  for (uint64_t nth : {0ull, 1ull}) {  // the first vector's eventfd, then the second's
    base::fault::Arm arm(base::fault::Point::device_eventfd, nth, EMFILE);
    auto r = (*dev)->irq_enable(VFIO_PCI_MSIX_IRQ_INDEX, 2);
    ASSERT_FALSE(r) << "enable with vector " << nth << "'s eventfd failing";
    EXPECT_EQ(arm.fired(), 1u);
    const std::string msg = r.error().what();
    EXPECT_NE(msg.find("eventfd for MSI-X vector " + std::to_string(nth)), std::string::npos) << msg;
    EXPECT_NE(msg.find(std::strerror(EMFILE)), std::string::npos) << msg;
    EXPECT_NE(msg.find(kNvme), std::string::npos) << msg;
    EXPECT_EQ(open_fds(), baseline) << "an eventfd of the failed enable is still open";
    auto wait = (*dev)->irq_wait(VFIO_PCI_MSIX_IRQ_INDEX, 0, 0);
    EXPECT_FALSE(wait) << "vector 0 is enabled after the failed enable";
  }

  // A failed re-enable ends the vectors that were live: none stays half-set.
  auto live = (*dev)->irq_enable(VFIO_PCI_MSIX_IRQ_INDEX, 2);
  ASSERT_TRUE(live) << live.error().what();
  EXPECT_EQ(open_fds(), baseline + 2);
  {
    base::fault::Arm arm(base::fault::Point::device_eventfd, 1, ENFILE);
    auto again = (*dev)->irq_enable(VFIO_PCI_MSIX_IRQ_INDEX, 2);
    ASSERT_FALSE(again);
    EXPECT_NE(again.error().what().find(std::strerror(ENFILE)), std::string::npos) << again.error().what();
  }
  EXPECT_EQ(open_fds(), baseline);

  // Disarmed, the same enable works and owns exactly its two eventfds.
  auto ok = (*dev)->irq_enable(VFIO_PCI_MSIX_IRQ_INDEX, 2);
  ASSERT_TRUE(ok) << ok.error().what();
  EXPECT_EQ(ok->size(), 2u);
  EXPECT_EQ(open_fds(), baseline + 2);
  ASSERT_TRUE((*dev)->irq_disable(VFIO_PCI_MSIX_IRQ_INDEX));
  EXPECT_EQ(open_fds(), baseline);
}

}  // namespace
}  // namespace dmakit
