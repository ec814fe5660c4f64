// vfio::VfioDomain (a container with its groups) and the probe behind `dmakit info`.
#include <linux/vfio.h>

#include <algorithm>

#include "base/log.hpp"
#include "iommu/vfio.hpp"

namespace dmakit::iommu::vfio {

namespace {

// A device's canonical BDF and its IOMMU group, from sysfs.
Result<std::pair<std::string, int>> resolve(std::string_view text, const Paths& paths) {
  const pci::Bdf bdf = DMAKIT_TRY(pci::Bdf::parse(text));
  return std::pair{bdf.str(), DMAKIT_TRY(pci::iommu_group(bdf, paths.sysfs))};
}

}  // namespace

Result<std::unique_ptr<VfioDomain>> VfioDomain::open(std::span<const std::string> bdfs, const Paths& paths) {
  if (bdfs.empty())
    return fail(Errc::invalid_argument, "a VFIO domain needs at least one PCI device (set iommu.devices)");
  // Resolve every device first, so a typo or a missing device is reported
  // as such even on a machine without VFIO.
  std::vector<std::pair<std::string, int>> wanted;  // BDF, IOMMU group
  for (const auto& text : bdfs) wanted.push_back(DMAKIT_TRY(resolve(text, paths)));
  auto d = std::make_unique<VfioDomain>(PassKey{});
  d->paths_ = paths;
  d->container_ = DMAKIT_TRY(Container::open(paths));
  std::lock_guard lock(d->mu_);
  for (const auto& [bdf, number] : wanted) DMAKIT_TRY(d->attach_locked(bdf, number));
  return d;
}

Result<std::unique_ptr<VfioDomain>> VfioDomain::open(std::string_view bdf, const Paths& paths) {
  const std::string one[] = {std::string(bdf)};
  return open(std::span<const std::string>(one), paths);
}

VfioDomain::~VfioDomain() {
  // Groups leave before the container closes; the last one out drops the
  // IOMMU domain and with it every mapping.
  members_.clear();
  container_.reset();
}

Status VfioDomain::attach_locked(const std::string& bdf, int number) {
  for (auto& m : members_) {
    if (m.group.number() != number) continue;
    // Devices that share a group come in together: the group is opened once.
    if (std::find(m.bdfs.begin(), m.bdfs.end(), bdf) == m.bdfs.end()) m.bdfs.push_back(bdf);
    return ok();
  }
  auto group = Group::open(number, paths_);
  if (!group) return std::unexpected(with_context(std::move(group).error(), "device " + bdf));
  // The first group sets the IOMMU; a later one joins the domain, and the
  // kernel replays every existing mapping into it.
  if (auto st = container_->attach(*group); !st)
    return std::unexpected(with_context(std::move(st).error(), "device " + bdf));
  members_.push_back(Member{std::move(*group), {bdf}});
  return ok();
}

Status VfioDomain::attach(std::string_view text) {
  const auto [bdf, number] = DMAKIT_TRY(resolve(text, paths_));
  std::lock_guard lock(mu_);
  return attach_locked(bdf, number);
}

Status VfioDomain::detach(std::string_view text) {
  const auto [bdf, number] = DMAKIT_TRY(resolve(text, paths_));
  std::lock_guard lock(mu_);
  auto it = std::find_if(members_.begin(), members_.end(), [&](const Member& m) { return m.group.number() == number; });
  if (it == members_.end())
    return fail(Errc::not_found, "detach {}: its IOMMU group {} is not attached to this domain", bdf, number);
  if (members_.size() == 1)
    return fail(Errc::busy,
                "detach {}: IOMMU group {} is the domain's last group; the container would drop its IOMMU and "
                "every mapping (destroy the context instead)",
                bdf, number);
  DMAKIT_TRY(it->group.unset_container());
  members_.erase(it);
  return ok();
}

Result<int> VfioDomain::attached_group(std::string_view text) const {
  const auto [bdf, number] = DMAKIT_TRY(resolve(text, paths_));
  std::lock_guard lock(mu_);
  for (const auto& m : members_)
    if (m.group.number() == number) return number;
  std::string have;
  for (const auto& m : members_) have += (have.empty() ? "" : ", ") + std::to_string(m.group.number());
  return fail(Errc::not_found, "device {} is in IOMMU group {}, which this domain did not attach (groups: {})", bdf,
              number, have);
}

std::vector<std::string> VfioDomain::devices() const {
  std::lock_guard lock(mu_);
  std::vector<std::string> out;
  for (const auto& m : members_) out.insert(out.end(), m.bdfs.begin(), m.bdfs.end());
  return out;
}

size_t VfioDomain::group_count() const {
  std::lock_guard lock(mu_);
  return members_.size();
}

Result<Device> VfioDomain::open_device(std::string_view text) const {
  const int number = DMAKIT_TRY(attached_group(text));
  const pci::Bdf bdf = DMAKIT_TRY(pci::Bdf::parse(text));
  std::lock_guard lock(mu_);
  for (const auto& m : members_)
    if (m.group.number() == number) return m.group.open_device(bdf.str());
  return fail(Errc::not_found, "device {}: IOMMU group {} was detached meanwhile", bdf.str(), number);
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
