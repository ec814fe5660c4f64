// Devices through the public API (dmakit.hpp only), on the real vfio-pci
// driver in the guest: a context's device list, a device handle's regions,
// BAR, config space, bus mastering, reset and interrupt plumbing, and groups
// joining and leaving a domain that has live mappings.
//
// The NVMe controller (00:03.0) and the e1000e NIC (00:04.0) sit in
// different IOMMU groups; the init binds both to vfio-pci.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "dmakit/dmakit.hpp"

namespace {

constexpr const char* kNvme = "0000:00:03.0";
constexpr const char* kNic = "0000:00:04.0";
constexpr uint16_t kPciCommand = 0x04;
constexpr uint16_t kBusMaster = 0x4;
constexpr uint64_t kNvmeCap = 0x00, kNvmeVs = 0x08, kNvmeCc = 0x14;

dmakit::Result<dmakit::Context> vfio_context(const char* devices) {
  dmakit_settings s;
  dmakit_settings_init(&s);
  s.backend = "vfio";
  s.devices = devices;
  return dmakit::Context::create(s);
}

bool has(const dmakit::Error& e, const std::string& part) { return e.what().find(part) != std::string::npos; }

uint16_t command_register(const dmakit::Device& d) {
  auto cmd = d.config_read<uint16_t>(kPciCommand);
  EXPECT_TRUE(cmd) << cmd.error().what();
  return cmd.value_or(0xffff);
}

TEST(Devices, ContextListsItsDevicesAndRefusesASecondOpenOfTheGroup) {
  auto ctx = vfio_context(kNvme);
  ASSERT_TRUE(ctx) << ctx.error().what();
  EXPECT_EQ(ctx->backend(), "vfio-type1v2");
  auto list = ctx->devices();
  ASSERT_TRUE(list) << list.error().what();
  EXPECT_EQ(*list, std::vector<std::string>{kNvme});

  // One process, one holder of a group: a second context cannot take it.
  auto other = vfio_context("00:03.0");
  ASSERT_FALSE(other);
  EXPECT_EQ(other.error().code, dmakit::Errc::busy) << other.error().what();
}

TEST(Devices, RegionsBarConfigSpaceAndBusMaster) {
  auto ctx = vfio_context(kNvme);
  ASSERT_TRUE(ctx) << ctx.error().what();
  auto dev = ctx->open_device("00:03.0");
  ASSERT_TRUE(dev) << dev.error().what();
  EXPECT_EQ(dev->bdf(), kNvme);

  // QEMU's NVMe controller: Red Hat's vendor id, device 0x0010, 16 KiB BAR0.
  auto vendor = dev->config_read<uint16_t>(0);
  auto device = dev->config_read<uint16_t>(2);
  ASSERT_TRUE(vendor && device);
  EXPECT_EQ(*vendor, 0x1b36);
  EXPECT_EQ(*device, 0x0010);

  auto bar0 = dev->region_info(0);
  ASSERT_TRUE(bar0) << bar0.error().what();
  EXPECT_EQ(bar0->size, 16384u);
  EXPECT_EQ(bar0->flags & (DMAKIT_REGION_READ | DMAKIT_REGION_WRITE | DMAKIT_REGION_MMAP),
            DMAKIT_REGION_READ | DMAKIT_REGION_WRITE | DMAKIT_REGION_MMAP);
  auto cfg = dev->region_info(DMAKIT_REGION_CONFIG);
  ASSERT_TRUE(cfg) << cfg.error().what();
  EXPECT_GE(cfg->size, 256u);
  EXPECT_FALSE(dev->region_info(42));

  auto bar = dev->map_bar(0);
  ASSERT_TRUE(bar) << bar.error().what();
  EXPECT_EQ(bar->size(), 16384u);
  const uint64_t cap = bar->read64(kNvmeCap);
  EXPECT_NE(cap, 0u);
  EXPECT_NE(cap, ~uint64_t{0});
  EXPECT_GE(bar->read32(kNvmeVs), 0x10000u) << "VS below NVMe 1.0";
  // A second map is the same mapping.
  auto again = dev->map_bar(0);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->c_bar().base, bar->c_bar().base);
  // Outside the BAR: refused, all ones, nothing touched.
  EXPECT_EQ(bar->read32(16384), 0xffffffffu);
  EXPECT_NE(std::string(dmakit_last_error()).find("outside the 0x4000-byte mapping"), std::string::npos);
  EXPECT_FALSE(dev->map_bar(6));

  ASSERT_TRUE(dev->set_bus_master(true));
  EXPECT_EQ(command_register(*dev) & kBusMaster, kBusMaster);
  ASSERT_TRUE(dev->set_bus_master(false));
  EXPECT_EQ(command_register(*dev) & kBusMaster, 0);
  ASSERT_TRUE(dev->set_bus_master(true));

  // Config space is bounds checked too.
  uint32_t v = 0;
  auto past = dev->config_read(cfg->size, &v, sizeof v);
  ASSERT_FALSE(past);
  EXPECT_TRUE(has(past.error(), "outside")) << past.error().what();

