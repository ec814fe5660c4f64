// vfio::Container: the IOMMU domain behind /dev/vfio/vfio.
#include <fcntl.h>
#include <linux/vfio.h>
#include <sys/ioctl.h>

#include <cstring>
#include <limits>

#include "base/log.hpp"
#include "iommu/vfio.hpp"

namespace dmakit::iommu::vfio {

namespace {

const char* type_name(uint32_t type) {
  return type == VFIO_TYPE1v2_IOMMU ? "vfio-type1v2" : "vfio-type1";
}

// Walks a VFIO capability chain inside buf. Offsets are from the start of the
// info struct; every header and payload is bounds-checked against what the
// kernel filled in, so a malformed chain ends the walk instead of reading past it.
template <class Fn>
void for_each_cap(std::span<const std::byte> buf, uint32_t first, Fn&& fn) {
  uint32_t off = first;
  for (int guard = 0; off != 0 && guard < 64; ++guard) {
    if (off + sizeof(vfio_info_cap_header) > buf.size()) return;
    vfio_info_cap_header hdr;
    std::memcpy(&hdr, buf.data() + off, sizeof hdr);
    fn(hdr, buf.subspan(off));
    if (hdr.next <= off) return;  // chains only go forward
    off = hdr.next;
  }
}

}  // namespace

Container::Container(PassKey, base::UniqueFd fd, std::string path, int api_version)
    : fd_(std::move(fd)), path_(std::move(path)), api_version_(api_version) {}

Container::~Container() {
  // Closing the fd (after the groups let go of it) makes the kernel unmap and
  // unpin everything still mapped; tell the log if that is happening.
  std::lock_guard lock(mu_);
  if (!live_.empty())
    base::log().debug("closing VFIO container {} with {} live mappings ({} bytes)", path_, live_.size(),
                      mapped_bytes_);
}

Result<std::unique_ptr<Container>> Container::open(const Paths& paths) {
  const std::string path = paths.container();
  base::UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd) {
    const int err = errno;
    if (err == ENOENT)
      return fail_errno(err, "open {} (VFIO container): VFIO is not available in this kernel "
                        "(modprobe vfio-pci, or use iommu.backend=sim)", path);
    return fail_errno(err, "open {} (VFIO container)", path);
  }
  // The API version guards the ioctl numbers and structs below; VFIO has been
  // at version 0 since it was merged and would change it only on a break.
  const int version = ::ioctl(fd.get(), VFIO_GET_API_VERSION);
  if (version < 0) return fail_errno(errno, "VFIO_GET_API_VERSION on {}", path);
  if (version != VFIO_API_VERSION)
    return fail(Errc::unsupported, "{}: VFIO API version {} (dmakit speaks version {})", path, version,
                VFIO_API_VERSION);
  auto c = std::make_unique<Container>(PassKey{}, std::move(fd), path, version);
  const bool v2 = DMAKIT_TRY(c->check_extension(VFIO_TYPE1v2_IOMMU));
  const bool v1 = DMAKIT_TRY(c->check_extension(VFIO_TYPE1_IOMMU));
  if (!v2 && !v1)
    return fail(Errc::unsupported, "{}: the kernel offers neither the VFIO type1v2 nor the type1 IOMMU "
                "(vfio_iommu_type1 not loaded?)", path);
  return c;
}

Result<bool> Container::check_extension(unsigned long extension) const {
  // Returns > 0 when supported, 0 when not; on a container without an IOMMU
  // set it answers for the IOMMU types the kernel could set.
  const int r = ::ioctl(fd_.get(), VFIO_CHECK_EXTENSION, extension);
  if (r < 0) return fail_errno(errno, "VFIO_CHECK_EXTENSION {} on {}", extension, path_);
  return r > 0;
}

