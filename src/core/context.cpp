#include "core/context.hpp"

#include "alloc_buffer/buffer_allocator.hpp"
#include "iommu/iova_arena.hpp"

namespace dmakit::core {

Context::Context(const base::Config& cfg) : cfg_(cfg) {}
Context::~Context() = default;

Result<std::unique_ptr<Context>> Context::create(const base::Config&) {
  return fail(Errc::unsupported, "the context is being assembled");
}

Result<std::unique_ptr<iommu::Domain>> Context::make_domain(const base::Config&) {
  return fail(Errc::unsupported, "the context is being assembled");
}

}  // namespace dmakit::core
