// Every layer's public operations when host memory runs out: this binary
// replaces the global operator new (failing_new.hpp) and, for each
// operation sequence below, makes the k-th allocation from now fail, for
// every k until the sequence makes fewer than k + 1 allocations. Each failure
// must come back as Errc::no_memory (never as an exception, a terminate or a
// hang), and once the caller frees what succeeded, the stats and the
// simulated domain's mapping count are back at their baseline.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

#include "nohuge_eal.hpp"
#include "alloc_buffer/buffer_allocator.hpp"
#include "base/eal.hpp"
#include "core/context.hpp"
#include "dmakit/dmakit.h"
#include "failing_new.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"

using namespace dmakit;

namespace {

// One run of a sequence with allocation k failing: whether the failing
// allocation was reached, and how many calls reported it.
struct RunOutcome {
  bool fired = false;
  uint64_t surfaced = 0;
};

// Runs `run` for k = 0, 1, ... until the failure is no longer reached.
// Returns the number of failure points swept.
long sweep(const char* what, const std::function<RunOutcome(long)>& run) {
  long k = 0;
  uint64_t surfaced = 0;
  for (;; ++k) {
    const RunOutcome o = run(k);
    oomtest::disarm();
    if (::testing::Test::HasFailure()) {
      ADD_FAILURE() << what << ": allocation " << k << " failing";
      return k;
    }
    if (!o.fired) break;
    surfaced += o.surfaced;
    if (k >= 200000) {
      ADD_FAILURE() << what << " never stops allocating";
      return k;
    }
  }
  std::printf("%s: %ld allocations, each failed once; %llu surfaced as no_memory\n", what, k,
              static_cast<unsigned long long>(surfaced));
  EXPECT_GT(k, 0) << what << " allocated nothing: the sweep tested nothing";
  return k;
}

// Calls f, which returns a Result or Status; an exception is a test failure
// and comes back as Errc::internal. A failure must be no_memory; counts it.
template <class F>
auto checked(const char* call, long k, uint64_t& surfaced, F&& f) -> decltype(f()) {
  using R = decltype(f());
  try {
    R r = f();
    if (!r) {
      EXPECT_EQ(r.error().code, Errc::no_memory) << call << ", allocation " << k << ": " << r.error().what();
      ++surfaced;
    }
    return r;
  } catch (const std::exception& e) {
    ADD_FAILURE() << call << " threw with allocation " << k << " failing: " << e.what();
  } catch (...) {
    ADD_FAILURE() << call << " threw with allocation " << k << " failing";
  }
  return R(fail(Errc::internal, "threw"));
}

std::unique_ptr<iommu::SimDomain> sim() {
  auto d = iommu::SimDomain::create();
  EXPECT_TRUE(d) << d.error().what();
  return std::move(*d);
}

iommu::ArenaConfig small_arena(bool strict) {
  iommu::ArenaConfig c;
  c.shards = 2;
  c.strict = strict;
  c.stale_max_pages = 16;  // flushes during the run, not only at the end
  c.iova_start = 0x100000;
  c.iova_end = 0x100000 + (4096ull << 12) - 1;  // 4096 pages: a large shard and two small ones
  return c;
}

// --- IovaArena -------------------------------------------------------------

TEST(OutOfMemory, IovaArenaCreate) {
  auto d = sim();
  const long points = sweep("arena create", [&](long k) {
    RunOutcome out;
    oomtest::fail_allocation(k);
    auto a = checked("IovaArena::create", k, out.surfaced, [&] { return iommu::IovaArena::create(*d, small_arena(false)); });
    out.fired = oomtest::disarm();
    if (a) {
      EXPECT_TRUE((*a)->check());
    }
    return out;
  });
  EXPECT_EQ(d->stats().mappings, 0u);
  EXPECT_GT(points, 0);
}

// Allocates ranges of several sizes (small and large shard), maps memory
// into each, frees them all and flushes; allocation k of the whole sequence
// fails. Frees refused for want of memory are retried after disarming.
void arena_ops(bool strict) {
  const char* name = strict ? "arena alloc/map/free/flush (strict)" : "arena alloc/map/free/flush (lazy)";
  auto d = sim();
  void* mem = nullptr;
  ASSERT_EQ(posix_memalign(&mem, 4096, 128 * 4096), 0);
  const long points = sweep(name, [&](long k) {
    RunOutcome out;
    auto made = iommu::IovaArena::create(*d, small_arena(strict));
    EXPECT_TRUE(made);
    if (!made) return out;
    iommu::IovaArena& a = **made;
    std::vector<iommu::IovaSpan> held, unmapped, refused;
    held.reserve(256);
    unmapped.reserve(256);
    refused.reserve(256);
    oomtest::fail_allocation(k);
    for (int round = 0; round < 3; ++round) {
      for (uint64_t pages : {1, 3, 1, 80, 2, 1, 100, 4}) {
        auto r = checked("IovaArena::alloc", k, out.surfaced, [&] { return a.alloc({pages * 4096, 0, ~0ull}); });
        if (!r) continue;
        // Fresh ranges only: a lazily freed range may still be mapped.
        auto m = checked("SimDomain::map", k, out.surfaced, [&] { return d->map(mem, r->iova, std::min<uint64_t>(pages, 128) * 4096, iommu::kReadWrite); });
        (m ? held : unmapped).push_back(*r);
      }
      for (auto& list : {&held, &unmapped}) {
        for (const auto& r : *list) {
          auto st = checked("IovaArena::free", k, out.surfaced, [&] { return a.free(r); });
          if (!st && st.error().code != Errc::no_memory) refused.push_back(r);
        }
        list->clear();
      }
    }
    (void)checked("IovaArena::flush", k, out.surfaced, [&] { return a.flush(); });
    out.fired = oomtest::disarm();
    for (const auto& r : refused) EXPECT_TRUE(a.free(r)) << "a free refused once frees later";
    EXPECT_TRUE(a.flush());
    const auto st = a.stats();
    EXPECT_EQ(st.pages_in_use, 0u) << "allocation " << k;
    EXPECT_EQ(st.stale_pages, 0u) << "allocation " << k;
    EXPECT_TRUE(a.check()) << a.check().error().what();
    EXPECT_EQ(d->stats().mappings, 0u) << "allocation " << k;
    return out;
  });
  std::free(mem);
  EXPECT_GT(points, 0);
}

TEST(OutOfMemory, IovaArenaLazy) { arena_ops(false); }
TEST(OutOfMemory, IovaArenaStrict) { arena_ops(true); }

// --- BufferAllocator --------------------------------------------------------

class OutOfMemoryEal : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { testing_support::start_nohuge_eal(); }
};