Status Container::attach(Group& group) {
  DMAKIT_TRY(group.set_container(*this));
  if (iommu_set()) return ok();
  // The first group gives the container an IOMMU to program; the type can only
  // be chosen now. If that fails, take the group out again so the caller is
  // left with what it had (a group that can join another container).
  auto rollback = [&](Error e) -> Status {
    iommu_type_ = 0;
    if (auto st = group.unset_container(); !st)
      base::log().warn("rolling back attach of {}: {}", group.path(), st.error().what());
    return std::unexpected(std::move(e));
  };
  if (auto st = set_iommu(); !st) return rollback(st.error());
  auto info = query_info();
  if (!info) return rollback(info.error());
  info_ = std::move(*info);
  base::log().info("VFIO container {}: {} with group {}, page sizes {:#x}, {} IOVA windows, dma_avail {}",
                   path_, info_.backend, group.number(), info_.page_sizes, info_.windows.size(),
                   info_.dma_avail ? std::to_string(*info_.dma_avail) : "unknown");
  return ok();
}

Status Container::set_iommu() {
  // type1v2 has the stricter, well-defined unmap semantics (no splitting a
  // mapping, exact unmapped size); type1 is the fallback on old kernels.
  const bool v2 = DMAKIT_TRY(check_extension(VFIO_TYPE1v2_IOMMU));
  const uint32_t type = v2 ? VFIO_TYPE1v2_IOMMU : VFIO_TYPE1_IOMMU;
  if (::ioctl(fd_.get(), VFIO_SET_IOMMU, static_cast<unsigned long>(type)) != 0) {
    const int err = errno;
    return fail_errno(err, "VFIO_SET_IOMMU {} on {}{}", type_name(type), path_,
                      err == EPERM ? " (no interrupt remapping? the kernel refuses unsafe interrupts)" : "");
  }
  iommu_type_ = type;
  return ok();
}

Result<DomainInfo> Container::query_info() const {
  if (!iommu_set())
    return fail(Errc::invalid_argument, "VFIO_IOMMU_GET_INFO on {}: no IOMMU set yet (attach a group first)",
                path_);
  // The capability chain follows the fixed struct; the kernel says how much
  // room it needs in argsz, so grow the buffer until it fits. uint64_t
  // storage keeps the structs aligned.
  std::vector<uint64_t> storage((sizeof(vfio_iommu_type1_info) + 7) / 8);
  vfio_iommu_type1_info* info = nullptr;
  for (int attempt = 0;; ++attempt) {
    info = reinterpret_cast<vfio_iommu_type1_info*>(storage.data());
    std::memset(info, 0, storage.size() * 8);
    info->argsz = static_cast<uint32_t>(storage.size() * 8);
    if (::ioctl(fd_.get(), VFIO_IOMMU_GET_INFO, info) != 0)
      return fail_errno(errno, "VFIO_IOMMU_GET_INFO on {}", path_);
    if (info->argsz <= storage.size() * 8) break;
    if (attempt == 4 || info->argsz > (1u << 20))
      return fail(Errc::io, "VFIO_IOMMU_GET_INFO on {}: the kernel keeps asking for more room ({} bytes)",
                  path_, info->argsz);
    storage.resize((info->argsz + 7) / 8);
  }

  const std::span<const std::byte> buf(reinterpret_cast<const std::byte*>(storage.data()),
                                       std::min<size_t>(info->argsz, storage.size() * 8));
  return parse_iommu_info(buf, iommu_type_, path_);
}

