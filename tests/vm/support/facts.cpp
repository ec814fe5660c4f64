#include "facts.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "iommu/vfio.hpp"

namespace dmakit::vmtest {

namespace fs = std::filesystem;

namespace {

constexpr const char* kPciDevices = "/sys/bus/pci/devices";
constexpr const char* kVfioPci = "/sys/bus/pci/drivers/vfio-pci";

// "0000:00:03.0": what sysfs names PCI functions (driver directories also
// hold files such as "bind" and "new_id").
bool looks_like_bdf(const std::string& name) {
  return name.size() == 12 && name[4] == ':' && name[7] == ':' && name[10] == '.';
}

std::string driver_of(const std::string& bdf) {
  std::error_code ec;
  const fs::path link = fs::read_symlink(fs::path(kPciDevices) / bdf / "driver", ec);
  return ec ? "" : link.filename().string();
}

Result<int> group_number(const std::string& bdf) {
  std::error_code ec;
  const fs::path link = fs::read_symlink(fs::path(kPciDevices) / bdf / "iommu_group", ec);
  if (ec) return fail(Errc::not_found, "{} has no iommu_group link: {}", bdf, ec.message());
  char* end = nullptr;
  const std::string name = link.filename().string();
  const long n = std::strtol(name.c_str(), &end, 10);
  if (end == name.c_str() || *end != '\0') return fail(Errc::corrupted, "iommu_group of {} is '{}'", bdf, name);
  return static_cast<int>(n);
}

Result<GuestGroup> read_group(int number) {
  GuestGroup g;
  g.number = number;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(fmt::format("/sys/kernel/iommu_groups/{}/devices", number), ec))
    g.members.push_back(e.path().filename().string());
  if (ec) return fail(Errc::not_found, "IOMMU group {}: {}", number, ec.message());
  std::sort(g.members.begin(), g.members.end());
  g.all_vfio = !g.members.empty() &&
               std::all_of(g.members.begin(), g.members.end(), [](const auto& m) { return driver_of(m) == "vfio-pci"; });
  return g;
}

// A whole file's first line, or "".
std::string first_line(const fs::path& p) {
  std::ifstream in(p);
  std::string line;
  std::getline(in, line);
  return line;
}

// The first Intel IOMMU's capability register, from sysfs (hex text).
std::optional<uint64_t> dmar_cap() {
  std::error_code ec;
  std::vector<fs::path> units;
  for (const auto& e : fs::directory_iterator("/sys/class/iommu", ec)) units.push_back(e.path());
  std::sort(units.begin(), units.end());
  for (const auto& u : units) {
    const std::string text = first_line(u / "intel-iommu" / "cap");
    if (text.empty()) continue;
    char* end = nullptr;
    errno = 0;
    const unsigned long long cap = std::strtoull(text.c_str(), &end, 16);
    if (end != text.c_str() && errno == 0) return cap;
  }
  return std::nullopt;
}

Status read_meminfo(GuestFacts& f) {
  std::ifstream in("/proc/meminfo");
  if (!in) return fail_errno(errno, "open /proc/meminfo");
  std::string key;
  uint64_t value = 0;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    if (!(ls >> key >> value)) continue;
    if (key == "HugePages_Total:") f.hugepages_total = value;
    if (key == "HugePages_Free:") f.hugepages_free = value;
    if (key == "Hugepagesize:") f.hugepage_kb = value;
  }
  return ok();
}

// The IOMMU as VFIO reports it for one viable group, through a container
// that is closed again before returning.
Status read_iommu(GuestFacts& f) {
  const GuestGroup* pick = nullptr;
  for (const auto& g : f.groups)
    if (g.all_vfio) {
      pick = &g;
      break;
    }
  if (pick == nullptr) return ok();
  auto container = iommu::vfio::Container::open();
  if (!container) return std::unexpected(container.error());
  auto group = iommu::vfio::Group::open_for_device(pick->members.front());
  if (!group) return std::unexpected(group.error());
  DMAKIT_TRY((*container)->attach(*group));
  f.iommu = (*container)->info();
  if (!f.iommu.windows.empty()) f.address_bits = static_cast<uint32_t>(std::bit_width(f.iommu.windows.back().last));
  return ok();
}

}  // namespace

