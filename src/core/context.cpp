#include "core/context.hpp"

#include <algorithm>
#include <filesystem>

#include "alloc_buffer/buffer_allocator.hpp"
#include "base/eal.hpp"
#include "base/log.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"
#include "iommu/vfio.hpp"
#include "pool/dma_pool.hpp"

namespace dmakit::core {

Context::Context(Key, const base::Config& cfg) : cfg_(cfg) {}

Context::~Context() {
  {
    std::lock_guard lock(pools_mu_);
    pools_.clear();
  }
  buffers_.reset();
  if (arena_) {
    if (auto st = arena_->flush(); !st) base::log().warn("context teardown: {}", st.error().what());
  }
  arena_.reset();
  domain_.reset();
}

const std::string& Context::backend() const { return domain_->info().backend; }

Result<std::unique_ptr<iommu::Domain>> Context::make_domain(const base::Config& cfg) {
  std::string backend = cfg.iommu.backend;
  if (backend == "auto")
    backend = std::filesystem::exists("/dev/vfio/vfio") && !cfg.iommu.device.empty() ? "vfio" : "sim";
  if (backend == "sim") {
    auto sim_cfg = DMAKIT_TRY(iommu::SimConfig::from_settings(cfg.iommu));
    auto sim = DMAKIT_TRY(iommu::SimDomain::create(sim_cfg));
    return std::unique_ptr<iommu::Domain>(std::move(sim));
  }
  if (backend == "vfio") {
    if (cfg.iommu.device.empty())
      return fail(Errc::invalid_argument,
                  "iommu.backend is 'vfio' but iommu.device is empty: name the PCI device (BDF) whose "
                  "IOMMU group the container attaches, e.g. --iommu.device 0000:00:03.0");
    auto vfio = DMAKIT_TRY(iommu::vfio::VfioDomain::open(cfg.iommu.device));
    return std::unique_ptr<iommu::Domain>(std::move(vfio));
  }
  return fail(Errc::invalid_argument, "key 'iommu.backend': '{}' is not auto, vfio or sim", backend);
}

Result<std::unique_ptr<Context>> Context::create(const base::Config& cfg) {
  DMAKIT_TRY(base::validate(cfg));
  DMAKIT_TRY(base::ensure_eal(cfg.eal));
  auto ctx = std::make_unique<Context>(Key{}, cfg);
  ctx->domain_ = DMAKIT_TRY(make_domain(cfg));
  ctx->arena_ = DMAKIT_TRY(iommu::IovaArena::create(*ctx->domain_, iommu::ArenaConfig::from_settings(cfg.arena)));
  ctx->buffers_ = DMAKIT_TRY(alloc_buffer::create_buffer_allocator(*ctx->arena_, cfg.buffer));
  base::log().info("context: backend {}, {} IOVA window(s), pages {:#x}", ctx->backend(),
                   ctx->domain_->info().windows.size(), ctx->domain_->info().page_sizes);
  return ctx;
}

Result<pool::DmaPool*> Context::create_pool(const std::string& name, size_t size, size_t align,
                                            size_t boundary) {
  std::lock_guard lock(pools_mu_);
  for (const auto& p : pools_)
    if (p->stats().name == name) return fail(Errc::exists, "DMA pool '{}' already exists", name);
  pool::PoolOptions opts;
  opts.cache_size = cfg_.pool.cache_size;
  opts.poison = cfg_.pool.poison;
  auto p = DMAKIT_TRY(pool::DmaPool::create(*buffers_, name, size, align, boundary, opts));
  pools_.push_back(std::move(p));
  return pools_.back().get();
}

Status Context::destroy_pool(pool::DmaPool* p) {
  std::lock_guard lock(pools_mu_);
  auto it = std::find_if(pools_.begin(), pools_.end(), [p](const auto& q) { return q.get() == p; });
  if (it == pools_.end()) return fail(Errc::not_found, "DMA pool {} does not belong to this context", fmt::ptr(p));
  pools_.erase(it);
  return ok();
}

std::vector<pool::PoolStats> Context::pool_stats() const {
  std::lock_guard lock(pools_mu_);
  std::vector<pool::PoolStats> out;
  for (const auto& p : pools_) out.push_back(p->stats());
  return out;
}

}  // namespace dmakit::core