Result<DomainInfo> parse_iommu_info(std::span<const std::byte> buf, uint32_t iommu_type, std::string_view path) {
  vfio_iommu_type1_info fixed{};
  if (buf.size() < sizeof fixed)
    return fail(Errc::io, "VFIO_IOMMU_GET_INFO on {}: {} bytes of reply, the struct alone is {}", path, buf.size(),
                sizeof fixed);
  std::memcpy(&fixed, buf.data(), sizeof fixed);
  const vfio_iommu_type1_info* info = &fixed;
  DomainInfo out;
  out.backend = type_name(iommu_type);
  if (info->flags & VFIO_IOMMU_INFO_PGSIZES) out.page_sizes = info->iova_pgsizes;
  if (out.page_sizes == 0)
    return fail(Errc::unsupported, "VFIO_IOMMU_GET_INFO on {}: no IOMMU page sizes reported", path);

  if ((info->flags & VFIO_IOMMU_INFO_CAPS) && info->cap_offset != 0) {
    for_each_cap(buf, info->cap_offset, [&](const vfio_info_cap_header& hdr, std::span<const std::byte> cap) {
      if (hdr.id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
        vfio_iommu_type1_info_cap_iova_range head;
        if (cap.size() < sizeof head) return;
        std::memcpy(&head, cap.data(), sizeof head);
        for (uint32_t i = 0; i < head.nr_iovas; ++i) {
          const size_t at = sizeof head + i * sizeof(vfio_iova_range);
          if (at + sizeof(vfio_iova_range) > cap.size()) break;
          vfio_iova_range r;
          std::memcpy(&r, cap.data() + at, sizeof r);
          out.windows.push_back({r.start, r.end});
        }
      } else if (hdr.id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL) {
        vfio_iommu_type1_info_dma_avail avail;
        if (cap.size() < sizeof avail) return;
        std::memcpy(&avail, cap.data(), sizeof avail);
        out.dma_avail = avail.avail;
      }
    });
  }
  if (out.windows.empty()) {
    // Kernels before 5.4 do not report windows; the whole space is all we know.
    base::log().warn("{}: the kernel reports no IOVA windows; assuming the full 64-bit space", path);
    out.windows.push_back({0, std::numeric_limits<uint64_t>::max() & ~(out.min_page() - 1)});
  }
  std::sort(out.windows.begin(), out.windows.end(), [](auto& a, auto& b) { return a.start < b.start; });
  // The arena and the domain take the windows as disjoint inclusive ranges;
  // a reply that breaks that is refused rather than trusted.
  for (size_t i = 0; i < out.windows.size(); ++i) {
    const IovaWindow& w = out.windows[i];
    if (w.start > w.last)
      return fail(Errc::io, "VFIO_IOMMU_GET_INFO on {}: IOVA range {:#x}-{:#x} ends before it starts", path,
                  w.start, w.last);
    if (i > 0 && out.windows[i - 1].last >= w.start)
      return fail(Errc::io, "VFIO_IOMMU_GET_INFO on {}: IOVA ranges {:#x}-{:#x} and {:#x}-{:#x} overlap", path,
                  out.windows[i - 1].start, out.windows[i - 1].last, w.start, w.last);
  }
  return out;
}

Status Container::map(const void* vaddr, uint64_t iova, uint64_t len, uint32_t prot) {
  if (!iommu_set())
    return fail(Errc::invalid_argument, "map iova {:#x} on {}: no IOMMU set yet (attach a group first)", iova,
                path_);
  DMAKIT_TRY(check_range(info_, vaddr, iova, len, prot, "map"));
  vfio_iommu_type1_dma_map m{};
  m.argsz = sizeof m;
  m.flags = ((prot & kRead) ? VFIO_DMA_MAP_FLAG_READ : 0u) | ((prot & kWrite) ? VFIO_DMA_MAP_FLAG_WRITE : 0u);
  m.vaddr = reinterpret_cast<uintptr_t>(vaddr);
  m.iova = iova;
  m.size = len;
  std::lock_guard lock(mu_);
  // The records first: once the kernel has mapped, nothing may fail. Each
  // is undone on failure only if this call made it (an IOVA already mapped
  // is the kernel's EEXIST below, and its records stay).
  const HostIndex::Added indexed = host_index_.add(vaddr, iova, len);
  if (indexed == HostIndex::Added::no_memory)
    return fail_errno(ENOMEM, "map iova {:#x} len {:#x} on {}: no host memory for its record", iova, len, path_);
  auto undo_index = [&] {
    if (indexed == HostIndex::Added::yes) host_index_.remove(vaddr);
  };
  std::pair<decltype(live_)::iterator, bool> rec;
  try {
    rec = live_.try_emplace(iova, len);
  } catch (const std::bad_alloc&) {
    undo_index();
    return fail_errno(ENOMEM, "map iova {:#x} len {:#x} on {}: no host memory for its record", iova, len, path_);
  }
  // The kernel pins the pages, charges them to RLIMIT_MEMLOCK and programs the
  // IOMMU; from its return on, the device may access the memory.
  if (::ioctl(fd_.get(), VFIO_IOMMU_MAP_DMA, &m) != 0) {
    const int err = errno;
    if (rec.second) live_.erase(rec.first);
    undo_index();
    std::string hint;
    if (err == ENOMEM || err == EPERM) {
      auto mem = pci::current_memlock();
      if (auto st = pci::check_memlock(mapped_bytes_ + len, mem); !st) hint = " (" + st.error().message + ")";
    } else if (err == ENOSPC) {
      hint = fmt::format(" (the container's {} mapping entries are used up: dma_entry_limit)", live_.size());
    }
    return fail_errno(err, "VFIO_IOMMU_MAP_DMA iova {:#x} len {:#x} vaddr {:#x} on {}{}", iova, len,
                      m.vaddr, path_, hint);
  }
  mapped_bytes_ += len;
  ++map_calls_;
  return ok();
}

