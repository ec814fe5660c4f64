#include "iommu/sim_domain.hpp"

#include <time.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <bit>
#include <cstring>
#include <new>
#include <sstream>
#include <string>

#include "base/config.hpp"
#include "base/clock.hpp"
#include "base/fault_inject.hpp"

namespace dmakit::iommu {

namespace {

const char* access_name(uint32_t access) {
  if (access == kRead) return "read";
  if (access == kWrite) return "write";
  return "read/write";
}

uint64_t top_of(uint32_t bits) { return bits >= 64 ? ~0ull : (1ull << bits) - 1; }

// type1 counts locked memory in host pages (PAGE_SIZE), whatever the IOMMU
// page size.
constexpr uint64_t kHostPage = 4096;

// The model's mm->locked_vm: pages pinned by all simulated domains.
std::atomic<uint64_t> g_pinned_pages{0};

// The memlock re-read interval runs on the library's clock (tests advance it).
using base::coarse_now_ns;

// The x86 MSI doorbell window that VT-d/AMD-Vi reserve (IOMMU_RESV_MSI).
constexpr uint64_t kMsiStart = 0xfee00000;
constexpr uint64_t kMsiLast = 0xfeefffff;

}  // namespace

Result<SimConfig> SimConfig::from_settings(const IommuSettings& s) {
  SimConfig cfg;
  cfg.address_bits = s.sim_address_bits;
  cfg.dma_entry_limit = s.sim_dma_entry_limit;
  cfg.page_sizes = 0;
  std::stringstream ss(s.sim_page_sizes);
  std::string item;
  while (std::getline(ss, item, ',')) {
    auto sz = base::parse_size(item);
    if (!sz)
      return fail(Errc::invalid_argument, "key 'iommu.sim_page_sizes': {}", sz.error().message);
    if (*sz < 4096 || !std::has_single_bit(*sz))
      return fail(Errc::invalid_argument,
                  "key 'iommu.sim_page_sizes': '{}' is not a power of two of at least 4K", item);
    cfg.page_sizes |= *sz;
  }
  if (cfg.page_sizes == 0)
    return fail(Errc::invalid_argument, "key 'iommu.sim_page_sizes': empty list '{}'", s.sim_page_sizes);
  return cfg;
}

Result<std::unique_ptr<SimDomain>> SimDomain::create(const SimConfig& cfg) {
  if (cfg.page_sizes == 0)
    return fail(Errc::invalid_argument, "simulated IOMMU: page size bitmap is empty");
  const uint64_t min_page = cfg.page_sizes & (~cfg.page_sizes + 1);
  if (min_page < 4096)
    return fail(Errc::invalid_argument, "simulated IOMMU: page sizes {:#x} include pages below 4K",
                cfg.page_sizes);
  const auto min_bits = static_cast<uint32_t>(std::countr_zero(min_page)) + 1;
  if (cfg.address_bits < min_bits || cfg.address_bits > 64)
    return fail(Errc::invalid_argument, "simulated IOMMU: address width {} bits is outside {}..64",
                cfg.address_bits, min_bits);
  if (cfg.dma_entry_limit == 0)
    return fail(Errc::invalid_argument, "simulated IOMMU: dma_entry_limit must be at least 1");

  const uint64_t top = top_of(cfg.address_bits);
  DomainInfo info;
  info.backend = "sim";
  info.page_sizes = cfg.page_sizes;
  info.dma_avail = cfg.dma_entry_limit;
  if (cfg.windows.empty()) {
    if (top < kMsiStart) {
      info.windows.push_back({0, top});
    } else {
      info.windows.push_back({0, kMsiStart - 1});
      if (top > kMsiLast) info.windows.push_back({kMsiLast + 1, top});
    }
  } else {
    uint64_t next_free = 0;
    for (size_t i = 0; i < cfg.windows.size(); ++i) {
      const IovaWindow& w = cfg.windows[i];
      if (w.last < w.start || (w.start & (min_page - 1)) != 0 || ((w.last + 1) & (min_page - 1)) != 0)
        return fail(Errc::invalid_argument,
                    "simulated IOMMU: window {:#x}-{:#x} is empty or not aligned to the page {:#x}",
                    w.start, w.last, min_page);
      if (w.last > top)
        return fail(Errc::invalid_argument, "simulated IOMMU: window {:#x}-{:#x} exceeds {} address bits",
                    w.start, w.last, cfg.address_bits);
      if (i > 0 && w.start < next_free)
        return fail(Errc::invalid_argument,
                    "simulated IOMMU: window {:#x}-{:#x} is not sorted after or overlaps the previous one",
                    w.start, w.last);
      next_free = w.last + 1;
    }
    info.windows = cfg.windows;
  }
  return std::unique_ptr<SimDomain>(new SimDomain(std::move(info), cfg.dma_entry_limit, cfg.memlock_limit));
}

SimDomain::~SimDomain() {
  // Closing the container unmaps everything and gives the pins back.
  g_pinned_pages.fetch_sub(mapped_bytes_ / kHostPage, std::memory_order_relaxed);
}

uint64_t SimDomain::process_pinned_bytes() {
  return g_pinned_pages.load(std::memory_order_relaxed) * kHostPage;
}

// vfio_pin_pages_remote: the limit is RLIMIT_MEMLOCK in pages; a task with
// CAP_IPC_LOCK is not limited. The whole map fails (the pages pinned so far
// are released), so nothing is charged on ENOMEM. The kernel reads both at
// each map; the model keeps what it read for up to kMemlockReread (two
// system calls per map would cost more than the rest of the model's map)
// and reads again before it refuses, so a raised limit applies at once.
Status SimDomain::pin(uint64_t iova, uint64_t len) {
  const uint64_t pages = len / kHostPage;
  auto limit_pages = [&](bool fresh) -> uint64_t {
    if (memlock_limit_) return *memlock_limit_ / kHostPage;
    const int64_t now = coarse_now_ns();
    if (fresh || mem_read_ns_ == 0 || now - mem_read_ns_ >= kMemlockReread.count()) {
      mem_ = pci::current_memlock();
      mem_read_ns_ = now;
    }
    return mem_.cap_ipc_lock ? ~0ull : mem_.soft_limit / kHostPage;
  };
  uint64_t cur = g_pinned_pages.load(std::memory_order_relaxed);
  uint64_t limit = limit_pages(false);
  if (cur + pages > limit) limit = limit_pages(true);
  do {
    if (cur + pages > limit)
      return fail_errno(ENOMEM,
                        "map iova {:#x} len {:#x}: RLIMIT_MEMLOCK exceeded: {} KiB already pinned by the process's "
                        "DMA mappings and {} KiB more would pass the limit of {} KiB (ulimit -l, or CAP_IPC_LOCK)",
                        iova, len, cur * (kHostPage / 1024), len / 1024, limit * (kHostPage / 1024));
  } while (!g_pinned_pages.compare_exchange_weak(cur, cur + pages, std::memory_order_relaxed));
  return ok();
}

Status SimDomain::map(const void* vaddr, uint64_t iova, uint64_t len, uint32_t prot) {
  DMAKIT_TRY(check_range(info_, vaddr, iova, len, prot, "map"));
  std::lock_guard lk(mu_);
  // The first mapping ending after iova is the only candidate for overlap
  // from below; anything starting before iova+len overlaps from above.
  auto it = maps_.upper_bound(iova);
  if (it != maps_.begin()) {
    auto prev = std::prev(it);
    if (prev->first + prev->second.len > iova)
      return fail_errno(EEXIST, "map iova {:#x} len {:#x}: overlaps the mapping at {:#x} len {:#x}", iova,
                        len, prev->first, prev->second.len);
  }
  if (it != maps_.end() && it->first < iova + len)
    return fail_errno(EEXIST, "map iova {:#x} len {:#x}: overlaps the mapping at {:#x} len {:#x}", iova, len,
                      it->first, it->second.len);
  if (maps_.size() >= limit_)
    return fail_errno(ENOSPC, "map iova {:#x} len {:#x}: all {} mapping entries (dma_entry_limit) in use",
                      iova, len, limit_);
  // Where type1 fails for its own reasons (pinning: ENOMEM, EFAULT), tests
  // make the model fail too.
  if (const int err = base::fault::inject(base::fault::Point::sim_map))
    return fail_errno(err, "VFIO_IOMMU_MAP_DMA (simulated) iova {:#x} len {:#x} vaddr {}", iova, len, vaddr);
  DMAKIT_TRY(pin(iova, len));
  // The kernel's answer when it cannot allocate its vfio_dma record: ENOMEM.
  const HostIndex::Added indexed = host_index_.add(vaddr, iova, len);
  if (indexed == HostIndex::Added::no_memory) {
    g_pinned_pages.fetch_sub(len / kHostPage, std::memory_order_relaxed);
    return fail_errno(ENOMEM, "VFIO_IOMMU_MAP_DMA (simulated) iova {:#x} len {:#x}: no memory for the mapping",
                      iova, len);
  }
  try {
    maps_.emplace_hint(it, iova, Mapping{static_cast<std::byte*>(const_cast<void*>(vaddr)), len, prot});
  } catch (const std::bad_alloc&) {
    if (indexed == HostIndex::Added::yes) host_index_.remove(vaddr);
    g_pinned_pages.fetch_sub(len / kHostPage, std::memory_order_relaxed);
    return fail_errno(ENOMEM, "VFIO_IOMMU_MAP_DMA (simulated) iova {:#x} len {:#x}: no memory for the mapping",
                      iova, len);
  }
  ++map_calls_;
  mapped_bytes_ += len;
  return ok();
}

Status SimDomain::unmap(uint64_t iova, uint64_t len) {
  std::lock_guard lk(mu_);
  ++unmap_calls_;
  DMAKIT_TRY(check_range(info_, nullptr, iova, len, 0, "unmap"));
  if (const int err = base::fault::inject(base::fault::Point::sim_unmap))
    return fail_errno(err, "VFIO_IOMMU_UNMAP_DMA (simulated) iova {:#x} len {:#x}", iova, len);
  const uint64_t last = iova + len - 1;
  // type1v2: the range may not start or end inside a mapping.
  auto it = maps_.upper_bound(iova);
  if (it != maps_.begin()) {
    auto prev = std::prev(it);
    if (prev->first < iova && prev->first + prev->second.len > iova)
      return fail_errno(EINVAL, "unmap iova {:#x} len {:#x}: starts inside the mapping at {:#x} len {:#x}",
                        iova, len, prev->first, prev->second.len);
  }
  auto end = maps_.upper_bound(last);
  if (end != maps_.begin()) {
    auto prev = std::prev(end);
    if (prev->first + prev->second.len - 1 > last)
      return fail_errno(EINVAL, "unmap iova {:#x} len {:#x}: ends inside the mapping at {:#x} len {:#x}",
                        iova, len, prev->first, prev->second.len);
  }
  for (auto m = maps_.lower_bound(iova); m != end;) {
    mapped_bytes_ -= m->second.len;
    g_pinned_pages.fetch_sub(m->second.len / kHostPage, std::memory_order_relaxed);
    m = maps_.erase(m);
  }
  host_index_.remove_inside(iova, len);
  return ok();
}

uint64_t SimDomain::dma_avail() const {
  std::lock_guard lk(mu_);
  return limit_ - maps_.size();
}

DomainStats SimDomain::stats() const {
  std::lock_guard lk(mu_);
  return {map_calls_, unmap_calls_, maps_.size(), mapped_bytes_};
}

Status SimDomain::resolve_locked(uint64_t iova, uint64_t len, uint32_t access,
                                 std::vector<Piece>& out) const {
  const char* what = access_name(access);
  if (len == 0) return fail(Errc::invalid_argument, "DMA {} at iova {:#x}: zero length", what, iova);
  if (iova + len - 1 < iova)
    return fail(Errc::fault, "DMA {} to iova {:#x} len {:#x} faults: wraps the address space", what, iova,
                len);
  uint64_t cur = iova;
  uint64_t left = len;
  while (left > 0) {
    auto it = maps_.upper_bound(cur);
    if (it == maps_.begin())
      return fail(Errc::fault, "DMA {} to iova {:#x} faults: not mapped", what, cur);
    --it;
    const Mapping& m = it->second;
    if (cur - it->first >= m.len)
      return fail(Errc::fault, "DMA {} to iova {:#x} faults: not mapped", what, cur);
    if ((m.prot & access) != access)
      return fail(Errc::fault, "DMA {} to iova {:#x} faults: {} mapping at {:#x}", what, cur,
                  (m.prot & kWrite) ? "write-only" : "read-only", it->first);
    const uint64_t piece = std::min(left, m.len - (cur - it->first));
    out.push_back({m.vaddr + (cur - it->first), piece});
    cur += piece;
    left -= piece;
  }
  return ok();
}

Result<std::span<std::byte>> SimDomain::translate(uint64_t iova, uint64_t len, uint32_t access) const {
  if ((access & kReadWrite) == 0 || (access & ~kReadWrite) != 0)
    return fail(Errc::invalid_argument, "translate iova {:#x}: access {:#x} is not read and/or write", iova,
                access);
  std::lock_guard lk(mu_);
  std::vector<Piece> pieces;
  DMAKIT_TRY(resolve_locked(iova, len, access, pieces));
  if (pieces.size() != 1)
    return fail(Errc::fault, "DMA {} to iova {:#x} len {:#x} faults: crosses the end of the mapping",
                access_name(access), iova, len);
  return std::span<std::byte>(pieces[0].host, pieces[0].len);
}

Status SimDomain::device_write(uint64_t iova, std::span<const std::byte> data) {
  std::lock_guard lk(mu_);
  std::vector<Piece> pieces;
  DMAKIT_TRY(resolve_locked(iova, data.size(), kWrite, pieces));
  size_t off = 0;
  for (const Piece& p : pieces) {
    std::memcpy(p.host, data.data() + off, p.len);
    off += p.len;
  }
  return ok();
}

Status SimDomain::device_read(uint64_t iova, std::span<std::byte> out) const {
  std::lock_guard lk(mu_);
  std::vector<Piece> pieces;
  DMAKIT_TRY(resolve_locked(iova, out.size(), kRead, pieces));
  size_t off = 0;
  for (const Piece& p : pieces) {
    std::memcpy(out.data() + off, p.host, p.len);
    off += p.len;
  }
  return ok();
}

}  // namespace dmakit::iommu
