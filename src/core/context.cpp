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

Context::Context(Key, const Config& cfg) : cfg_(cfg) {}

Context::~Context() {
  {
    // Devices stop first: no DMA may reach memory freed below.
    std::lock_guard lock(devices_mu_);
    devices_.clear();
  }
  {
    std::lock_guard lock(pools_mu_);
    pools_.clear();
  }
  unmap_all_memory();
  buffers_.reset();
  if (arena_) {
    if (auto st = arena_->flush(); !st) base::log().warn("context teardown: {}", st.error().what());
  }
  arena_.reset();
  domain_.reset();
}

const std::string& Context::backend() const { return domain_->info().backend; }

Result<Context::BackendChoice> Context::choose_backend(const Config& cfg) {
  const auto devices = DMAKIT_TRY(iommu::pci::parse_bdf_list(cfg.iommu.devices));
  if (cfg.iommu.backend == "vfio") return BackendChoice{"vfio", "iommu.backend is vfio"};
  if (cfg.iommu.backend == "sim") return BackendChoice{"sim", "iommu.backend is sim"};
  if (cfg.iommu.backend != "auto")
    return fail(Errc::invalid_argument, "key 'iommu.backend': '{}' is not auto, vfio or sim", cfg.iommu.backend);
  // A container needs a group to hold its IOMMU domain: without a device
  // named there is nothing to attach, so auto uses the simulated model.
  if (!std::filesystem::exists("/dev/vfio/vfio"))
    return BackendChoice{"sim", "auto: /dev/vfio/vfio does not exist (no VFIO on this host)"};
  if (devices.empty())
    return BackendChoice{"sim", "auto: VFIO is present but no device is named (--device BDF or iommu.devices)"};
  return BackendChoice{"vfio", "auto: VFIO is present and devices are named"};
}

Result<std::unique_ptr<iommu::Domain>> Context::make_domain(const Config& cfg) {
  const std::string backend = DMAKIT_TRY(choose_backend(cfg)).backend;
  if (backend == "sim") {
    auto sim_cfg = DMAKIT_TRY(iommu::SimConfig::from_settings(cfg.iommu));
    auto sim = DMAKIT_TRY(iommu::SimDomain::create(sim_cfg));
    return std::unique_ptr<iommu::Domain>(std::move(sim));
  }
  if (backend == "vfio") {
    const auto devices = DMAKIT_TRY(iommu::pci::parse_bdf_list(cfg.iommu.devices));  // checked by choose_backend
    if (devices.empty())
      return fail(Errc::invalid_argument,
                  "iommu.backend is 'vfio' but iommu.devices is empty: name the PCI devices (BDFs) whose "
                  "IOMMU groups the container attaches, e.g. --iommu.devices 0000:00:03.0");
    auto vfio = DMAKIT_TRY(iommu::vfio::VfioDomain::open(devices));
    return std::unique_ptr<iommu::Domain>(std::move(vfio));
  }
  return fail(Errc::internal, "backend '{}' chosen but not built", backend);
}

Result<std::unique_ptr<Context>> Context::create(const Config& cfg) {
  // Every part made before host memory ran out is owned by ctx (RAII) and
  // torn down in order with it.
  try {
    return create_unguarded(cfg);
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_memory, "context (backend '{}'): out of host memory while creating it", cfg.iommu.backend);
  }
}

Result<std::unique_ptr<Context>> Context::create_unguarded(const Config& cfg) {
  DMAKIT_TRY(validate(cfg));
  DMAKIT_TRY(base::ensure_eal(cfg.eal));
  auto ctx = std::make_unique<Context>(Key{}, cfg);
  ctx->domain_ = DMAKIT_TRY(make_domain(cfg));
  ctx->vfio_ = dynamic_cast<iommu::vfio::VfioDomain*>(ctx->domain_.get());
  ctx->arena_ = DMAKIT_TRY(iommu::IovaArena::create(*ctx->domain_, iommu::ArenaConfig::from_settings(cfg.arena)));
  ctx->buffers_ = DMAKIT_TRY(alloc_buffer::create_buffer_allocator(*ctx->arena_, cfg.buffer));
  base::log().info("context: backend {}, {} IOVA window(s), pages {:#x}", ctx->backend(),
                   ctx->domain_->info().windows.size(), ctx->domain_->info().page_sizes);
  return ctx;
}

