// PCI sysfs logic and vfio-pci binding against a fake sysfs tree.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include "child_process.hpp"
#include "fake_sysfs.hpp"
#include "iommu/pci.hpp"

namespace dmakit::iommu::pci {
namespace {

using dmakit::testing::count_open_fds;
using dmakit::testing::FakeSysfs;
using ::testing::HasSubstr;

TEST(BdfParse, AcceptsFullAndShortForms) {
  auto full = Bdf::parse("0000:00:03.0");
  ASSERT_TRUE(full) << full.error().what();
  EXPECT_EQ(full->domain, 0);
  EXPECT_EQ(full->bus, 0);
  EXPECT_EQ(full->device, 3);
  EXPECT_EQ(full->function, 0);

  auto short_form = Bdf::parse("00:03.0");
  ASSERT_TRUE(short_form) << short_form.error().what();
  EXPECT_EQ(*short_form, *full);
  EXPECT_EQ(short_form->str(), "0000:00:03.0");

  auto upper = Bdf::parse("00AB:1F:1f.7");
  ASSERT_TRUE(upper) << upper.error().what();
  EXPECT_EQ(upper->domain, 0xab);
  EXPECT_EQ(upper->bus, 0x1f);
  EXPECT_EQ(upper->device, 0x1f);
  EXPECT_EQ(upper->function, 7);
  EXPECT_EQ(upper->str(), "00ab:1f:1f.7");
}

TEST(BdfParse, RefusesMalformedTextNamingIt) {
  for (const char* bad : {"", "0:3.0", "00:03", "00:03.", "0000:00:03:0", "000:00:03.0", "00000:00:03.0",
                          "zz:03.0", "00:0g.0", "00:03.0 ", " 00:03.0", "0000:00:03.0.1", "0000-00:03.0"}) {
    auto r = Bdf::parse(bad);
    ASSERT_FALSE(r) << "accepted '" << bad << "'";
    EXPECT_EQ(r.error().code, Errc::invalid_argument);
    EXPECT_THAT(r.error().message, HasSubstr(std::string("'") + bad + "'"));
    EXPECT_THAT(r.error().message, HasSubstr("malformed PCI address"));
  }
}

TEST(BdfParse, RefusesDeviceAndFunctionOutOfRange) {
  auto dev = Bdf::parse("00:20.0");
  ASSERT_FALSE(dev);
  EXPECT_EQ(dev.error().code, Errc::invalid_argument);
  EXPECT_THAT(dev.error().message, HasSubstr("device 0x20 is above 0x1f"));
  auto fn = Bdf::parse("00:03.8");
  ASSERT_FALSE(fn);
  EXPECT_THAT(fn.error().message, HasSubstr("function 8 is above 7"));
}

class PciSysfs : public ::testing::Test {
 protected:
  void SetUp() override {
    fake.add_driver("vfio-pci");
    fake.add_driver("nvme");
    fake.add_driver("e1000e");
    fake.add_device("0000:00:03.0", 5, "nvme");
    fake.add_device("0000:00:04.0", 6, "e1000e");
    fake.add_device("0000:00:1f.3", 7, "snd_hda_intel");
    fake.add_device("0000:00:1f.0", 7);
    fake.add_device("0000:00:05.0", std::nullopt, "nvme");
    fake.default_driver = {{"0000:00:03.0", "nvme"}, {"0000:00:04.0", "e1000e"}};
    opt.sysfs = fake.root();
    opt.state_dir = fake.state_dir();
    opt.after_write = [this](const std::string& p, std::string_view v) { fake.kernel_write(p, v); };
  }
  Bdf bdf(const char* text) { return *Bdf::parse(text); }
  bool state_exists(const std::string& b) { return std::filesystem::exists(fake.state_dir() + "/" + b + ".driver"); }

