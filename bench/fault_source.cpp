#include "fault_source.hpp"

#include <fmt/format.h>

namespace dmakit::alloc_buffer {

FaultSource::FaultSource(std::unique_ptr<MemorySource> inner)
    : inner_(std::move(inner)), name_(fmt::format("fault({})", inner_->name())) {}

// Takes one unit of the budget (lock-free: several threads may take at once).
Result<void*> FaultSource::take(uint64_t len) {
  attempts_.fetch_add(1, std::memory_order_relaxed);
  uint64_t b = budget_.load(std::memory_order_relaxed);
  while (b != kNever) {
    if (b == 0) {
      injected_.fetch_add(1, std::memory_order_relaxed);
      return fail(Errc::no_memory, "{}: injected failure", name_);
    }
    if (budget_.compare_exchange_weak(b, b - 1, std::memory_order_relaxed)) break;
  }
  return inner_->take(len);
}

}  // namespace dmakit::alloc_buffer
