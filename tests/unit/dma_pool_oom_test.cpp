// DmaPool when host memory runs out: this binary replaces the global
// operator new (failing_new.hpp) so that a test can make the k-th
// allocation from now throw std::bad_alloc, and sweeps k over every
// allocation that growth, thread caches and magazine exchanges make. Each
// failure must come back as Errc::no_memory from alloc or free (never as an
// exception), and leave a pool whose blocks are all accounted for and whose
// chunks all go back to the backing at destroy.
#include <gtest/gtest.h>

#include <cstdio>
#include <thread>
#include <vector>

#include "host_backing.hpp"
#include "failing_new.hpp"
#include "pool/dma_pool.hpp"

namespace dmakit::pool {
namespace {

struct Outcome {
  bool fired = false;  // the failing allocation was reached
  uint64_t alloc_failures = 0;
  uint64_t free_failures = 0;
};

// One pool, 4 KiB chunks of 64-byte blocks and small magazines, so that the
// blocks below take several chunks, magazines and table resizes. One thread
// allocates them all, another frees them all; the k-th host allocation of
// the allocating thread (fail_in_free false) or of the freeing thread fails.
Outcome run_once(long k, bool fail_in_free) {
  constexpr size_t kBlocks = 300;
  auto counters = std::make_shared<HostBackingOptions::Counters>();
  HostBackingOptions ho;
  ho.counters = counters;
  PoolOptions po;
  po.cache_size = 8;
  po.chunk_bytes = 4096;
  Outcome out;
  {
    auto made = DmaPool::create(make_host_backing(ho), "oom", 64, 64, 0, po);
    EXPECT_TRUE(made.has_value());
    if (!made) return out;
    DmaPool& pool = **made;
    std::vector<DmaBlock> held;
    held.reserve(kBlocks);  // the test's own allocations stay out of the count

    if (!fail_in_free) oomtest::fail_allocation(k);
    for (size_t i = 0; i < kBlocks; ++i) {
      Result<DmaBlock> b = [&] {
        try {
          return pool.alloc();
        } catch (...) {
          ADD_FAILURE() << "alloc threw with the allocation " << k << " failing";
          return Result<DmaBlock>(fail(Errc::internal, "threw"));
        }
      }();
      if (b) {
        held.push_back(*b);  // reserved: no allocation
      } else {
        EXPECT_EQ(b.error().code, Errc::no_memory) << b.error().what();
        ++out.alloc_failures;
      }
    }
    if (!fail_in_free) out.fired = oomtest::disarm();

    // Freed by another thread, which needs a cache and magazines of its own.
    std::vector<DmaBlock> kept;  // frees refused for want of memory: the block stays allocated
    kept.reserve(kBlocks);
    std::thread([&] {
      if (fail_in_free) oomtest::fail_allocation(k);
      for (const DmaBlock& b : held) {
        Status s = [&] {
          try {
            return pool.free(b);
          } catch (...) {
            ADD_FAILURE() << "free threw with the allocation " << k << " failing";
            return Status(fail(Errc::internal, "threw"));
          }
        }();
        if (!s) {
          EXPECT_EQ(s.error().code, Errc::no_memory) << s.error().what();
          ++out.free_failures;
          kept.push_back(b);
        }
      }
      if (fail_in_free) out.fired = oomtest::disarm();
    }).join();
    for (const DmaBlock& b : kept) EXPECT_TRUE(pool.free(b).has_value()) << "a block refused once frees later";

    // Everything is back and the pool still works.
    pool.flush_thread_cache();
    const PoolStats st = pool.stats();
    EXPECT_EQ(st.active, 0u) << "allocation " << k;
    EXPECT_EQ(st.validation_failures, 0u);
    // A chunk whose records found no memory went back to the backing at once.
    EXPECT_EQ(st.chunks, counters->grown.load() - counters->released.load());
    std::vector<DmaBlock> again;
    again.reserve(kBlocks);
    for (size_t i = 0; i < kBlocks; ++i) {
      auto b = pool.alloc();
      EXPECT_TRUE(b.has_value()) << "after the failure at allocation " << k;
      if (b) again.push_back(*b);
    }
    for (const DmaBlock& b : again) EXPECT_TRUE(pool.free(b).has_value());
  }
  // Every region the backing gave went back at destroy: none leaked, none abandoned.
  EXPECT_EQ(counters->released.load(), counters->grown.load()) << "allocation " << k;
  EXPECT_EQ(counters->abandoned.load(), 0u);
  return out;
}

TEST(DmaPoolOutOfMemory, EveryFailedAllocationIsAnErrorAndLosesNothing) {
  for (bool in_free : {false, true}) {
    const char* phase = in_free ? "free" : "alloc";
    uint64_t surfaced = 0;
    long k = 0;
    for (;; ++k) {  // until the phase makes fewer than k + 1 allocations
      const Outcome o = run_once(k, in_free);
      if (HasFailure()) FAIL() << phase << " phase, allocation " << k;
      if (!o.fired) break;
      // A failure may also be absorbed without an error, where the pool can
      // do without the memory (a spare magazine, a larger chunk table).
      surfaced += o.alloc_failures + o.free_failures;
      ASSERT_LT(k, 100000) << phase << " phase never stops allocating";
    }
    std::printf("%s phase: %ld host allocations, each failed once; %llu surfaced as no_memory\n", phase, k,
                static_cast<unsigned long long>(surfaced));
    EXPECT_GT(k, 0) << phase << " phase allocated nothing: the sweep tested nothing";
    EXPECT_GT(surfaced, 0u) << phase << " phase: no failed allocation reached the caller";
  }
}

}  // namespace
}  // namespace dmakit::pool
