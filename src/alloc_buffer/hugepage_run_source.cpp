// A hugepage source for slabs: each take reserves one memzone of exactly the
// length asked (2 MiB pages, 2 MiB aligned), so a whole slab is one virtual
// run and one map call; each give frees its memzone. Unlike the buffer
// allocator's 2 MiB source, which carves pages from 32 MiB memzones (a run
// can be no longer than one memzone, since DPDK places an element header
// between memzones), a 1 GiB slab takes one mapping entry here.
#include <rte_errno.h>
#include <rte_memzone.h>

#include <map>
#include <mutex>

#include "alloc_buffer/slab.hpp"
#include "base/eal.hpp"
#include "base/log.hpp"

namespace dmakit::alloc_buffer {

namespace {

class HugepageRunSource final : public MemorySource {
 public:
  ~HugepageRunSource() override {
    std::lock_guard lock(mu_);
    for (const auto& [base, mz] : zones_)
      base::log().warn("{}: destroyed with {} still taken at {:#x}; leaving it reserved", name(),
                       size_name(mz->len), base);
  }

  std::string_view name() const override { return "hugepage-run-2M"; }
  uint64_t order() const override { return kPage2M; }
  uint64_t max_run() const override { return kPage1G; }

  Result<void*> take(uint64_t len) override {
    std::lock_guard lock(mu_);
    if (len == 0 || len % kPage2M != 0 || len > max_run()) {
      ++failures_;
      return fail(Errc::invalid_argument, "{}: take of {} bytes is not a multiple of 2M up to 1G", name(), len);
    }
    const std::string zname = fmt::format("dmakit-slab-{}", serial_++);
    rte_errno = 0;
    const rte_memzone* mz =
        rte_memzone_reserve_aligned(zname.c_str(), len, SOCKET_ID_ANY, RTE_MEMZONE_2MB, static_cast<unsigned>(kPage2M));
    if (mz == nullptr) {
      ++failures_;
      return fail_errno(rte_errno != 0 ? rte_errno : ENOMEM, "{}: rte_memzone_reserve_aligned of {}", name(),
                        size_name(len));
    }
    if (mz->hugepage_sz != kPage2M) {
      const uint64_t got = mz->hugepage_sz;
      rte_memzone_free(mz);
      ++failures_;
      return fail(Errc::unsupported, "{}: EAL gave memory on {} pages, not 2M", name(), size_name(got));
    }
    zones_.emplace(reinterpret_cast<uintptr_t>(mz->addr), mz);
    live_ += len;
    ++takes_;
    return mz->addr;
  }

  void give(void* p, uint64_t len) override {
    std::lock_guard lock(mu_);
    auto it = zones_.find(reinterpret_cast<uintptr_t>(p));
    if (it == zones_.end() || it->second->len < len) {
      base::log().error("{}: give of {} bytes at {}: not a run it handed out", name(), len, p);
      return;
    }
    live_ -= len;
    rte_memzone_free(it->second);
    zones_.erase(it);
  }

  SourceStats stats() const override {
    std::lock_guard lock(mu_);
    return SourceStats{live_, live_, takes_, failures_};
  }

 private:
  mutable std::mutex mu_;
  std::map<uintptr_t, const rte_memzone*> zones_;
  uint64_t live_ = 0, takes_ = 0, failures_ = 0, serial_ = 0;
};

}  // namespace

Result<std::unique_ptr<MemorySource>> make_hugepage_run_source() {
  const base::EalInfo* eal = base::eal_info();
  if (eal == nullptr || !eal->hugepages || !eal_has_page_size(kPage2M))
    return fail(Errc::unsupported, "hugepage run source: the EAL has no 2 MiB hugepages");
  return std::make_unique<HugepageRunSource>();
}

}  // namespace dmakit::alloc_buffer
