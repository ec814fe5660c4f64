// `dmakit bench buffer`: order fallback under fragmentation, mapping entries
// per GiB, and pre-zeroed against memset zeroed allocation. Each case builds
// its own allocator on the context's arena (sources and settings differ per
// case) and checks what it timed before reporting it.
#include <algorithm>
#include <cstring>
#include <vector>

#include "alloc_buffer/buffer_allocator.hpp"
#include "base/eal.hpp"
#include "bench.hpp"
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

}  // namespace

Result<Json> run_buffer(core::Context& ctx) {
  Json results = Json::array();
  DMAKIT_TRY(bench_fragmented(ctx, results));
  DMAKIT_TRY(bench_entries(ctx, results));
  DMAKIT_TRY(bench_zeroed(ctx, true, results));
  DMAKIT_TRY(bench_zeroed(ctx, false, results));
  return Json{{"bench", "buffer"}, {"results", results}};
}

}  // namespace dmakit::bench