constexpr uint64_t K = 1024, M = 1024 * 1024;

std::vector<std::unique_ptr<alloc_buffer::MemorySource>> anon_sources() {
  std::vector<std::unique_ptr<alloc_buffer::MemorySource>> v;
  for (uint64_t o : {2 * M, 64 * K}) {
    auto s = alloc_buffer::make_anon_source(o, false);
    EXPECT_TRUE(s);
    v.push_back(std::move(*s));
  }
  auto s = alloc_buffer::make_anon_source(4 * K, true);
  EXPECT_TRUE(s);
  v.push_back(std::move(*s));
  return v;
}

alloc_buffer::BufferSettings buffer_settings() {
  alloc_buffer::BufferSettings s;
  s.psi = false;
  s.prezero = false;
  s.recycle_high_mb = 4;  // the last round's frees go past it: the shrinker retires some
  return s;
}

TEST_F(OutOfMemoryEal, BufferAllocatorCreate) {
  auto d = sim();
  auto arena = iommu::IovaArena::create(*d, iommu::ArenaConfig{});
  ASSERT_TRUE(arena);
  sweep("buffer allocator create", [&](long k) {
    RunOutcome out;
    auto sources = anon_sources();
    const alloc_buffer::BufferSettings settings = buffer_settings();
    oomtest::fail_allocation(k);
    auto a = checked("create_buffer_allocator", k, out.surfaced,
                     [&] { return alloc_buffer::create_buffer_allocator(**arena, settings, std::move(sources)); });
    out.fired = oomtest::disarm();
    if (a) {
      auto b = (*a)->alloc({.len = 4 * K});
      EXPECT_TRUE(b) << "allocation " << k;
    }
    return out;
  });
  EXPECT_EQ((*arena)->stats().pages_in_use, 0u);
  EXPECT_TRUE((*arena)->flush());
  EXPECT_EQ(d->stats().mappings, 0u);
}