  FakeSysfs fake;
  BindOptions opt;
};

TEST_F(PciSysfs, FindsGroupAndDriver) {
  auto g = iommu_group(bdf("00:03.0"), fake.root());
  ASSERT_TRUE(g) << g.error().what();
  EXPECT_EQ(*g, 5);
  auto d = current_driver(bdf("00:03.0"), fake.root());
  ASSERT_TRUE(d) << d.error().what();
  EXPECT_EQ(*d, "nvme");
  auto none = current_driver(bdf("00:1f.0"), fake.root());
  ASSERT_TRUE(none) << none.error().what();
  EXPECT_EQ(*none, "");
}

TEST_F(PciSysfs, MissingDeviceIsNotFoundNamingThePath) {
  auto g = iommu_group(bdf("00:09.0"), fake.root());
  ASSERT_FALSE(g);
  EXPECT_EQ(g.error().code, Errc::not_found);
  EXPECT_THAT(g.error().message, HasSubstr("no PCI device 0000:00:09.0"));
  EXPECT_THAT(g.error().message, HasSubstr(fake.root() + "/bus/pci/devices/0000:00:09.0"));
  auto d = current_driver(bdf("00:09.0"), fake.root());
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().code, Errc::not_found);
}

TEST_F(PciSysfs, DeviceWithoutGroupSaysTheIommuIsOff) {
  auto g = iommu_group(bdf("00:05.0"), fake.root());
  ASSERT_FALSE(g);
  EXPECT_EQ(g.error().code, Errc::not_found);
  EXPECT_THAT(g.error().message, HasSubstr("0000:00:05.0 has no IOMMU group"));
  EXPECT_THAT(g.error().message, HasSubstr("intel_iommu=on"));
}

TEST_F(PciSysfs, ListsGroupMembersWithDrivers) {
  auto m = group_members(7, fake.root());
  ASSERT_TRUE(m) << m.error().what();
  ASSERT_EQ(m->size(), 2u);
  EXPECT_EQ((*m)[0].bdf, "0000:00:1f.0");
  EXPECT_EQ((*m)[0].driver, "");
  EXPECT_EQ((*m)[1].bdf, "0000:00:1f.3");
  EXPECT_EQ((*m)[1].driver, "snd_hda_intel");
  EXPECT_EQ(describe_members(*m), "0000:00:1f.0 (no driver), 0000:00:1f.3 (snd_hda_intel)");

  auto missing = group_members(42, fake.root());
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, Errc::not_found);
  EXPECT_THAT(missing.error().message, HasSubstr("no IOMMU group 42"));

  auto groups = iommu_groups(fake.root());
  ASSERT_TRUE(groups) << groups.error().what();
  EXPECT_EQ(*groups, (std::vector<int>{5, 6, 7}));
  auto no_iommu = iommu_groups(fake.base() + "/nowhere");
  ASSERT_TRUE(no_iommu);
  EXPECT_TRUE(no_iommu->empty());
}

TEST_F(PciSysfs, BindMovesTheDeviceAndRemembersItsDriver) {
  auto r = bind_vfio("00:03.0", opt);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_EQ(r->bdf, "0000:00:03.0");
  EXPECT_EQ(r->group, 5);
  EXPECT_EQ(r->previous_driver, "nvme");
  EXPECT_FALSE(r->already_bound);
  EXPECT_EQ(fake.driver_of("0000:00:03.0"), "vfio-pci");
  EXPECT_EQ(FakeSysfs::read(r->state_file), "nvme\n");
  EXPECT_EQ(FakeSysfs::read(fake.device_path("0000:00:03.0") + "/driver_override"), "vfio-pci");
  const decltype(fake.writes) expect = {
      {"/bus/pci/devices/0000:00:03.0/driver_override", "vfio-pci"},
      {"/bus/pci/drivers/nvme/unbind", "0000:00:03.0"},
      {"/bus/pci/drivers_probe", "0000:00:03.0"}};
  EXPECT_EQ(fake.writes, expect);
  // The other device of the same kind of setup is untouched.
  EXPECT_EQ(fake.driver_of("0000:00:04.0"), "e1000e");
}

TEST_F(PciSysfs, BindOfABoundDeviceChangesNothing) {
  ASSERT_TRUE(bind_vfio("0000:00:03.0", opt));
  fake.writes.clear();
  auto again = bind_vfio("0000:00:03.0", opt);
  ASSERT_TRUE(again) << again.error().what();
  EXPECT_TRUE(again->already_bound);
  EXPECT_EQ(again->previous_driver, "nvme");  // still what unbind will restore
  EXPECT_TRUE(fake.writes.empty());
  EXPECT_EQ(FakeSysfs::read(again->state_file), "nvme\n");
}

TEST_F(PciSysfs, UnbindRestoresTheRecordedDriver) {
  ASSERT_TRUE(bind_vfio("00:03.0", opt));
  fake.writes.clear();
  auto r = unbind_vfio("00:03.0", opt);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_TRUE(r->was_bound);
  EXPECT_EQ(r->restored_driver, "nvme");
  EXPECT_EQ(fake.driver_of("0000:00:03.0"), "nvme");
  EXPECT_FALSE(state_exists("0000:00:03.0"));
  EXPECT_EQ(FakeSysfs::read(fake.device_path("0000:00:03.0") + "/driver_override"), "\n");
  const decltype(fake.writes) expect = {
      {"/bus/pci/devices/0000:00:03.0/driver_override", "\n"},
      {"/bus/pci/drivers/vfio-pci/unbind", "0000:00:03.0"},
      {"/bus/pci/drivers_probe", "0000:00:03.0"}};
  EXPECT_EQ(fake.writes, expect);
}

