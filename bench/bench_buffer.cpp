// `dmakit bench buffer`: order fallback under fragmentation, mapping entries
// per GiB, pre-zeroed against memset zeroed allocation, and the small-buffer
// cases (many live 4 KiB buffers, a mix of 4 KiB-1 MiB, one 4 KiB alloc+free
// against rte_malloc and a DmaPool block). Each case builds its own
// allocator on the context's arena (sources and settings differ per case)
// and checks what it timed or counted before reporting it.
#include <rte_malloc.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "alloc_buffer/buffer_allocator.hpp"
#include "base/eal.hpp"
#include "bench.hpp"
#include "bench_buffer.hpp"
#include "fault_source.hpp"
#include "iommu/sim_domain.hpp"
#include "pool/dma_pool.hpp"
#include "timing.hpp"

namespace dmakit::bench {

namespace {

using alloc_buffer::BufferAllocator;
using alloc_buffer::FaultSource;
using alloc_buffer::MemorySource;

constexpr uint64_t kM = 1ull << 20;
constexpr int kRepeats = 21;

// 2M, 1M and 64K anonymous sources that always fail (full fragmentation)
// and a 4K source; `fault` receives the wrappers.
Result<std::vector<std::unique_ptr<MemorySource>>> fragmented_sources(std::vector<FaultSource*>& fault) {
  std::vector<std::unique_ptr<MemorySource>> v;
  for (uint64_t o : {2 * kM, kM, uint64_t{64 * 1024}, uint64_t{4096}}) {
    auto s = DMAKIT_TRY(alloc_buffer::make_anon_source(o, o == 4096));
    v.push_back(std::make_unique<FaultSource>(std::move(s)));
    fault.push_back(static_cast<FaultSource*>(v.back().get()));
    if (o != 4096) fault.back()->fail_after(0);
  }
  return v;
}

Status bench_fragmented(core::Context& ctx, Json& results) {
  const uint64_t bytes = 4 * kM;
  // dmakit: the allocator as shipped, recycling off so every request is built.
  {
    std::vector<FaultSource*> fault;
    auto sources = DMAKIT_TRY(fragmented_sources(fault));
    alloc_buffer::BufferSettings s = ctx.config().buffer;
    s.recycle_high_mb = 0;
    s.prezero = false;
    s.psi = false;
    auto a = DMAKIT_TRY(alloc_buffer::create_buffer_allocator(ctx.arena(), s, std::move(sources)));
    uint64_t first_attempts = 0, chunks = 0, later_attempts = 0;
    std::vector<double> us;
    for (int i = 0; i < kRepeats; ++i) {
      uint64_t t0 = now_ns();
      auto b = a->alloc({.len = bytes});
      if (!b) return std::unexpected(b.error());
      uint64_t t1 = now_ns();
      if (b->size() != bytes || b->chunks().empty() || b->chunks().back().order != 4096)
        return fail(Errc::internal, "bench buffer fragmented: buffer not served from 4K chunks");
      if (i == 0) first_attempts = b->attempts();
      else later_attempts = b->attempts();
      chunks = b->chunks().size();
      us.push_back(static_cast<double>(t1 - t0) / 1000.0);
    }
    a->trim(true);
    results.push_back(Json{{"case", "fragmented"}, {"bytes", bytes}, {"impl", "dmakit"}, {"attempts", first_attempts}, {"attempts_in_backoff", later_attempts}, {"chunks", chunks}, {"orders", uint64_t{4}}, {"includes", "source calls, IOVA, mapping"}, {"us", median(us)}});
  }
  // naive: for every 4K of the request, try every order from the largest.
  {
    std::vector<FaultSource*> fault;
    auto sources = DMAKIT_TRY(fragmented_sources(fault));
    uint64_t attempts = 0, chunks = 0;
    std::vector<double> us;
    std::vector<std::pair<void*, MemorySource*>> taken;
    for (int i = 0; i < kRepeats; ++i) {
      attempts = 0;
      taken.clear();
      uint64_t t0 = now_ns();
      for (uint64_t left = bytes; left != 0;) {
        bool got = false;
        for (auto& src : sources) {
          if (src->order() > left) continue;
          ++attempts;
          if (auto p = src->take(src->order())) {
            taken.emplace_back(*p, src.get());
            left -= src->order();
            got = true;
            break;
          }
        }
        if (!got) return fail(Errc::internal, "bench buffer fragmented: naive loop found no memory");
      }
      for (auto& [p, src] : taken) src->give(p, src->order());
      uint64_t t1 = now_ns();
      chunks = taken.size();
      us.push_back(static_cast<double>(t1 - t0) / 1000.0);
    }
    if (chunks != bytes / 4096) return fail(Errc::internal, "bench buffer fragmented: naive took {} chunks", chunks);
    results.push_back(Json{{"case", "fragmented"}, {"bytes", bytes}, {"impl", "naive"}, {"attempts", attempts}, {"chunks", chunks}, {"orders", uint64_t{4}}, {"includes", "source calls only"}, {"us", median(us)}});
  }
  return ok();
}

// Mapping entries for a sample of 4 MiB buffers, scaled to 1 GiB.
Status entries_case(core::Context& ctx, bool hugepages, Json& results) {
  alloc_buffer::BufferSettings s = ctx.config().buffer;
  s.recycle_high_mb = 0;
  s.prezero = false;
  s.psi = false;
  std::vector<std::unique_ptr<MemorySource>> sources;
  if (!hugepages) sources.push_back(DMAKIT_TRY(alloc_buffer::make_anon_source(4096, true)));
  auto a = DMAKIT_TRY(alloc_buffer::create_buffer_allocator(ctx.arena(), s, std::move(sources)));
  const uint64_t buffer_bytes = 4 * kM, sample = 64 * kM;
  uint64_t entries = 0, huge_bytes = 0;
  std::vector<alloc_buffer::Buffer> held;
  for (uint64_t done = 0; done < sample; done += buffer_bytes) {
    auto b = a->alloc({.len = buffer_bytes});
    if (!b) return std::unexpected(b.error());
    entries += b->mappings();
    for (const auto& c : b->chunks())
      if (c.source.starts_with("hugepage") || c.source.starts_with("carved")) huge_bytes += c.len;
    held.push_back(std::move(*b));
  }
  if (a->stats().map_calls != entries)
    return fail(Errc::internal, "bench buffer entries: {} map calls but buffers report {} mappings",
                a->stats().map_calls, entries);
  held.clear();
  a->trim(true);
  results.push_back(Json{{"case", "entries_per_gib"}, {"hugepages", hugepages}, {"entries", entries * ((1ull << 30) / sample)}, {"sample_bytes", sample}, {"buffer_bytes", buffer_bytes}, {"scaled_from_sample", true}, {"hugepage_share", static_cast<double>(huge_bytes) / static_cast<double>(sample)}, {"entries_one_per_4k_page", (1ull << 30) / 4096}});
  return ok();
}

Status bench_entries(core::Context& ctx, Json& results) {
  const base::EalInfo* eal = base::eal_info();
  if (eal != nullptr && eal->hugepages) {
    DMAKIT_TRY(entries_case(ctx, true, results));
  } else {
    results.push_back(Json{{"case", "entries_per_gib"}, {"hugepages", true}, {"skipped", "EAL runs without hugepages (reserve 2 MiB pages to measure)"}});
  }
  return entries_case(ctx, false, results);
}

// Times alloc of a zeroed 2 MiB buffer that was scribbled and freed: served
// by the zeroing thread's work (prezeroed) or memset on the caller's path.
Status bench_zeroed(core::Context& ctx, bool prezero, Json& results) {
  const uint64_t bytes = 2 * kM;
  alloc_buffer::BufferSettings s = ctx.config().buffer;
  s.prezero = prezero;
  s.psi = false;
  s.recycle_high_mb = std::max<uint64_t>(s.recycle_high_mb, 8);
  auto a = DMAKIT_TRY(alloc_buffer::create_buffer_allocator(ctx.arena(), s));
  auto scribble_and_free = [&](alloc_buffer::Buffer b) -> Status {
    for (const auto& c : b.chunks()) std::memset(c.vaddr, 0xff, c.len);
    b = alloc_buffer::Buffer();
    if (prezero && !a->wait_prezeroed(std::chrono::seconds(30)))
      return fail(Errc::timeout, "bench buffer zeroed: zeroing thread did not finish");
    return ok();
  };
  {
    auto warm = a->alloc({.len = bytes, .zeroed = true});
    if (!warm) return std::unexpected(warm.error());
    DMAKIT_TRY(scribble_and_free(std::move(*warm)));
  }
  std::vector<double> ns;
  for (int i = 0; i < kRepeats; ++i) {
    const uint64_t memsets = a->stats().memset_fallbacks;
    uint64_t t0 = now_ns();
    auto b = a->alloc({.len = bytes, .zeroed = true});
    uint64_t t1 = now_ns();
    if (!b) return std::unexpected(b.error());
    if (!b->recycled()) return fail(Errc::internal, "bench buffer zeroed: not served from the recycler");
    if (prezero == (a->stats().memset_fallbacks != memsets))
      return fail(Errc::internal, "bench buffer zeroed: {} path not taken", prezero ? "prezeroed" : "memset");
    for (const auto& c : b->chunks()) {
      auto* p = static_cast<const unsigned char*>(c.vaddr);
      if (std::any_of(p, p + c.len, [](unsigned char x) { return x != 0; }))
        return fail(Errc::internal, "bench buffer zeroed: buffer not zero");
    }
    ns.push_back(static_cast<double>(t1 - t0));
    DMAKIT_TRY(scribble_and_free(std::move(*b)));
  }
  a->trim(true);
  results.push_back(Json{{"case", "zeroed"}, {"bytes", bytes}, {"impl", prezero ? "prezeroed" : "memset"}, {"ns", median(ns)}});
  return ok();
}


alloc_buffer::BufferSettings quiet_settings(core::Context& ctx) {
  alloc_buffer::BufferSettings s = ctx.config().buffer;
  s.prezero = false;
  s.psi = false;
  return s;
}

// Live 4 KiB buffers, up to o.many_small: how many could be live at once and
// the mapping entries they took. A refusal ends the run and is reported
// (buffers < target, with its message) rather than failing the benchmark.
// Checked: every buffer's IOVA distinct (and reachable, on the simulated domain),
// the domain's new entries equal to the allocator's map calls.
Status bench_many_small(core::Context& ctx, const BufferBenchOptions& o, Json& results) {
  iommu::Domain& domain = ctx.arena().domain();
  const auto* sim = dynamic_cast<const iommu::SimDomain*>(&domain);  // the device's view, where it is simulated
  auto a = DMAKIT_TRY(alloc_buffer::create_buffer_allocator(ctx.arena(), quiet_settings(ctx)));
  const uint64_t entries_before = domain.stats().mappings;
  std::vector<alloc_buffer::Buffer> held;
  held.reserve(o.many_small);
  std::string refused;
  const uint64_t t0 = now_ns();
  while (held.size() < o.many_small) {
    auto b = a->alloc({.len = 4096});
    if (!b) {
      refused = b.error().what();
      break;
    }
    held.push_back(std::move(*b));
  }
  const uint64_t t1 = now_ns();
  const uint64_t entries = domain.stats().mappings - entries_before;
  if (entries != a->stats().map_calls)
    return fail(Errc::internal, "bench buffer many_small: {} new mapping entries but {} map calls", entries,
                a->stats().map_calls);
  std::vector<uint64_t> iovas;
  iovas.reserve(held.size());
  for (const auto& b : held) {
    iovas.push_back(b.iova());
    if (sim != nullptr && !sim->translate(b.iova(), 4096, iommu::kReadWrite))
      return fail(Errc::internal, "bench buffer many_small: IOVA {:#x} not reachable", b.iova());
  }
  std::sort(iovas.begin(), iovas.end());
  for (size_t i = 1; i < iovas.size(); ++i)
    if (iovas[i] - iovas[i - 1] < 4096)
      return fail(Errc::internal, "bench buffer many_small: IOVAs {:#x} and {:#x} overlap", iovas[i - 1], iovas[i]);
  const uint64_t live = held.size();
  held.clear();
  a->trim(true);
  Json j{{"case", "many_small"},
          {"bytes", uint64_t{4096}},
          {"buffers", live},
          {"target", o.many_small},
          {"entries", entries},
          {"entries_per_gib", live == 0 ? 0.0 : static_cast<double>(entries) * (1ull << 30) /
                                                  static_cast<double>(live * 4096)},
          {"ns_per_alloc", live == 0 ? 0.0 : static_cast<double>(t1 - t0) / static_cast<double>(live)}};
  if (!refused.empty()) j["refused"] = refused;
  results.push_back(std::move(j));
  return ok();
}

// Random sizes, 4 KiB to 1 MiB in 4 KiB steps (fixed seed), until
// o.mixed_bytes are live; entries per GiB of live memory. hugepages: the
// real sources (2 MiB pages and pieces); otherwise anonymous memory only.
Status mixed_case(core::Context& ctx, const BufferBenchOptions& o, bool hugepages, Json& results) {
  iommu::Domain& domain = ctx.arena().domain();
  const auto* sim = dynamic_cast<const iommu::SimDomain*>(&domain);  // the device's view, where it is simulated
  std::vector<std::unique_ptr<MemorySource>> sources;
  if (!hugepages) sources.push_back(DMAKIT_TRY(alloc_buffer::make_anon_source(4096, true)));
  auto a = DMAKIT_TRY(alloc_buffer::create_buffer_allocator(ctx.arena(), quiet_settings(ctx), std::move(sources)));
  const uint64_t entries_before = domain.stats().mappings;
  std::mt19937_64 rng(42);
  std::uniform_int_distribution<uint64_t> pages(1, 256);
  std::vector<alloc_buffer::Buffer> held;
  uint64_t live = 0, huge_bytes = 0;
  while (live < o.mixed_bytes) {
    const uint64_t len = pages(rng) * 4096;
    auto b = a->alloc({.len = len});
    if (!b) return std::unexpected(with_context(b.error(), "bench buffer mixed"));
    for (const auto& c : b->chunks()) {
      if (sim != nullptr && !sim->translate(c.iova, c.len, iommu::kReadWrite))
        return fail(Errc::internal, "bench buffer mixed: chunk at IOVA {:#x} not reachable", c.iova);
      if (c.source.starts_with("hugepage") || c.source.starts_with("carved")) huge_bytes += c.len;
    }
    live += len;
    held.push_back(std::move(*b));
  }
  const uint64_t entries = domain.stats().mappings - entries_before;
  if (entries != a->stats().map_calls)
    return fail(Errc::internal, "bench buffer mixed: {} new mapping entries but {} map calls", entries,
                a->stats().map_calls);
  // Slab buffers name no source of their own: their slabs' memory is
  // counted from the sources (whole hugepages; carved pieces are in them).
  uint64_t source_bytes = 0, source_huge = 0;
  for (const auto* src : a->sources()) {
    const uint64_t live_src = src->stats().live_bytes;
    if (src->name().starts_with("carved")) continue;
    source_bytes += live_src;
    if (src->name().starts_with("hugepage")) source_huge += live_src;
  }
  if (huge_bytes == 0 && source_bytes != 0)
    huge_bytes = live * source_huge / source_bytes;
  const uint64_t buffers = held.size();
  held.clear();
  a->trim(true);
  results.push_back(Json{{"case", "mixed"},
                         {"hugepages", hugepages},
                         {"buffers", buffers},
                         {"live_bytes", live},
                         {"entries", entries},
                         {"entries_per_gib", static_cast<double>(entries) * (1ull << 30) / static_cast<double>(live)},
                         {"hugepage_share", static_cast<double>(huge_bytes) / static_cast<double>(live)}});
  return ok();
}

Status bench_mixed(core::Context& ctx, const BufferBenchOptions& o, Json& results) {
  const base::EalInfo* eal = base::eal_info();
  if (eal != nullptr && eal->hugepages) {
    DMAKIT_TRY(mixed_case(ctx, o, true, results));
  } else {
    results.push_back(Json{{"case", "mixed"},
                           {"hugepages", true},
                           {"skipped", "EAL runs without hugepages (reserve 2 MiB pages to measure)"}});
  }
  return mixed_case(ctx, o, false, results);
}

// One 4 KiB alloc+free pair with o.small_live such buffers live, three ways
// in one run: the buffer allocator, rte_malloc/rte_free (4 KiB aligned), a
// 4096-byte DmaPool block. Checked untimed: every pointer distinct from the
// live ones and inside what it came from.
template <class Alloc, class Free>
Result<double> time_pairs(const BufferBenchOptions& o, Alloc&& alloc, Free&& release) {
  std::vector<double> ns;
  for (int r = 0; r < o.repeats; ++r) {
    bool ok = true;
    const uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < o.pairs && ok; ++i) ok = release(alloc());
    const uint64_t t1 = now_ns();
    if (!ok) return fail(Errc::internal, "bench buffer small_alloc_free: an alloc or free failed");
    ns.push_back(static_cast<double>(t1 - t0) / static_cast<double>(o.pairs));
  }
  return median(ns);
}

Status bench_small_alloc_free(core::Context& ctx, const BufferBenchOptions& o, Json& results) {
  const uint64_t bytes = 4096;
  double dmakit_ns = 0, rte_ns = 0, pool_ns = 0;
  {
    auto a = DMAKIT_TRY(alloc_buffer::create_buffer_allocator(ctx.arena(), quiet_settings(ctx)));
    std::vector<alloc_buffer::Buffer> live;
    for (uint32_t i = 0; i < o.small_live; ++i) {
      auto b = a->alloc({.len = bytes});
      if (!b) return std::unexpected(with_context(b.error(), "bench buffer small_alloc_free"));
      live.push_back(std::move(*b));
    }
    std::vector<uint64_t> iovas;
    for (const auto& b : live) iovas.push_back(b.iova());
    std::sort(iovas.begin(), iovas.end());
    {
      auto probe = a->alloc({.len = bytes});
      if (!probe || probe->size() != bytes || std::binary_search(iovas.begin(), iovas.end(), probe->iova()))
        return fail(Errc::internal, "bench buffer small_alloc_free: a buffer shares its IOVA with a live one");
    }
    dmakit_ns = DMAKIT_TRY(time_pairs(
        o, [&] { return a->alloc({.len = bytes}); },
        [](Result<alloc_buffer::Buffer> b) { return b.has_value(); }));
    if (a->stats().buffers_live != o.small_live)
      return fail(Errc::internal, "bench buffer small_alloc_free: {} buffers live, {} expected",
                  a->stats().buffers_live, o.small_live);
  }
  {
    std::vector<void*> live;
    for (uint32_t i = 0; i < o.small_live; ++i) {
      void* p = rte_malloc(nullptr, bytes, bytes);
      if (p == nullptr) {
        for (void* q : live) rte_free(q);
        return fail(Errc::no_memory, "bench buffer small_alloc_free: rte_malloc of {} bytes failed", bytes);
      }
      live.push_back(p);
    }
    auto r = time_pairs(
        o, [&] { return rte_malloc(nullptr, bytes, bytes); },
        [&](void* p) {
          const bool good = p != nullptr && (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
          rte_free(p);
          return good;
        });
    for (void* q : live) rte_free(q);
    rte_ns = DMAKIT_TRY(std::move(r));
  }
  {
    auto pool = DMAKIT_TRY(pool::DmaPool::create(pool::make_buffer_backing(ctx.buffers()), "bench-4k", bytes,
                                                 bytes, 0, pool::PoolOptions{}));
    std::vector<pool::DmaBlock> live;
    for (uint32_t i = 0; i < o.small_live; ++i) live.push_back(DMAKIT_TRY(pool->alloc()));
    pool_ns = DMAKIT_TRY(time_pairs(
        o, [&] { return pool->alloc(); },
        [&](Result<pool::DmaBlock> b) { return b.has_value() && static_cast<bool>(pool->free(*b)); }));
    for (const auto& b : live) DMAKIT_TRY(pool->free(b));
    if (pool->stats().active != 0)
      return fail(Errc::internal, "bench buffer small_alloc_free: {} pool blocks still active", pool->stats().active);
  }
  for (const auto& [impl, ns] : {std::pair{"dmakit", dmakit_ns}, {"rte_malloc", rte_ns}, {"dmakit-pool", pool_ns}}) {
    Json j{{"case", "small_alloc_free"}, {"bytes", bytes},    {"impl", impl},
           {"live", uint64_t{o.small_live}}, {"pairs", o.pairs}, {"ns_per_pair", ns}};
    if (std::string_view(impl) == "dmakit") {
      j["vs_pool"] = dmakit_ns / pool_ns;
      j["vs_rte_malloc"] = dmakit_ns / rte_ns;
    }
    results.push_back(std::move(j));
  }
  return ok();
}

}  // namespace

Result<Json> run_buffer(core::Context& ctx, const BufferBenchOptions& o) {
  if (o.many_small == 0 || o.mixed_bytes == 0 || o.pairs == 0 || o.repeats <= 0)
    return fail(Errc::invalid_argument, "bench buffer: every count must be positive");
  Json results = Json::array();
  if (o.classic) {
    DMAKIT_TRY(bench_fragmented(ctx, results));
    DMAKIT_TRY(bench_entries(ctx, results));
    DMAKIT_TRY(bench_zeroed(ctx, true, results));
    DMAKIT_TRY(bench_zeroed(ctx, false, results));
  }
  DMAKIT_TRY(bench_many_small(ctx, o, results));
  DMAKIT_TRY(bench_mixed(ctx, o, results));
  DMAKIT_TRY(bench_small_alloc_free(ctx, o, results));
  return Json{{"bench", "buffer"}, {"results", results}};
}

Result<Json> run_buffer(core::Context& ctx, bool quick) {
  if (!quick) return run_buffer(ctx, BufferBenchOptions{});
  // Every case, small: enough to show each runs and checks its work.
  return run_buffer(ctx, BufferBenchOptions{.many_small = 20000, .mixed_bytes = 32ull << 20, .pairs = 2000, .repeats = 3});
}

}  // namespace dmakit::bench
