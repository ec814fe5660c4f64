// vfio::VfioDomain (a container with its groups) and the probe behind `dmakit info`.
#include <linux/vfio.h>

#include <algorithm>

#include "base/log.hpp"
#include "iommu/vfio.hpp"

namespace dmakit::iommu::vfio {

Result<std::unique_ptr<VfioDomain>> VfioDomain::open(std::span<const std::string> bdfs, const Paths& paths) {
  if (bdfs.empty())
    return fail(Errc::invalid_argument, "a VFIO domain needs at least one PCI device (set iommu.device)");
  // Resolve every device first, so a typo or a missing device is reported
  // as such even on a machine without VFIO.
  std::vector<std::pair<std::string, int>> wanted;  // BDF, IOMMU group
  for (const auto& text : bdfs) {
    const pci::Bdf bdf = DMAKIT_TRY(pci::Bdf::parse(text));
    wanted.emplace_back(bdf.str(), DMAKIT_TRY(pci::iommu_group(bdf, paths.sysfs)));
  }
  auto d = std::make_unique<VfioDomain>(PassKey{});
  d->paths_ = paths;
  d->container_ = DMAKIT_TRY(Container::open(paths));
  for (const auto& [bdf, number] : wanted) {
    // Devices that share a group come in together: the group is opened once.
    if (std::any_of(d->groups_.begin(), d->groups_.end(), [&](const Group& g) { return g.number() == number; }))
      continue;
    auto group = Group::open(number, paths);
    if (!group) return std::unexpected(with_context(std::move(group).error(), "device " + bdf));
    if (auto st = d->container_->attach(*group); !st)
      return std::unexpected(with_context(std::move(st).error(), "device " + bdf));
    d->groups_.push_back(std::move(*group));
  }
  return d;
}

Result<std::unique_ptr<VfioDomain>> VfioDomain::open(std::string_view bdf, const Paths& paths) {
  const std::string one[] = {std::string(bdf)};
  return open(std::span<const std::string>(one), paths);
}

VfioDomain::~VfioDomain() {
  // Groups leave before the container closes; the last one out drops the
  // IOMMU domain and with it every mapping.
  groups_.clear();
  container_.reset();
}

Result<Device> VfioDomain::open_device(std::string_view text) const {
  const pci::Bdf bdf = DMAKIT_TRY(pci::Bdf::parse(text));
  const int number = DMAKIT_TRY(pci::iommu_group(bdf, paths_.sysfs));
  for (const auto& g : groups_)
    if (g.number() == number) return g.open_device(bdf.str());
  std::string have;
  for (const auto& g : groups_) have += (have.empty() ? "" : ", ") + std::to_string(g.number());
  return fail(Errc::invalid_argument, "device {} is in IOMMU group {}, which this domain did not attach (groups: {})",
              bdf.str(), number, have);
}

namespace {

// Opens a throw-away container with one group to read its IOMMU info. The
// group is declared after the container so it leaves first.
void probe_group(GroupReport& g, const Paths& paths) {
  auto container = Container::open(paths);
  if (!container) {
    g.error = container.error().what();
    return;
  }
  auto group = Group::open(g.number, paths);
  if (!group) {
    g.error = group.error().what();
    if (group.error().code == Errc::not_viable) g.viable = false;
    return;
  }
  auto flags = group->status();
  if (flags) g.viable = (*flags & VFIO_GROUP_FLAGS_VIABLE) != 0;
  if (auto st = (*container)->attach(*group); !st) {
    g.error = st.error().what();
    return;
  }
  g.iommu = (*container)->info();
}

}  // namespace

Result<VfioReport> probe_vfio(const Paths& paths) {
  VfioReport report;
  const auto numbers = DMAKIT_TRY(pci::iommu_groups(paths.sysfs));
  for (int n : numbers) {
    GroupReport g;
    g.number = n;
    auto members = pci::group_members(n, paths.sysfs);
    if (!members) {
      g.error = members.error().what();
    } else {
      g.members = std::move(*members);
      g.all_vfio = !g.members.empty() && std::all_of(g.members.begin(), g.members.end(), [](const auto& m) {
        return m.driver == pci::kVfioPci;
      });
    }
    report.groups.push_back(std::move(g));
  }

  auto container = Container::open(paths);
  if (!container) {
    report.reason = container.error().what();
    return report;
  }
  report.present = true;
  report.api_version = (*container)->api_version();
  report.type1 = (*container)->check_extension(VFIO_TYPE1_IOMMU).value_or(false);
  report.type1v2 = (*container)->check_extension(VFIO_TYPE1v2_IOMMU).value_or(false);
  report.noiommu = (*container)->check_extension(VFIO_NOIOMMU_IOMMU).value_or(false);
  container->reset();

  for (auto& g : report.groups)
    if (g.all_vfio) probe_group(g, paths);
  return report;
}

}  // namespace dmakit::iommu::vfio
