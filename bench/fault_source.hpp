// FaultSource: a memory source that fails on command around a real one.
// The buffer benchmark fragments memory with it and the tests inject source
// failures through it; the library itself never uses it.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "alloc_buffer/memory_source.hpp"

namespace dmakit::alloc_buffer {

// Owns the source it wraps; take() fails with Errc::no_memory once the
// budget of successful takes is spent, everything else goes to the inner
// source.
class FaultSource final : public MemorySource {
 public:
  static constexpr uint64_t kNever = ~0ull;
  explicit FaultSource(std::unique_ptr<MemorySource> inner);

  // Succeed `k` more takes, then fail every take until changed (0 = fail now).
  void fail_after(uint64_t k) { budget_.store(k, std::memory_order_relaxed); }
  void heal() { budget_.store(kNever, std::memory_order_relaxed); }
  uint64_t attempts() const { return attempts_.load(std::memory_order_relaxed); }
  uint64_t injected() const { return injected_.load(std::memory_order_relaxed); }
  MemorySource& inner() { return *inner_; }
  const MemorySource& inner() const { return *inner_; }

  std::string_view name() const override { return name_; }
  uint64_t order() const override { return inner_->order(); }
  uint64_t max_run() const override { return inner_->max_run(); }
  bool fresh_zero() const override { return inner_->fresh_zero(); }
  Result<void*> take(uint64_t len) override;
  void give(void* p, uint64_t len) override { inner_->give(p, len); }
  SourceStats stats() const override { return inner_->stats(); }
  std::vector<AddressRange> regions() const override { return inner_->regions(); }

 private:
  std::unique_ptr<MemorySource> inner_;
  std::string name_;
  std::atomic<uint64_t> budget_{kNever};
  std::atomic<uint64_t> attempts_{0};
  std::atomic<uint64_t> injected_{0};
};

}  // namespace dmakit::alloc_buffer