Status Container::unmap(uint64_t iova, uint64_t len) {
  if (!iommu_set())
    return fail(Errc::invalid_argument, "unmap iova {:#x} on {}: no IOMMU set yet", iova, path_);
  DMAKIT_TRY(check_range(info_, nullptr, iova, len, kRead, "unmap"));
  const uint64_t end = iova + len;
  std::lock_guard lock(mu_);
  // Refuse to split a mapping, as type1v2 does (type1 would unmap the whole
  // mapping instead): both backends and both IOMMU types then agree.
  auto it = live_.lower_bound(iova);
  if (it != live_.begin()) {
    auto prev = std::prev(it);
    if (prev->first + prev->second > iova)
      return fail_errno(EINVAL, "unmap iova {:#x} len {:#x}: would split the mapping at {:#x} len {:#x}", iova,
                        len, prev->first, prev->second);
  }
  uint64_t expect = 0;
  auto last = it;
  for (; last != live_.end() && last->first < end; ++last) {
    if (last->first + last->second > end)
      return fail_errno(EINVAL, "unmap iova {:#x} len {:#x}: would split the mapping at {:#x} len {:#x}", iova,
                        len, last->first, last->second);
    expect += last->second;
  }
  vfio_iommu_type1_dma_unmap u{};
  u.argsz = sizeof u;
  u.iova = iova;
  u.size = len;
  // Returns after the IOTLB is invalidated and the pages unpinned: from here
  // on the device can no longer reach the memory.
  if (::ioctl(fd_.get(), VFIO_IOMMU_UNMAP_DMA, &u) != 0)
    return fail_errno(errno, "VFIO_IOMMU_UNMAP_DMA iova {:#x} len {:#x} on {}", iova, len, path_);
  ++unmap_calls_;
  if (u.size != expect)
    base::log().warn("VFIO_IOMMU_UNMAP_DMA iova {:#x} len {:#x}: kernel unmapped {:#x} bytes, dmakit tracked {:#x}",
                     iova, len, u.size, expect);
  live_.erase(it, last);
  host_index_.remove_inside(iova, len);
  mapped_bytes_ -= expect;
  return ok();
}

uint64_t Container::dma_avail() const {
  auto info = query_info();
  if (info && info->dma_avail) return *info->dma_avail;
  // Old kernels lack the capability: estimate from the count at attach time
  // (the kernel's default limit when even that was missing).
  std::lock_guard lock(mu_);
  const uint64_t initial = info_.dma_avail.value_or(65535);
  if (!info) base::log().warn("dma_avail: {}", info.error().what());
  return initial > live_.size() ? initial - live_.size() : 0;
}

DomainStats Container::stats() const {
  std::lock_guard lock(mu_);
  return {map_calls_, unmap_calls_, live_.size(), mapped_bytes_};
}

}  // namespace dmakit::iommu::vfio