  // Closing stops the device: bus mastering is off for whoever opens it next.
  *dev = dmakit::Device();
  auto reopened = ctx->open_device(kNvme);
  ASSERT_TRUE(reopened) << reopened.error().what();
  EXPECT_EQ(command_register(*reopened) & kBusMaster, 0);
}

TEST(Devices, ResetPutsRegistersBackToTheirResetValues) {
  auto ctx = vfio_context(kNvme);
  ASSERT_TRUE(ctx) << ctx.error().what();
  auto dev = ctx->open_device(kNvme);
  ASSERT_TRUE(dev) << dev.error().what();
  auto bar = dev->map_bar(0);
  ASSERT_TRUE(bar) << bar.error().what();
  ASSERT_TRUE(dev->set_bus_master(true));
  // CC's queue entry sizes (IOSQES 6, IOCQES 4) with EN still 0: kept by
  // the controller, cleared by a function reset.
  constexpr uint32_t kEntrySizes = 0x00460000;
  bar->write32(kNvmeCc, kEntrySizes);
  ASSERT_EQ(bar->read32(kNvmeCc), kEntrySizes);
  auto st = dev->reset();
  ASSERT_TRUE(st) << st.error().what();
  EXPECT_EQ(bar->read32(kNvmeCc), 0u) << "the BAR mapping stays valid and shows the reset value";
}

TEST(Devices, InterruptsEnableMaskAndTearDown) {
  auto ctx = vfio_context(kNvme);
  ASSERT_TRUE(ctx) << ctx.error().what();
  auto dev = ctx->open_device(kNvme);
  ASSERT_TRUE(dev) << dev.error().what();

  auto msix = dev->irq_count(dmakit::IrqType::msix);
  ASSERT_TRUE(msix) << msix.error().what();
  ASSERT_GE(*msix, 2u);
  auto intx = dev->irq_count(dmakit::IrqType::intx);
  ASSERT_TRUE(intx) << intx.error().what();
  EXPECT_EQ(*intx, 1u);

  auto too_many = dev->irq_enable(dmakit::IrqType::msix, *msix + 1);
  ASSERT_FALSE(too_many);
  EXPECT_TRUE(has(too_many.error(), "the device offers")) << too_many.error().what();

  auto fds = dev->irq_enable(dmakit::IrqType::msix, 2);
  ASSERT_TRUE(fds) << fds.error().what();
  ASSERT_EQ(fds->size(), 2u);
  EXPECT_GE((*fds)[0], 0);
  EXPECT_NE((*fds)[0], (*fds)[1]);
  // One kind at a time.
  auto both = dev->irq_enable(dmakit::IrqType::intx, 1);
  ASSERT_FALSE(both);
  EXPECT_EQ(both.error().code, dmakit::Errc::busy) << both.error().what();

  // Nothing raised an interrupt: a bounded wait times out.
  auto none = dev->irq_wait(dmakit::IrqType::msix, 0, 20);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, dmakit::Errc::timeout) << none.error().what();
  EXPECT_FALSE(dev->irq_wait(dmakit::IrqType::msix, 2, 0)) << "vector 2 was not enabled";

  ASSERT_TRUE(dev->irq_mask(dmakit::IrqType::msix, 1));
  ASSERT_TRUE(dev->irq_mask(dmakit::IrqType::msix, 1));  // idempotent
  ASSERT_TRUE(dev->irq_unmask(dmakit::IrqType::msix, 1));
  ASSERT_TRUE(dev->irq_disable(dmakit::IrqType::msix));
  auto gone = dev->irq_wait(dmakit::IrqType::msix, 0, 0);
  ASSERT_FALSE(gone);
  EXPECT_TRUE(has(gone.error(), "not enabled")) << gone.error().what();

  // INTx: VFIO's own mask and unmask.
  auto line = dev->irq_enable(dmakit::IrqType::intx, 1);
  ASSERT_TRUE(line) << line.error().what();
  ASSERT_TRUE(dev->irq_mask(dmakit::IrqType::intx, 0));
  ASSERT_TRUE(dev->irq_unmask(dmakit::IrqType::intx, 0));
  ASSERT_TRUE(dev->irq_disable(dmakit::IrqType::intx));
  EXPECT_FALSE(dev->irq_disable(dmakit::IrqType::intx));

  // Enabled again, then the device closes with them on: close turns them off
  // (a new open can enable MSI-X at once).
  ASSERT_TRUE(dev->irq_enable(dmakit::IrqType::msix, 1));
  *dev = dmakit::Device();
  auto again = ctx->open_device(kNvme);
  ASSERT_TRUE(again) << again.error().what();
  auto fd2 = again->irq_enable(dmakit::IrqType::msix, 1);
  EXPECT_TRUE(fd2) << fd2.error().what();
}