TEST_F(PciSysfs, UnbindLeavesADeviceThatHadNoDriverWithoutOne) {
  fake.add_device("0000:00:06.0", 8);
  fake.default_driver["0000:00:06.0"] = "e1000e";  // a probe would grab it: unbind must not probe
  auto b = bind_vfio("00:06.0", opt);
  ASSERT_TRUE(b) << b.error().what();
  EXPECT_EQ(b->previous_driver, "");
  auto r = unbind_vfio("00:06.0", opt);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_EQ(r->restored_driver, "");
  EXPECT_EQ(fake.driver_of("0000:00:06.0"), "");
}

TEST_F(PciSysfs, UnbindWithoutRecordLetsTheKernelProbe) {
  fake.set_driver("0000:00:04.0", "vfio-pci");  // bound by someone else, no state file
  auto r = unbind_vfio("00:04.0", opt);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_TRUE(r->was_bound);
  EXPECT_EQ(r->restored_driver, "e1000e");
}

TEST_F(PciSysfs, UnbindAsksTheRecordedDriverWhenTheProbeFindsNone) {
  ASSERT_TRUE(bind_vfio("00:03.0", opt));
  fake.default_driver.erase("0000:00:03.0");  // the probe now binds nothing
  fake.writes.clear();
  auto r = unbind_vfio("00:03.0", opt);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_EQ(r->restored_driver, "nvme");
  ASSERT_FALSE(fake.writes.empty());
  EXPECT_EQ(fake.writes.back().first, "/bus/pci/drivers/nvme/bind");
}

TEST_F(PciSysfs, UnbindOfADeviceNotOnVfioDoesNothing) {
  auto r = unbind_vfio("00:04.0", opt);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_FALSE(r->was_bound);
  EXPECT_EQ(r->restored_driver, "e1000e");
  EXPECT_TRUE(fake.writes.empty());
}

TEST_F(PciSysfs, BindErrorsNameTheProblemAndChangeNothing) {
  const size_t fds = count_open_fds();
  struct Case {
    const char* bdf;
    Errc code;
    const char* text;
    bool unbind_fails;  // unbind needs no IOMMU group, so it passes that case
  };
  for (const Case& c : {Case{"00:03", Errc::invalid_argument, "malformed PCI address '00:03'", true},
                        Case{"00:09.0", Errc::not_found, "no PCI device 0000:00:09.0", true},
                        Case{"00:05.0", Errc::not_found, "0000:00:05.0 has no IOMMU group", false}}) {
    auto r = bind_vfio(c.bdf, opt);
    ASSERT_FALSE(r) << c.bdf;
    EXPECT_EQ(r.error().code, c.code) << r.error().what();
    EXPECT_THAT(r.error().message, HasSubstr(c.text));
    auto u = unbind_vfio(c.bdf, opt);
    if (c.unbind_fails) {
      ASSERT_FALSE(u) << c.bdf;
      EXPECT_EQ(u.error().code, c.code);
      EXPECT_THAT(u.error().message, HasSubstr(c.text));
    } else {
      ASSERT_TRUE(u) << u.error().what();
      EXPECT_FALSE(u->was_bound);
    }
  }
  EXPECT_TRUE(fake.writes.empty());
  EXPECT_FALSE(std::filesystem::exists(fake.state_dir()));
  EXPECT_EQ(count_open_fds(), fds);
}

TEST_F(PciSysfs, BindWithoutVfioPciSaysModprobe) {
  std::filesystem::remove_all(fake.root() + "/bus/pci/drivers/vfio-pci");
  auto r = bind_vfio("00:03.0", opt);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::not_found);
  EXPECT_THAT(r.error().message, HasSubstr("modprobe vfio-pci"));
  EXPECT_THAT(r.error().message, HasSubstr(fake.root() + "/bus/pci/drivers/vfio-pci"));
  EXPECT_EQ(fake.driver_of("0000:00:03.0"), "nvme");
  EXPECT_TRUE(fake.writes.empty());
}

TEST_F(PciSysfs, BindReportsAProbeThatPickedAnotherDriver) {
  // A kernel that ignores driver_override (or a vfio-pci that refuses the
  // device): after the probe the device is back on nvme.
  opt.after_write = [this](const std::string& p, std::string_view v) {
    if (p.ends_with("drivers_probe")) fake.set_driver(std::string(v), "nvme");
    else fake.kernel_write(p, v);
  };
  auto r = bind_vfio("00:03.0", opt);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::io);
  EXPECT_THAT(r.error().message, HasSubstr("on nvme instead of vfio-pci"));
  EXPECT_THAT(r.error().message, HasSubstr("dmakit unbind 0000:00:03.0"));
}

