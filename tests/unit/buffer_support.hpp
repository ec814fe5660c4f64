// Shared pieces of the buffer allocator tests: a Domain decorator that fails
// the K-th map, a 4 KiB source whose chunks are never virtually adjacent (so
// a test knows how many runs a buffer has), a fixture with the real sources
// over a simulated domain, and helpers to read counters.
#pragma once

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "alloc_buffer/buffer_allocator.hpp"
#include "iommu/domain.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"

namespace dmakit::buftest {

// Forwards to a real domain; map number `fail_at` (1-based, counted from
// arm()) fails with `err`: ENOSPC as an exhausted entry limit would (which
// the allocator answers by retiring recycled memory and retrying), or
// another errno for a refusal nothing can reclaim.
class FailingDomain final : public iommu::Domain {
 public:
  explicit FailingDomain(iommu::Domain& inner) : inner_(inner) {}
  void arm(uint64_t fail_at, int err = ENOSPC) {
    count_ = 0;
    fail_at_ = fail_at;
    err_ = err;
  }
  const iommu::DomainInfo& info() const override { return inner_.info(); }
  Status map(const void* vaddr, uint64_t iova, uint64_t len, uint32_t prot) override {
    if (fail_at_ != 0 && ++count_ == fail_at_) return fail_errno(err_, "injected map failure at {:#x}", iova);
    return inner_.map(vaddr, iova, len, prot);
  }
  Status unmap(uint64_t iova, uint64_t len) override { return inner_.unmap(iova, len); }
  uint64_t dma_avail() const override { return inner_.dma_avail(); }
  iommu::DomainStats stats() const override { return inner_.stats(); }

 private:
  iommu::Domain& inner_;
  uint64_t count_ = 0, fail_at_ = 0;
  int err_ = ENOSPC;
};

// 4 KiB chunks at every other page of one anonymous region: no two chunks
// are virtually adjacent, so each is its own run (its own mapping).
class ScatterSource final : public alloc_buffer::MemorySource {
 public:
  explicit ScatterSource(uint64_t pages) : pages_(pages), used_(pages, false) {
    void* p = ::mmap(nullptr, pages * 2 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    base_ = p == MAP_FAILED ? nullptr : static_cast<char*>(p);
  }
  ~ScatterSource() override {
    if (base_ != nullptr) ::munmap(base_, pages_ * 2 * 4096);
  }
  std::string_view name() const override { return "scatter-4K"; }
  uint64_t order() const override { return 4096; }
  Result<void*> take(uint64_t len) override {
    std::lock_guard lock(mu_);
    if (base_ == nullptr || len != 4096) return fail(Errc::invalid_argument, "scatter: bad take");
    for (uint64_t i = 0; i < pages_; ++i)
      if (!used_[i]) {
        used_[i] = true;
        live_ += 4096;
        return static_cast<void*>(base_ + i * 2 * 4096);
      }
    return fail(Errc::no_memory, "scatter: all {} pages taken", pages_);
  }
  void give(void* p, uint64_t) override {
    std::lock_guard lock(mu_);
    used_[static_cast<uint64_t>(static_cast<char*>(p) - base_) / (2 * 4096)] = false;
    live_ -= 4096;
  }
  alloc_buffer::SourceStats stats() const override {
    std::lock_guard lock(mu_);
    return {live_, live_, 0, 0};
  }

 private:
  uint64_t pages_;
  std::vector<bool> used_;
  char* base_ = nullptr;
  mutable std::mutex mu_;
  uint64_t live_ = 0;
};

// The real sources (the EAL's mode decides which) behind an allocator on an
// arena on the simulated domain; built by make() in a test's SetUp. Every
// mapping must be gone when the allocator is.
class RealSourcesTest : public ::testing::Test {
 protected:
  void make(const iommu::ArenaConfig& ac, const alloc_buffer::BufferSettings& s) {
    auto d = iommu::SimDomain::create();
    ASSERT_TRUE(d);
    sim_ = std::move(*d);
    auto a = iommu::IovaArena::create(*sim_, ac);
    ASSERT_TRUE(a);
    arena_ = std::move(*a);
    auto b = alloc_buffer::create_buffer_allocator(*arena_, s);
    ASSERT_TRUE(b) << b.error().what();
    alloc_ = std::move(*b);
  }
  void TearDown() override {
    alloc_.reset();
    if (sim_ != nullptr) {
      EXPECT_EQ(sim_->stats().mappings, 0u);
    }
  }

  const alloc_buffer::MemorySource* source(std::string_view name) const {
    for (const alloc_buffer::MemorySource* s : alloc_->sources())
      if (s->name() == name) return s;
    return nullptr;
  }

  std::unique_ptr<iommu::SimDomain> sim_;
  std::unique_ptr<iommu::IovaArena> arena_;
  std::unique_ptr<alloc_buffer::BufferAllocator> alloc_;
};

// A fixture's allocator and arena destroyed in that order, then checked:
// the allocator left no IOVA page in use and no mapping in the domain.
inline void destroy_and_expect_nothing_left(std::unique_ptr<alloc_buffer::BufferAllocator>& alloc,
                                            std::unique_ptr<iommu::IovaArena>& arena,
                                            const std::unique_ptr<iommu::SimDomain>& sim) {
  alloc.reset();
  if (arena) {
    EXPECT_EQ(arena->stats().pages_in_use, 0u) << "IOVA leaked";
  }
  arena.reset();
  if (sim) {
    EXPECT_EQ(sim->stats().mappings, 0u) << "mapping leaked";
  }
}

inline uint64_t live_bytes(const alloc_buffer::BufferAllocator& a) {
  uint64_t sum = 0;
  for (const auto* s : a.sources()) sum += s->stats().live_bytes;
  return sum;
}

}  // namespace dmakit::buftest
