// Context: the top floor. Wires config, the EAL, the IOMMU domain (VFIO
// container or simulated type1 model), the IOVA arena, the buffer allocator
// and the DMA pools together. One Context per IOMMU domain; it owns all of
// them and tears them down in reverse order (pools, buffers, arena - which
// flushes its stale IOVAs - then the domain).
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/config.hpp"
#include "dmakit/error.hpp"
#include "iommu/domain.hpp"

namespace dmakit::iommu {
class IovaArena;
}
namespace dmakit::alloc_buffer {
class BufferAllocator;
}
namespace dmakit::pool {
class DmaPool;
struct PoolStats;
}

namespace dmakit::core {

class Context {
 public:
  // Validates cfg, starts (or reuses) the EAL, opens the domain chosen by
  // iommu.backend, builds the arena and the buffer allocator.
  static Result<std::unique_ptr<Context>> create(const base::Config& cfg);

  // Only create() can make the key, so a Context is always fully wired.
  class Key {
    friend class Context;
    Key() = default;
  };
  Context(Key, const base::Config& cfg);
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  const base::Config& config() const { return cfg_; }
  iommu::Domain& domain() { return *domain_; }
  iommu::IovaArena& arena() { return *arena_; }
  alloc_buffer::BufferAllocator& buffers() { return *buffers_; }
  // "sim", "vfio-type1v2", ...
  const std::string& backend() const;

  // A small-block pool owned by the context (destroyed with it). The name
  // must be unique within the context. pool.cache_size / pool.poison apply.
  Result<pool::DmaPool*> create_pool(const std::string& name, size_t size, size_t align, size_t boundary);
  // Destroys a pool made by create_pool (blocks still allocated are reported
  // and their memory is kept, since a device may still use it).
  Status destroy_pool(pool::DmaPool* p);
  std::vector<pool::PoolStats> pool_stats() const;

  // The domain iommu.backend asks for: "sim" builds the simulated type1
  // model from the iommu.sim_* settings; "vfio" opens a container with the
  // group of iommu.device; "auto" picks vfio when /dev/vfio/vfio exists and
  // iommu.device is set, else sim.
  static Result<std::unique_ptr<iommu::Domain>> make_domain(const base::Config& cfg);

 private:
  base::Config cfg_;
  std::unique_ptr<iommu::Domain> domain_;
  std::unique_ptr<iommu::IovaArena> arena_;
  std::unique_ptr<alloc_buffer::BufferAllocator> buffers_;
  mutable std::mutex pools_mu_;
  std::vector<std::unique_ptr<pool::DmaPool>> pools_;
};

}  // namespace dmakit::core