Result<pool::DmaPool*> Context::create_pool(const std::string& name, size_t size, size_t align,
                                            size_t boundary) {
  pool::PoolOptions opts;
  opts.cache_size = cfg_.pool.cache_size;
  opts.poison = cfg_.pool.poison;
  return create_pool(name, size, align, boundary, opts);
}

Result<pool::DmaPool*> Context::create_pool(const std::string& name, size_t size, size_t align, size_t boundary,
                                            const pool::PoolOptions& opts) {
  std::lock_guard lock(pools_mu_);
  for (const auto& p : pools_)
    if (p->name() == name) return fail(Errc::exists, "DMA pool '{}' already exists", name);
  try {
    pools_.reserve(pools_.size() + 1);
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_memory, "DMA pool '{}': out of host memory for the context's pool list", name);
  }
  auto p = DMAKIT_TRY(pool::DmaPool::create(*buffers_, name, size, align, boundary, opts));
  pools_.push_back(std::move(p));  // reserved: no allocation
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

Result<uint64_t> Context::map_memory(void* vaddr, uint64_t len, uint32_t prot, uint64_t dma_limit) {
  const auto va = reinterpret_cast<uintptr_t>(vaddr);
  if (vaddr == nullptr || len == 0)
    return fail(Errc::invalid_argument, "map of caller memory {}+{:#x}: no memory named", vaddr, len);
  const uint64_t page = arena_->page_size();
  if (va + len < va || va + len > ~uintptr_t{0} - page)
    return fail(Errc::invalid_argument, "map of caller memory {}+{:#x}: the range wraps around", vaddr, len);
  const uintptr_t first = va & ~(page - 1);
  const uint64_t bytes = ((va + len + page - 1) & ~(page - 1)) - first;

  std::lock_guard lock(maps_mu_);
  // Pages shared with another registration would be unmapped under it.
  auto next = caller_maps_.lower_bound(va);
  auto clash = [&](const CallerMapping& m) {
    return first < m.first_page + m.span.len && m.first_page < first + bytes;
  };
  if ((next != caller_maps_.end() && clash(next->second)) ||
      (next != caller_maps_.begin() && clash(std::prev(next)->second)))
    return fail(Errc::exists, "map of caller memory {}+{:#x}: shares a page with an earlier registration",
                vaddr, len);
  for (uintptr_t probe : {first, first + bytes - 1})
    if (domain_->translate_host(reinterpret_cast<void*>(probe)))
      return fail(Errc::exists, "map of caller memory {}+{:#x}: {:#x} is memory dmakit already maps", vaddr,
                  len, probe);
  auto span = DMAKIT_TRY(arena_->alloc(iommu::IovaRequest{bytes, 0, dma_limit}));
  if (auto st = domain_->map(reinterpret_cast<void*>(first), span.iova, bytes, prot); !st) {
    (void)arena_->free(span);  // never mapped: the flush unmaps nothing there
    return std::unexpected(with_context(st.error(), fmt::format("map of caller memory {}+{:#x}", vaddr, len)));
  }
  try {
    caller_maps_.emplace(va, CallerMapping{span, first});
  } catch (const std::bad_alloc&) {
    (void)domain_->unmap(span.iova, span.len);
    (void)arena_->free(span);
    return fail(Errc::no_memory, "map of caller memory {}+{:#x}: out of host memory for its record", vaddr, len);
  }
  return span.iova + (va - first);
}

Status Context::unmap_memory(const void* vaddr) {
  std::lock_guard lock(maps_mu_);
  auto it = caller_maps_.find(reinterpret_cast<uintptr_t>(vaddr));
  if (it == caller_maps_.end())
    return fail(Errc::not_found, "unmap of caller memory {}: not an address given to map_memory", vaddr);
  const iommu::IovaSpan span = it->second.span;
  // Synchronous: the caller may free the memory as soon as this returns.
  DMAKIT_TRY(domain_->unmap(span.iova, span.len));
  caller_maps_.erase(it);
  // Already unmapped: the arena's lazy unmap of this range later removes nothing.
  return arena_->free(span);
}