// MSI (the NVMe model offers MSI-X only; the 82574L has both).
TEST(Devices, MsiIsEnabledMaskedAndTornDownOnTheNic) {
  auto ctx = vfio_context(kNic);
  ASSERT_TRUE(ctx) << ctx.error().what();
  auto nic = ctx->open_device(kNic);
  ASSERT_TRUE(nic) << nic.error().what();
  auto n = nic->irq_count(dmakit::IrqType::msi);
  ASSERT_TRUE(n) << n.error().what();
  ASSERT_GE(*n, 1u);
  auto fds = nic->irq_enable(dmakit::IrqType::msi, 1);
  ASSERT_TRUE(fds) << fds.error().what();
  EXPECT_GE((*fds)[0], 0);
  auto other = nic->irq_enable(dmakit::IrqType::msix, 1);
  ASSERT_FALSE(other);
  EXPECT_EQ(other.error().code, dmakit::Errc::busy) << other.error().what();
  ASSERT_TRUE(nic->irq_mask(dmakit::IrqType::msi, 0));
  ASSERT_TRUE(nic->irq_unmask(dmakit::IrqType::msi, 0));
  auto quiet = nic->irq_wait(dmakit::IrqType::msi, 0, 20);
  ASSERT_FALSE(quiet);
  EXPECT_EQ(quiet.error().code, dmakit::Errc::timeout);
  ASSERT_TRUE(nic->irq_disable(dmakit::IrqType::msi));
  // Off again: MSI-X can be enabled now.
  auto msix = nic->irq_enable(dmakit::IrqType::msix, 1);
  EXPECT_TRUE(msix) << msix.error().what();
}

TEST(Devices, GroupsJoinAndLeaveWhileMappingsExist) {
  auto ctx = vfio_context(kNvme);
  ASSERT_TRUE(ctx) << ctx.error().what();
  auto buf = ctx->alloc_buffer(64 << 10);
  ASSERT_TRUE(buf) << buf.error().what();
  auto before = ctx->stats();
  ASSERT_TRUE(before);

  ASSERT_TRUE(ctx->attach(kNic));
  ASSERT_TRUE(ctx->attach("00:04.0"));  // attached already: nothing to do
  auto list = ctx->devices();
  ASSERT_TRUE(list);
  EXPECT_EQ(*list, (std::vector<std::string>{kNvme, kNic}));

  // The NIC (Intel 82574L) opens in the same domain; the buffer mapped
  // before it joined is still one mapping of the one container.
  auto nic = ctx->open_device(kNic);
  ASSERT_TRUE(nic) << nic.error().what();
  EXPECT_EQ(nic->config_read<uint16_t>(0).value_or(0), 0x8086);
  EXPECT_EQ(nic->config_read<uint16_t>(2).value_or(0), 0x10d3);
  auto t = ctx->vtophys(buf->vaddr());
  ASSERT_TRUE(t) << t.error().what();
  EXPECT_EQ(t->iova, buf->iova());

  auto busy = ctx->detach(kNic);
  ASSERT_FALSE(busy);
  EXPECT_EQ(busy.error().code, dmakit::Errc::busy);
  EXPECT_TRUE(has(busy.error(), "is open")) << busy.error().what();
  *nic = dmakit::Device();
  auto st = ctx->detach(kNic);
  ASSERT_TRUE(st) << st.error().what();
  list = ctx->devices();
  ASSERT_TRUE(list);
  EXPECT_EQ(*list, std::vector<std::string>{kNvme});
  auto not_attached = ctx->detach(kNic);
  ASSERT_FALSE(not_attached);
  EXPECT_EQ(not_attached.error().code, dmakit::Errc::not_found);

  // The last group keeps the domain (and the buffer's mapping) alive.
  auto last = ctx->detach(kNvme);
  ASSERT_FALSE(last);
  EXPECT_EQ(last.error().code, dmakit::Errc::busy);
  EXPECT_TRUE(has(last.error(), "last group")) << last.error().what();
  auto after = ctx->stats();
  ASSERT_TRUE(after);
  EXPECT_EQ(after->mappings, before->mappings);
  EXPECT_EQ(after->mapped_bytes, before->mapped_bytes);

  // Opening a device of a group not yet attached attaches it.
  auto nic2 = ctx->open_device(kNic);
  ASSERT_TRUE(nic2) << nic2.error().what();
  list = ctx->devices();
  ASSERT_TRUE(list);
  EXPECT_EQ(list->size(), 2u);
}

TEST(Devices, BadAddressesAreNamed) {
  auto ctx = vfio_context(kNvme);
  ASSERT_TRUE(ctx) << ctx.error().what();
  auto typo = ctx->open_device("00:03.9");
  ASSERT_FALSE(typo);
  EXPECT_TRUE(has(typo.error(), "00:03.9")) << typo.error().what();
  auto missing = ctx->attach("0000:00:1d.0");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, dmakit::Errc::not_found) << missing.error().what();
  EXPECT_TRUE(has(missing.error(), "0000:00:1d.0")) << missing.error().what();
}

}  // namespace