// Buffers of every order, freed (recycled) and allocated again (recycle
// hits), some freed past the watermark (retired), then trim(true). With the
// default settings: the small ones come from slabs (slab growth, slot
// alloc and free, free slabs retired by trim and by reclaim_and_retry).
TEST_F(OutOfMemoryEal, BufferAllocatorAllocFreeRecycleTrim) {
  auto d = sim();
  uint64_t grows = 0, reclaims = 0;
  sweep("buffer alloc/free/recycle/trim", [&](long k) {
    RunOutcome out;
    auto arena = iommu::IovaArena::create(*d, iommu::ArenaConfig{});
    EXPECT_TRUE(arena);
    if (!arena) return out;
    std::vector<const alloc_buffer::MemorySource*> srcs;
    {
      auto made = alloc_buffer::create_buffer_allocator(**arena, buffer_settings(), anon_sources());
      EXPECT_TRUE(made);
      if (!made) return out;
      alloc_buffer::BufferAllocator& a = **made;
      srcs = a.sources();
      std::vector<alloc_buffer::Buffer> held;
      held.reserve(64);
      const uint64_t sizes[] = {4 * K, 3 * M + 68 * K, 64 * K, 12 * K, 2 * M};
      oomtest::fail_allocation(k);
      for (int round = 0; round < 3; ++round) {
        for (uint64_t len : sizes) {
          auto b = checked("BufferAllocator::alloc", k, out.surfaced,
                           [&] { return a.alloc({.len = len, .zeroed = round == 1}); });
          if (b) held.push_back(std::move(*b));  // reserved: no allocation
        }
        if (round < 2) held.clear();  // Buffer destruction: into the recycler
      }
      try {
        held.clear();
        a.trim(false);
        a.trim(true);
      } catch (...) {
        ADD_FAILURE() << "buffer free or trim threw with allocation " << k << " failing";
      }
      out.fired = oomtest::disarm();
      a.trim(true);
      const auto st = a.stats();
      grows += st.slab_grows;
      reclaims += st.reclaims;
      EXPECT_EQ(st.slab_bytes, 0u) << "allocation " << k;
      EXPECT_EQ(st.buffers_live, 0u) << "allocation " << k;
      EXPECT_EQ(st.bytes_live, 0u) << "allocation " << k;
      EXPECT_EQ(st.recycled_bytes, 0u) << "allocation " << k;
      EXPECT_EQ(st.pending_flush_bytes, 0u) << "allocation " << k;
      for (const auto* s : srcs) EXPECT_EQ(s->stats().live_bytes, 0u) << s->name() << ", allocation " << k;
      EXPECT_EQ((*arena)->stats().pages_in_use, 0u) << "allocation " << k;
      EXPECT_EQ((*arena)->stats().stale_pages, 0u) << "allocation " << k;
      EXPECT_EQ(d->stats().mappings, 0u) << "allocation " << k;
    }
    return out;
  });
  EXPECT_GT(grows, 0u) << "no slab was built: the slab paths went unswept";
  EXPECT_GT(reclaims, 0u) << "no failure was retried after retiring free slabs and recycled buffers";
}

// --- Context (simulated backend) -------------------------------------------

core::Config sim_config() {
  core::Config c;
  c.iommu.backend = "sim";
  c.eal.mode = "nohuge";
  c.eal.memory_mb = 64;
  c.buffer.psi = false;
  return c;
}