void Context::unmap_all_memory() {
  std::lock_guard lock(maps_mu_);
  for (const auto& [va, m] : caller_maps_) {
    if (auto st = domain_->unmap(m.span.iova, m.span.len); !st)
      base::log().error("context teardown: caller memory {:#x}: {}", va, st.error().what());
    else
      (void)arena_->free(m.span);
  }
  caller_maps_.clear();
}

Result<iommu::HostRun> Context::translate(const void* vaddr) const {
  if (auto run = domain_->translate_host(vaddr)) return *run;
  return fail(Errc::not_found, "{} is not memory dmakit maps for the device", vaddr);
}

Status Context::flush() { return arena_->flush(); }

Result<iommu::vfio::VfioDomain*> Context::vfio_domain(std::string_view what) const {
  if (vfio_ == nullptr)
    return fail(Errc::unsupported, "{}: the {} backend has no devices (use iommu.backend vfio with VFIO present)",
                what, backend());
  return vfio_;
}

Status Context::attach_device(std::string_view bdf) {
  auto* v = DMAKIT_TRY(vfio_domain(fmt::format("attach {}", bdf)));
  return v->attach(bdf);
}

Status Context::detach_device(std::string_view bdf) {
  auto* v = DMAKIT_TRY(vfio_domain(fmt::format("detach {}", bdf)));
  const int group = DMAKIT_TRY(v->attached_group(bdf));
  std::lock_guard lock(devices_mu_);
  for (const auto& d : devices_)
    if (d->group() == group)
      return fail(Errc::busy, "detach {}: device {} of IOMMU group {} is open; close it first", bdf, d->bdf(), group);
  return v->detach(bdf);
}

std::vector<std::string> Context::devices() const {
  return vfio_ != nullptr ? vfio_->devices() : std::vector<std::string>{};
}

Result<Device*> Context::open_device(std::string_view bdf) {
  auto* v = DMAKIT_TRY(vfio_domain(fmt::format("open device {}", bdf)));
  // Held across attach and open, so a detach cannot slip in between.
  std::lock_guard lock(devices_mu_);
  DMAKIT_TRY(v->attach(bdf));
  const int group = DMAKIT_TRY(v->attached_group(bdf));
  std::unique_ptr<Device> slot;
  try {  // the record first: once the device is open nothing may fail
    devices_.reserve(devices_.size() + 1);
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_memory, "open device {}: out of host memory for its record", bdf);
  }
  auto dev = DMAKIT_TRY(v->open_device(bdf));
  try {
    slot = std::make_unique<Device>(std::move(dev), group);
  } catch (const std::bad_alloc&) {  // dev, not moved from, closes the device as it goes
    return fail(Errc::no_memory, "open device {}: out of host memory for its record", bdf);
  }
  devices_.push_back(std::move(slot));  // reserved: no allocation
  return devices_.back().get();
}

Status Context::close_device(Device* d) {
  std::unique_ptr<Device> closing;
  {
    std::lock_guard lock(devices_mu_);
    auto it = std::find_if(devices_.begin(), devices_.end(), [d](const auto& p) { return p.get() == d; });
    if (it == devices_.end())
      return fail(Errc::not_found, "device {} does not belong to this context", fmt::ptr(d));
    closing = std::move(*it);
    devices_.erase(it);
  }
  return ok();  // closing's destructor stops the device and closes it
}

ContextStats Context::stats() const {
  ContextStats s;
  s.domain = domain_->stats();
  s.dma_avail = domain_->dma_avail();
  s.arena = arena_->stats();
  s.buffers = buffers_->stats();
  {
    std::lock_guard lock(maps_mu_);
    s.caller_maps = caller_maps_.size();
    for (const auto& [va, m] : caller_maps_) s.caller_map_bytes += m.span.len;
  }
  std::lock_guard lock(pools_mu_);
  s.pools = pools_.size();
  return s;
}

}  // namespace dmakit::core
