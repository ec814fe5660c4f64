// Context: the top floor. Wires config, the EAL, the IOMMU domain (VFIO
// container or simulated type1 model), the IOVA arena, the buffer allocator
// and the DMA pools together. One Context per IOMMU domain; it owns all of
// them and tears them down in reverse order.
#pragma once

#include <memory>

#include "base/config.hpp"
#include "dmakit/error.hpp"
#include "iommu/domain.hpp"

namespace dmakit::iommu {
class IovaArena;
}
namespace dmakit::alloc_buffer {
class BufferAllocator;
}

namespace dmakit::core {

class Context {
 public:
  // Validates cfg, starts (or reuses) the EAL, opens the domain chosen by
  // iommu.backend, builds the arena and the buffer allocator.
  static Result<std::unique_ptr<Context>> create(const base::Config& cfg);
  ~Context();

  const base::Config& config() const { return cfg_; }
  iommu::Domain& domain() { return *domain_; }
  iommu::IovaArena& arena() { return *arena_; }
  alloc_buffer::BufferAllocator& buffers() { return *buffers_; }

  // The domain iommu.backend asks for: "sim" builds the simulated type1
  // model from the iommu.sim_* settings; "vfio" opens a container with the
  // group of iommu.device; "auto" picks vfio when /dev/vfio/vfio exists.
  static Result<std::unique_ptr<iommu::Domain>> make_domain(const base::Config& cfg);

 private:
  explicit Context(const base::Config& cfg);
  base::Config cfg_;
  std::unique_ptr<iommu::Domain> domain_;
  std::unique_ptr<iommu::IovaArena> arena_;
  std::unique_ptr<alloc_buffer::BufferAllocator> buffers_;
};

}  // namespace dmakit::core
