// Backing over anonymous host memory with synthetic IOVAs: the pool logic
// measured and tested alone, with no IOMMU. Regions are aligned to their
// length in VA and IOVA unless a skew is asked for (to exercise chunks that
// straddle two lookup ranges and IOVAs off the boundary grid).
#include <sys/mman.h>

#include <mutex>
#include <unordered_map>

#include "host_backing.hpp"

namespace dmakit::pool {

namespace {

class HostBacking final : public Backing {
 public:
  explicit HostBacking(HostBackingOptions opts) : opts_(std::move(opts)), next_iova_(opts_.iova_base) {}

  ~HostBacking() override {
    for (auto& [addr, m] : maps_) ::munmap(m.base, m.len);
  }

  Result<Region> grow(uint64_t len) override {
    std::lock_guard lock(mu_);
    if (opts_.max_regions != 0 && grown_ >= opts_.max_regions)
      return fail(Errc::no_memory, "host backing: limit of {} regions reached", opts_.max_regions);
    const uint64_t map_len = 2 * len + opts_.va_skew;
    void* p = ::mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return fail_errno(errno, "host backing: mmap of {} bytes", map_len);
    const auto raw = reinterpret_cast<uintptr_t>(p);
    const uintptr_t start = ((raw + len - 1) & ~(len - 1)) + opts_.va_skew;
    next_iova_ = (next_iova_ + len - 1) & ~(len - 1);
    Region r{reinterpret_cast<void*>(start), next_iova_ + opts_.iova_skew, len};
    next_iova_ += 2 * len;  // leaves a gap, so adjacent IOVAs never look like one region
    maps_[start] = Mapping{p, map_len};
    ++grown_;
    if (opts_.counters) opts_.counters->grown.fetch_add(1);
    return r;
  }

  void release(const Region& r) override {
    std::lock_guard lock(mu_);
    auto it = maps_.find(reinterpret_cast<uintptr_t>(r.vaddr));
    if (it == maps_.end()) return;
    ::munmap(it->second.base, it->second.len);
    maps_.erase(it);
    if (opts_.counters) opts_.counters->released.fetch_add(1);
  }

  void abandon(const Region& r) override {
    // Forgotten, not unmapped: the memory stays valid for the life of the process.
    std::lock_guard lock(mu_);
    maps_.erase(reinterpret_cast<uintptr_t>(r.vaddr));
    if (opts_.counters) opts_.counters->abandoned.fetch_add(1);
  }

  std::string describe() const override { return "host memory (synthetic IOVA)"; }

 private:
  struct Mapping {
    void* base;
    uint64_t len;
  };
  HostBackingOptions opts_;
  std::mutex mu_;
  uint64_t next_iova_;
  uint32_t grown_ = 0;
  std::unordered_map<uintptr_t, Mapping> maps_;
};

}  // namespace

std::unique_ptr<Backing> make_host_backing(HostBackingOptions opts) {
  return std::make_unique<HostBacking>(std::move(opts));
}

}  // namespace dmakit::pool