bool GuestFacts::bound(std::string_view bdf) const {
  return std::find(vfio_devices.begin(), vfio_devices.end(), bdf) != vfio_devices.end();
}

const GuestGroup* GuestFacts::group_of(std::string_view bdf) const {
  for (const auto& g : groups)
    if (std::find(g.members.begin(), g.members.end(), bdf) != g.members.end()) return &g;
  return nullptr;
}

std::string GuestFacts::other_usable_device(std::string_view bdf) const {
  const GuestGroup* mine = group_of(bdf);
  for (const auto& d : vfio_devices) {
    const GuestGroup* g = group_of(d);
    if (g != nullptr && g != mine && g->all_vfio) return d;
  }
  return "";
}

uint64_t GuestFacts::iova_last() const { return iommu.windows.empty() ? 0 : iommu.windows.back().last; }

std::optional<iommu::IovaWindow> GuestFacts::msi_hole() const {
  for (size_t i = 1; i < iommu.windows.size(); ++i) {
    const iommu::IovaWindow gap{iommu.windows[i - 1].last + 1, iommu.windows[i].start - 1};
    if (gap.start <= kX86MsiFirst && gap.last >= kX86MsiLast) return gap;
  }
  return std::nullopt;
}

std::string GuestFacts::str() const {
  std::string s = "guest facts:\n  on vfio-pci:";
  for (const auto& d : vfio_devices) s += " " + d;
  if (vfio_devices.empty()) s += " none";
  for (const auto& g : groups) {
    s += fmt::format("\n  group {}{}:", g.number, g.all_vfio ? "" : " (not all on vfio-pci)");
    for (const auto& m : g.members) s += " " + m;
  }
  s += fmt::format("\n  VFIO IOMMU: {} page sizes {:#x}, {}-bit, windows", iommu.backend, iommu.page_sizes,
                   address_bits);
  for (const auto& w : iommu.windows) s += fmt::format(" {:#x}-{:#x}", w.start, w.last);
  s += fmt::format("\n  DMAR capability: {}-bit (MGAW), page sizes {:#x}; dma_entry_limit {}", dmar_address_bits,
                   dmar_page_sizes, dma_entry_limit);
  s += fmt::format("\n  hugepages of {} KiB: {} total, {} free", hugepage_kb, hugepages_total, hugepages_free);
  return s;
}

Result<GuestFacts> read_guest_facts() {
  GuestFacts f;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(kVfioPci, ec))
    if (looks_like_bdf(e.path().filename().string())) f.vfio_devices.push_back(e.path().filename().string());
  if (ec) return fail(Errc::not_found, "{}: {} (vfio-pci not loaded?)", kVfioPci, ec.message());
  std::sort(f.vfio_devices.begin(), f.vfio_devices.end());

  std::map<int, bool> seen;
  for (const auto& d : f.vfio_devices) {
    const int n = DMAKIT_TRY(group_number(d));
    if (seen.emplace(n, true).second) f.groups.push_back(DMAKIT_TRY(read_group(n)));
  }

  if (const auto cap = dmar_cap()) {
    // VT-d CAP: MGAW in bits 21:16 (width - 1), SLLPS in bits 37:34
    // (bit 34: 2 MiB, bit 35: 1 GiB second-level pages).
    f.dmar_address_bits = static_cast<uint32_t>((*cap >> 16) & 0x3f) + 1;
    f.dmar_page_sizes = 4096;
    if (*cap & (1ull << 34)) f.dmar_page_sizes |= 2ull << 20;
    if (*cap & (1ull << 35)) f.dmar_page_sizes |= 1ull << 30;
  }
  const std::string limit = first_line("/sys/module/vfio_iommu_type1/parameters/dma_entry_limit");
  f.dma_entry_limit = static_cast<uint32_t>(std::strtoul(limit.c_str(), nullptr, 10));

  DMAKIT_TRY(read_meminfo(f));
  DMAKIT_TRY(read_iommu(f));
  return f;
}

const Result<GuestFacts>& guest_facts() {
  static const Result<GuestFacts> facts = read_guest_facts();
  return facts;
}

}  // namespace dmakit::vmtest
