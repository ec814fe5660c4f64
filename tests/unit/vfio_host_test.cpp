// The VFIO layer on a host without VFIO, and against fake device nodes and
// a fake sysfs: every failure is a clear error naming the object, no fd leaks.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "fake_sysfs.hpp"
#include "iommu/vfio.hpp"

namespace dmakit::iommu::vfio {
namespace {

using dmakit::testing::count_open_fds;
using dmakit::testing::FakeSysfs;
using ::testing::HasSubstr;

class VfioHost : public ::testing::Test {
 protected:
  void SetUp() override {
    fake.add_driver("vfio-pci");
    fake.add_driver("nvme");
    fake.add_device("0000:00:03.0", 5, "nvme");
    fake.add_device("0000:00:04.0", 6, "vfio-pci");
    fake.add_device("0000:00:05.0", std::nullopt, "nvme");
    paths.sysfs = fake.root();
    paths.dev = fake.dev_dir();
    std::filesystem::create_directories(paths.dev);
    fds = count_open_fds();
  }
  void TearDown() override { EXPECT_EQ(count_open_fds(), fds) << "an error path leaked a file descriptor"; }

  // A regular file where the kernel would have a VFIO character device.
  void fake_node(const std::string& name) { std::ofstream(paths.dev + "/" + name) << "not a device\n"; }

  FakeSysfs fake;
  Paths paths;
  size_t fds = 0;
};

TEST(VfioHostDefault, ContainerOpenMatchesThisMachine) {
  const size_t fds = count_open_fds();
  auto c = Container::open();
  if (std::filesystem::exists("/dev/vfio/vfio")) {
    EXPECT_TRUE(c) << c.error().what();
  } else {
    ASSERT_FALSE(c);
    EXPECT_EQ(c.error().code, Errc::not_found);
    EXPECT_EQ(c.error().sys_errno, ENOENT);
    EXPECT_THAT(c.error().message, HasSubstr("/dev/vfio/vfio"));
    EXPECT_THAT(c.error().message, HasSubstr("iommu.backend=sim"));
  }
  c = std::unexpected(Error{});
  EXPECT_EQ(count_open_fds(), fds);
}

TEST_F(VfioHost, ContainerOpenNamesTheMissingNode) {
  auto c = Container::open(paths);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code, Errc::not_found);
  EXPECT_THAT(c.error().message, HasSubstr(paths.dev + "/vfio"));
  EXPECT_THAT(c.error().what(), HasSubstr("No such file or directory"));
}

TEST_F(VfioHost, ContainerOnANonVfioFileFailsAtTheApiVersion) {
  fake_node("vfio");
  auto c = Container::open(paths);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().sys_errno, ENOTTY);
  EXPECT_EQ(c.error().code, Errc::unsupported);
  EXPECT_THAT(c.error().message, HasSubstr("VFIO_GET_API_VERSION on " + paths.dev + "/vfio"));
}

TEST_F(VfioHost, MissingGroupNodeListsTheGroupsDevices) {
  auto g = Group::open(5, paths);
  ASSERT_FALSE(g);
  EXPECT_EQ(g.error().code, Errc::not_found);
  EXPECT_THAT(g.error().message, HasSubstr(paths.dev + "/5"));
  EXPECT_THAT(g.error().message, HasSubstr("0000:00:03.0 (nvme)"));
  EXPECT_THAT(g.error().message, HasSubstr("dmakit bind"));
}

TEST_F(VfioHost, GroupOnANonVfioFileFailsAtGetStatus) {
  fake_node("6");
  auto g = Group::open(6, paths);
  ASSERT_FALSE(g);
  EXPECT_EQ(g.error().sys_errno, ENOTTY);
  EXPECT_THAT(g.error().message, HasSubstr("VFIO_GROUP_GET_STATUS on " + paths.dev + "/6"));
}

TEST_F(VfioHost, GroupNumberMustNotBeNegative) {
  auto g = Group::open(-1, paths);
  ASSERT_FALSE(g);
  EXPECT_EQ(g.error().code, Errc::invalid_argument);
  EXPECT_THAT(g.error().message, HasSubstr("-1"));
}

TEST_F(VfioHost, GroupForDeviceResolvesThroughSysfs) {
  auto bad = Group::open_for_device("0000:00:3.0", paths);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::invalid_argument);
  EXPECT_THAT(bad.error().message, HasSubstr("'0000:00:3.0'"));

  auto missing = Group::open_for_device("00:09.0", paths);
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, Errc::not_found);
  EXPECT_THAT(missing.error().message, HasSubstr("no PCI device 0000:00:09.0"));

  auto no_group = Group::open_for_device("00:05.0", paths);
  ASSERT_FALSE(no_group);
  EXPECT_THAT(no_group.error().message, HasSubstr("has no IOMMU group"));

  // Found in sysfs (group 6), but no /dev/vfio/6 here: the error names both.
  auto no_node = Group::open_for_device("00:04.0", paths);
  ASSERT_FALSE(no_node);
  EXPECT_EQ(no_node.error().code, Errc::not_found);
  EXPECT_THAT(no_node.error().message, HasSubstr("device 0000:00:04.0"));
  EXPECT_THAT(no_node.error().message, HasSubstr(paths.dev + "/6"));
}

TEST_F(VfioHost, DomainOpenChecksDevicesBeforeTheContainer) {
  auto none = VfioDomain::open(std::span<const std::string>{}, paths);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, Errc::invalid_argument);
  EXPECT_THAT(none.error().message, HasSubstr("iommu.devices"));

  auto bad = VfioDomain::open("03.0", paths);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::invalid_argument);
  EXPECT_THAT(bad.error().message, HasSubstr("'03.0'"));

  const std::string two[] = {"00:04.0", "00:09.0"};
  auto missing = VfioDomain::open(two, paths);
  ASSERT_FALSE(missing);
  EXPECT_THAT(missing.error().message, HasSubstr("no PCI device 0000:00:09.0"));

  auto no_vfio = VfioDomain::open("00:04.0", paths);
  ASSERT_FALSE(no_vfio);
  EXPECT_THAT(no_vfio.error().message, HasSubstr(paths.dev + "/vfio"));
}

TEST_F(VfioHost, ProbeListsGroupsAndSaysWhyVfioIsMissing) {
  auto r = probe_vfio(paths);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_FALSE(r->present);
  EXPECT_THAT(r->reason, HasSubstr(paths.dev + "/vfio"));
  ASSERT_EQ(r->groups.size(), 2u);
  EXPECT_EQ(r->groups[0].number, 5);
  ASSERT_EQ(r->groups[0].members.size(), 1u);
  EXPECT_EQ(r->groups[0].members[0].bdf, "0000:00:03.0");
  EXPECT_EQ(r->groups[0].members[0].driver, "nvme");
  EXPECT_FALSE(r->groups[0].all_vfio);
  EXPECT_EQ(r->groups[1].number, 6);
  EXPECT_TRUE(r->groups[1].all_vfio);
  EXPECT_FALSE(r->groups[1].iommu.has_value());  // no container to read it from
}

TEST_F(VfioHost, ProbeOfAMachineWithoutIommuHasNoGroups) {
  Paths bare = paths;
  bare.sysfs = fake.base() + "/empty-sys";
  auto r = probe_vfio(bare);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_FALSE(r->present);
  EXPECT_TRUE(r->groups.empty());
}

}  // namespace
}  // namespace dmakit::iommu::vfio