// Runs fn in a child process as user nobody; returns what it reported.
template <class Fn>
std::pair<int, std::string> as_nobody(Fn fn) {
  return testing_child::run_in_child([&fn]() -> std::pair<int, std::string> {
    if (::setresgid(65534, 65534, 65534) != 0 || ::setresuid(65534, 65534, 65534) != 0)
      return {-1, "setresuid failed"};
    return fn();
  });
}

TEST_F(PciSysfs, BindWithoutPermissionSaysSo) {
  ASSERT_EQ(::geteuid(), 0u) << "this test drops from root to nobody; run it as root";
  // nobody may traverse the tree and write the state dir, not the sysfs files.
  ::chmod(fake.base().c_str(), 0755);
  std::filesystem::create_directories(fake.state_dir());
  ::chmod(fake.state_dir().c_str(), 0777);
  auto [code, msg] = as_nobody([this] {
    auto r = bind_vfio("00:03.0", opt);
    if (r) return std::pair<int, std::string>(0, "bound");
    return std::pair<int, std::string>(static_cast<int>(r.error().code), r.error().what());
  });
  EXPECT_EQ(code, static_cast<int>(Errc::permission)) << msg;
  EXPECT_THAT(msg, HasSubstr("driver_override"));
  EXPECT_THAT(msg, HasSubstr("needs root"));
  EXPECT_EQ(fake.driver_of("0000:00:03.0"), "nvme");
}

TEST(Memlock, RootWithCapIpcLockIsExempt) {
  EXPECT_TRUE(check_memlock(1ull << 40, MemlockState{true, 0}));
}

TEST(Memlock, EnoughLimitPasses) {
  EXPECT_TRUE(check_memlock(8 << 20, MemlockState{false, 8 << 20}));
}

TEST(Memlock, TooLowLimitNamesBothAmountsAndTheFix) {
  auto st = check_memlock(64 << 20, MemlockState{false, 8 << 20});
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::permission);
  EXPECT_THAT(st.error().message, HasSubstr("RLIMIT_MEMLOCK is 8192 KiB"));
  EXPECT_THAT(st.error().message, HasSubstr("65536 KiB"));
  EXPECT_THAT(st.error().message, HasSubstr("ulimit -l"));
}

TEST(Memlock, CurrentStateMatchesTheProcess) {
  rlimit rl{};
  ASSERT_EQ(::getrlimit(RLIMIT_MEMLOCK, &rl), 0);
  const auto s = current_memlock();
  if (rl.rlim_cur == RLIM_INFINITY) EXPECT_EQ(s.soft_limit, ~0ull);
  else EXPECT_EQ(s.soft_limit, rl.rlim_cur);
  auto [code, msg] = as_nobody([] {
    // nobody has no capabilities after setresuid drops them.
    return std::pair<int, std::string>(current_memlock().cap_ipc_lock ? 1 : 0, "");
  });
  EXPECT_EQ(code, 0) << msg;
}

}  // namespace
}  // namespace dmakit::iommu::pci

namespace dmakit::iommu::pci {
namespace {

TEST(BdfList, ParsesCommaSeparatedAddressesIntoCanonicalForm) {
  auto none = parse_bdf_list("");
  ASSERT_TRUE(none) << none.error().what();
  EXPECT_TRUE(none->empty());
  auto two = parse_bdf_list(" 00:03.0 ,0000:00:05.0");
  ASSERT_TRUE(two) << two.error().what();
  EXPECT_EQ(*two, (std::vector<std::string>{"0000:00:03.0", "0000:00:05.0"}));
}

TEST(BdfList, RefusesEmptyEntriesDuplicatesAndBadAddresses) {
  for (const char* text : {",", "00:03.0,", ",00:03.0", "00:03.0,,00:04.0"}) {
    auto r = parse_bdf_list(text);
    ASSERT_FALSE(r) << text;
    EXPECT_EQ(r.error().code, Errc::invalid_argument);
    EXPECT_NE(r.error().message.find("empty entry"), std::string::npos) << r.error().message;
  }
  auto dup = parse_bdf_list("00:03.0,0000:00:03.0");
  ASSERT_FALSE(dup);
  EXPECT_NE(dup.error().message.find("0000:00:03.0 is named twice"), std::string::npos) << dup.error().message;
  auto bad = parse_bdf_list("00:03.0,00:3g.0");
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("00:3g.0"), std::string::npos) << bad.error().message;
}

}  // namespace
}  // namespace dmakit::iommu::pci
