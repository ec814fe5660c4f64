// Context: the top floor. Wires config, the EAL, the IOMMU domain (VFIO
// container or simulated type1 model), the IOVA arena, the buffer allocator
// and the DMA pools together. One Context per IOMMU domain; it owns all of
// them and tears them down in reverse order (pools, buffers, arena - which
// flushes its stale IOVAs - then the domain).
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/config.hpp"
#include "core/device.hpp"
#include "base/error.hpp"
#include "alloc_buffer/buffer_allocator.hpp"
#include "iommu/domain.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/vfio.hpp"
#include "pool/dma_pool.hpp"

namespace dmakit::core {

struct ContextStats {
  iommu::DomainStats domain;        // mapping entries, map/unmap calls, mapped bytes
  uint64_t dma_avail = 0;           // free mapping entries
  iommu::ArenaStats arena;          // IOVA pages in use and stale, flushes
  alloc_buffer::BufferStats buffers;
  uint64_t caller_maps = 0;         // live map_memory() registrations
  uint64_t caller_map_bytes = 0;    // their bytes (whole pages)
  uint64_t pools = 0;
};

class Context {
 public:
  // Validates cfg, starts (or reuses) the EAL, opens the domain chosen by
  // iommu.backend, builds the arena and the buffer allocator.
  static Result<std::unique_ptr<Context>> create(const Config& cfg);

  // Only create() can make the key, so a Context is always fully wired.
  class Key {
    friend class Context;
    Key() = default;
  };
  Context(Key, const Config& cfg);
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  const Config& config() const { return cfg_; }
  iommu::Domain& domain() { return *domain_; }
  iommu::IovaArena& arena() { return *arena_; }
  alloc_buffer::BufferAllocator& buffers() { return *buffers_; }
  // "sim", "vfio-type1v2", ...
  const std::string& backend() const;

  // A small-block pool owned by the context (destroyed with it). The name
  // must be unique within the context. pool.cache_size / pool.poison apply.
  Result<pool::DmaPool*> create_pool(const std::string& name, size_t size, size_t align, size_t boundary);
  // The same with explicit options (the config's pool settings are not used).
  Result<pool::DmaPool*> create_pool(const std::string& name, size_t size, size_t align, size_t boundary,
                                     const pool::PoolOptions& opts);
  // Destroys a pool made by create_pool (blocks still allocated are reported
  // and their memory is kept, since a device may still use it).
  Status destroy_pool(pool::DmaPool* p);
  std::vector<pool::PoolStats> pool_stats() const;

  // Maps memory the caller owns for the device (as spdk_mem_register): the
  // pages holding [vaddr, vaddr + len) get one IOVA range from the arena and
  // one mapping entry. Returns the IOVA of vaddr itself. The caller keeps
  // the memory allocated (and, without VFIO's pinning, resident) until
  // unmap_memory. Host ranges of two registrations may not share a page
  // (Errc::exists), nor may they be memory dmakit already maps.
  Result<uint64_t> map_memory(void* vaddr, uint64_t len, uint32_t prot, uint64_t dma_limit = ~0ull);
  // Unmaps a registration at once (the unmap and IOTLB invalidation are done
  // when it returns, so the memory may be reused); vaddr as given to map_memory.
  Status unmap_memory(const void* vaddr);

  // The IOVA of any host address dmakit maps (buffers, pool blocks, caller
  // memory) and the bytes contiguous from there; Errc::not_found otherwise.
  Result<iommu::HostRun> translate(const void* vaddr) const;

  // Unmaps every stale IOVA range now (the arena's lazy unmaps).
  Status flush();

  // Devices. Only the VFIO backend has them (Errc::unsupported on sim).
  // attach_device adds bdf's IOMMU group to the domain (existing mappings
  // become valid for it at once); detach_device removes it (Errc::busy
  // while a device of the group is open, or for the last group).
  Status attach_device(std::string_view bdf);
  Status detach_device(std::string_view bdf);
  // The devices named at creation and by attach_device.
  std::vector<std::string> devices() const;
  // Opens a device (attaching its group first when needed), owned by the
  // context until close_device or the context's end.
  Result<Device*> open_device(std::string_view bdf);
  // Stops and closes a device from open_device.
  Status close_device(Device* d);

  ContextStats stats() const;

  // The domain iommu.backend asks for: "sim" builds the simulated type1
  // model from the iommu.sim_* settings; "vfio" opens a container with the
  // groups of iommu.devices; "auto" picks vfio when /dev/vfio/vfio exists
  // and iommu.devices names a device, else sim.
  static Result<std::unique_ptr<iommu::Domain>> make_domain(const Config& cfg);

  // Which backend make_domain opens for cfg ("vfio" or "sim") and why, in
  // words for `dmakit info`. The one place "auto" is decided.
  struct BackendChoice {
    std::string backend;
    std::string reason;
  };
  static Result<BackendChoice> choose_backend(const Config& cfg);

 private:
  static Result<std::unique_ptr<Context>> create_unguarded(const Config& cfg);
  Config cfg_;
  std::unique_ptr<iommu::Domain> domain_;
  iommu::vfio::VfioDomain* vfio_ = nullptr;  // domain_ when it is a VFIO container, else null
  mutable std::mutex devices_mu_;
  std::vector<std::unique_ptr<Device>> devices_;  // open devices
  Result<iommu::vfio::VfioDomain*> vfio_domain(std::string_view what) const;
  std::unique_ptr<iommu::IovaArena> arena_;
  std::unique_ptr<alloc_buffer::BufferAllocator> buffers_;
  mutable std::mutex pools_mu_;
  std::vector<std::unique_ptr<pool::DmaPool>> pools_;

  struct CallerMapping {
    iommu::IovaSpan span;  // whole pages
    uintptr_t first_page = 0;
  };
  mutable std::mutex maps_mu_;
  std::map<uintptr_t, CallerMapping> caller_maps_;  // by the vaddr the caller gave
  void unmap_all_memory();
};

}  // namespace dmakit::core