// Creates a context and uses each of its operations with allocation k
// failing; then checks the baseline and destroys it (disarmed).
TEST_F(OutOfMemoryEal, ContextCreateAndUse) {
  sweep("context create/use", [&](long k) {
    RunOutcome out;
    const core::Config cfg = sim_config();
    oomtest::fail_allocation(k);
    auto ctx = checked("Context::create", k, out.surfaced, [&] { return core::Context::create(cfg); });
    if (!ctx) {
      out.fired = oomtest::disarm();
      return out;
    }
    core::Context& c = **ctx;
    auto* d = dynamic_cast<iommu::SimDomain*>(&c.domain());
    EXPECT_NE(d, nullptr);
    if (d == nullptr) return out;
    const uint64_t base_maps = d->stats().mappings;
    {
      auto b = checked("BufferAllocator::alloc", k, out.surfaced, [&] { return c.buffers().alloc({.len = 20 * K}); });
      auto p = checked("Context::create_pool", k, out.surfaced, [&] { return c.create_pool("oom", 64, 64, 0); });
      if (p) {
        auto blk = checked("DmaPool::alloc", k, out.surfaced, [&] { return (*p)->alloc(); });
        if (blk) (void)checked("DmaPool::free", k, out.surfaced, [&] { return (*p)->free(*blk); });
        (void)checked("Context::destroy_pool", k, out.surfaced, [&] { return c.destroy_pool(*p); });
      }
      alignas(4096) static char region[8192];
      auto m = checked("Context::map_memory", k, out.surfaced,
                       [&] { return c.map_memory(region, sizeof region, iommu::kReadWrite); });
      if (m) (void)checked("Context::unmap_memory", k, out.surfaced, [&] { return c.unmap_memory(region); });
    }
    out.fired = oomtest::disarm();
    c.buffers().trim(true);
    EXPECT_EQ(c.buffers().stats().bytes_live, 0u) << "allocation " << k;
    EXPECT_EQ(c.buffers().stats().recycled_bytes, 0u) << "allocation " << k;
    EXPECT_EQ(c.arena().stats().pages_in_use, 0u) << "allocation " << k;
    EXPECT_EQ(d->stats().mappings, base_maps) << "allocation " << k;
    return out;
  });
}

// Destroys a context that holds a live buffer, a pool with a live block and
// a caller mapping, with allocation k of the teardown failing.
TEST_F(OutOfMemoryEal, ContextDestroy) {
  sweep("context destroy", [&](long k) {
    RunOutcome out;
    auto ctx = core::Context::create(sim_config());
    EXPECT_TRUE(ctx) << ctx.error().what();
    if (!ctx) return out;
    core::Context& c = **ctx;
    auto b = c.buffers().alloc({.len = 20 * K});
    EXPECT_TRUE(b);
    auto p = c.create_pool("oom", 64, 64, 0);
    EXPECT_TRUE(p);
    if (p) {
      EXPECT_TRUE((*p)->alloc());
    }
    alignas(4096) static char region[4096];
    EXPECT_TRUE(c.map_memory(region, sizeof region, iommu::kReadWrite));
    b = Result<alloc_buffer::Buffer>(fail(Errc::internal, "freed"));  // back to the recycler
    oomtest::fail_allocation(k);
    try {
      ctx = Result<std::unique_ptr<core::Context>>(fail(Errc::internal, "destroyed"));
    } catch (...) {
      ADD_FAILURE() << "context destruction threw with allocation " << k << " failing";
    }
    out.fired = oomtest::disarm();
    return out;
  });
}

// --- C API ----------------------------------------------------------------

int c_call(const char* call, long k, uint64_t& surfaced, int rc) {
  if (rc != DMAKIT_OK) {
    EXPECT_EQ(rc, DMAKIT_ENOMEM) << call << ", allocation " << k << ": " << dmakit_last_error();
    ++surfaced;
  }
  return rc;
}

