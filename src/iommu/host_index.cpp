#include "iommu/host_index.hpp"

#include <mutex>
#include <new>

namespace dmakit::iommu {

HostIndex::Added HostIndex::add(const void* vaddr, uint64_t iova, uint64_t len) {
  const auto va = reinterpret_cast<uintptr_t>(vaddr);
  std::unique_lock lock(mu_);
  auto next = by_host_.lower_bound(va);
  if (next != by_host_.end() && next->first < va + len) return Added::overlap;
  if (next != by_host_.begin() && std::prev(next)->first + std::prev(next)->second.len > va) return Added::overlap;
  // The index never holds one side of an entry.
  auto h = by_host_.end();
  try {
    h = by_host_.emplace_hint(next, va, ByHost{iova, len});
    by_iova_.emplace(iova, ByIova{va, len});
  } catch (const std::bad_alloc&) {
    if (h != by_host_.end()) by_host_.erase(h);
    return Added::no_memory;
  }
  return Added::yes;
}

void HostIndex::remove(const void* vaddr) {
  std::unique_lock lock(mu_);
  auto h = by_host_.find(reinterpret_cast<uintptr_t>(vaddr));
  if (h == by_host_.end()) return;
  by_iova_.erase(h->second.iova);
  by_host_.erase(h);
}

void HostIndex::remove_inside(uint64_t iova, uint64_t len) {
  std::unique_lock lock(mu_);
  for (auto it = by_iova_.lower_bound(iova); it != by_iova_.end() && it->first < iova + len;) {
    if (it->first + it->second.len > iova + len) break;  // not wholly inside: unmap() refused it
    by_host_.erase(it->second.vaddr);
    it = by_iova_.erase(it);
  }
}

std::optional<HostRun> HostIndex::lookup(const void* vaddr) const {
  const auto va = reinterpret_cast<uintptr_t>(vaddr);
  std::shared_lock lock(mu_);
  auto it = by_host_.upper_bound(va);
  if (it == by_host_.begin()) return std::nullopt;
  --it;
  const uint64_t off = va - it->first;
  if (off >= it->second.len) return std::nullopt;
  return HostRun{it->second.iova + off, it->second.len - off};
}

}  // namespace dmakit::iommu