TEST_F(OutOfMemoryEal, CApi) {
  sweep("C API", [&](long k) {
    RunOutcome out;
    dmakit_settings s;
    dmakit_settings_init(&s);
    s.backend = "sim";
    s.eal_mode = "nohuge";
    s.eal_memory_mb = 64;
    dmakit_ctx* ctx = nullptr;
    oomtest::fail_allocation(k);
    if (c_call("dmakit_ctx_create_with", k, out.surfaced, dmakit_ctx_create_with(&s, &ctx)) == DMAKIT_OK) {
      dmakit_ctx_stats before{};
      before.struct_size = sizeof before;
      const bool have_before = dmakit_ctx_get_stats(ctx, &before) == DMAKIT_OK;
      dmakit_buffer* b = nullptr;
      if (c_call("dmakit_buffer_alloc", k, out.surfaced, dmakit_buffer_alloc(ctx, 70 * K, 0, DMAKIT_BUF_ZEROED, ~0ull, &b)) == DMAKIT_OK) {
        dmakit_segment seg[4];
        size_t n = 0;
        c_call("dmakit_buffer_segments", k, out.surfaced, dmakit_buffer_segments(b, seg, 4, &n));
        uint64_t iova = 0, len = 0;
        c_call("dmakit_vtophys", k, out.surfaced, dmakit_vtophys(ctx, dmakit_buffer_vaddr(b), &iova, &len));
        c_call("dmakit_buffer_free", k, out.surfaced, dmakit_buffer_free(b));
      }
      dmakit_pool* pool = nullptr;
      if (c_call("dmakit_pool_create", k, out.surfaced, dmakit_pool_create(ctx, "oom", 64, 64, 0, &pool)) == DMAKIT_OK) {
        void* v = nullptr;
        uint64_t iova = 0;
        if (c_call("dmakit_pool_alloc", k, out.surfaced, dmakit_pool_alloc(pool, &v, &iova)) == DMAKIT_OK)
          c_call("dmakit_pool_free", k, out.surfaced, dmakit_pool_free(pool, v, iova));
        void* vs[8];
        uint64_t is[8];
        if (c_call("dmakit_pool_alloc_bulk", k, out.surfaced, dmakit_pool_alloc_bulk(pool, 8, vs, is)) == DMAKIT_OK)
          c_call("dmakit_pool_free_bulk", k, out.surfaced, dmakit_pool_free_bulk(pool, 8, vs, is));
        c_call("dmakit_pool_destroy", k, out.surfaced, dmakit_pool_destroy(pool));
      }
      alignas(4096) static char region[4096];
      uint64_t iova = 0;
      if (c_call("dmakit_mem_map", k, out.surfaced, dmakit_mem_map(ctx, region, sizeof region, 0, ~0ull, &iova)) == DMAKIT_OK)
        c_call("dmakit_mem_unmap", k, out.surfaced, dmakit_mem_unmap(ctx, region));
      c_call("dmakit_ctx_flush", k, out.surfaced, dmakit_ctx_flush(ctx));
      out.fired = oomtest::disarm();
      // Back at the baseline once everything is freed.
      EXPECT_EQ(dmakit_ctx_flush(ctx), DMAKIT_OK);
      dmakit_ctx_stats after{};
      after.struct_size = sizeof after;
      EXPECT_EQ(dmakit_ctx_get_stats(ctx, &after), DMAKIT_OK);
      EXPECT_EQ(after.buffers_live, 0u) << "allocation " << k;
      // Kept for reuse only: the recycler's buffers and slabs with no buffer in use.
      EXPECT_EQ(after.buffer_slab_bytes_in_use, 0u) << "allocation " << k;
      EXPECT_EQ(after.iova_pages_in_use * 4096, after.buffer_bytes_recycled + after.buffer_slab_bytes)
          << "allocation " << k;
      EXPECT_EQ(after.caller_maps, 0u) << "allocation " << k;
      EXPECT_EQ(after.pools, 0u) << "allocation " << k;
      // What stays mapped beyond the baseline is the recycler's and the slabs', all of it mapped.
      if (have_before) {
        EXPECT_EQ(after.mapped_bytes,
                  before.mapped_bytes + after.buffer_bytes_recycled + after.buffer_slab_bytes - before.buffer_slab_bytes)
            << "allocation " << k;
      }
      EXPECT_EQ(dmakit_ctx_destroy(ctx), DMAKIT_OK) << dmakit_last_error();
    } else {
      out.fired = oomtest::disarm();
    }
    return out;
  });
}

}  // namespace
