// `dmakit bench arena`: IovaArena alloc+free cost and the unmap calls lazy
// flush saves over strict unmapping, on the context's domain (simulated on
// hosts without VFIO, the real type1 container in the guest).
//
// Cases:
//   alloc_free  pages 1/16/512, one thread: median ns per alloc+free pair;
//               pages 1, two threads on one arena: wall time / all pairs.
//   map_unmap   `cycles` x (alloc 4K-64K, Domain::map of real host memory,
//               free), lazy and strict, then a flush; unmap calls counted
//               at the domain.
// Each case checks its own work (every request served, arena drained,
// domain mappings back to where they started) and fails otherwise.
#include "bench_arena.hpp"

#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "bench.hpp"
#include "iommu/iova_arena.hpp"
#include "timing.hpp"

namespace dmakit::bench {

namespace {

using iommu::ArenaConfig;
using iommu::Domain;
using iommu::IovaArena;
using iommu::IovaRequest;
using iommu::IovaSpan;

// CPU time of the calling thread: on a shared host the wall clock also counts
// time the thread spent preempted, so both are reported.
uint64_t thread_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000u + static_cast<uint64_t>(ts.tv_nsec);
}

ArenaConfig confined(IovaSpan region, bool strict) {
  ArenaConfig c;
  c.iova_start = region.iova;
  c.iova_end = region.end() - 1;
  c.strict = strict;
  return c;
}

// Page-aligned anonymous memory that the map cycles point the device at.
class HostBuffer {
 public:
  static Result<HostBuffer> create(uint64_t len) {
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) return fail_errno(errno, "mmap of a {}-byte bench buffer", len);
    return HostBuffer(p, len);
  }
  HostBuffer(HostBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), len_(o.len_) {}
  HostBuffer& operator=(HostBuffer&&) = delete;
  ~HostBuffer() {
    if (p_ != nullptr) munmap(p_, len_);
  }
  void* get() const { return p_; }

 private:
  HostBuffer(void* p, uint64_t len) : p_(p), len_(len) {}
  void* p_;
  uint64_t len_;
};

// Flushes and checks that the arena gave back everything it handed out.
Status drain(IovaArena& arena, const char* what, uint64_t ranges_freed) {
  DMAKIT_TRY(arena.flush());
  const iommu::ArenaStats s = arena.stats();
  if (s.pages_in_use != 0 || s.stale_pages != 0 || s.ranges_flushed != ranges_freed)
    return fail(Errc::internal,
                "arena bench {}: after the run {} pages in use, {} stale, {} of {} freed ranges unmapped", what,
                s.pages_in_use, s.stale_pages, s.ranges_flushed, ranges_freed);
  DMAKIT_TRY(arena.check());
  return ok();
}

struct OneThread {
  double ns_per_op;      // wall
  double cpu_ns_per_op;  // thread CPU time
};

Result<OneThread> alloc_free_one_thread(Domain& dom, IovaSpan region, uint64_t pages, uint64_t pairs,
                                        int repeats) {
  auto arena = DMAKIT_TRY(IovaArena::create(dom, confined(region, false)));
  const IovaRequest req{pages * arena->page_size(), 0, ~0ull};
  std::vector<double> samples, cpu_samples;
  for (int r = 0; r < repeats; ++r) {
    const uint64_t c0 = thread_cpu_ns();
    const uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < pairs; ++i) {
      auto span = arena->alloc(req);
      if (!span) return std::unexpected(with_context(span.error(), "arena bench alloc_free"));
      if (auto st = arena->free(*span); !st) return std::unexpected(with_context(st.error(), "arena bench alloc_free"));
    }
    samples.push_back(static_cast<double>(now_ns() - t0) / static_cast<double>(pairs));
    cpu_samples.push_back(static_cast<double>(thread_cpu_ns() - c0) / static_cast<double>(pairs));
  }
  DMAKIT_TRY(drain(*arena, "alloc_free", pairs * static_cast<uint64_t>(repeats)));
  return OneThread{median(samples), median(cpu_samples)};
}

struct TwoThreads {
  double ns_per_op;
  double ops_per_sec;
};

Result<TwoThreads> alloc_free_two_threads(Domain& dom, IovaSpan region, uint64_t pairs, int repeats) {
  auto arena = DMAKIT_TRY(IovaArena::create(dom, confined(region, false)));
  const IovaRequest req{arena->page_size(), 0, ~0ull};
  std::vector<double> walls;
  std::mutex err_mu;
  std::optional<Error> err;
  for (int r = 0; r < repeats; ++r) {
    std::atomic<bool> go{false};
    auto body = [&] {
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      for (uint64_t i = 0; i < pairs; ++i) {
        auto span = arena->alloc(req);
        Status st = span ? arena->free(*span) : Status(std::unexpected(span.error()));
        if (!st) {
          std::lock_guard lk(err_mu);
          if (!err) err = st.error();
          return;
        }
      }
    };
    std::thread a(body), b(body);
    const uint64_t t0 = now_ns();
    go.store(true, std::memory_order_release);
    a.join();
    b.join();
    walls.push_back(static_cast<double>(now_ns() - t0));
    if (err) return std::unexpected(with_context(*err, "arena bench alloc_free with two threads"));
  }
  DMAKIT_TRY(drain(*arena, "alloc_free threads=2", 2 * pairs * static_cast<uint64_t>(repeats)));
  const double wall = median(walls);
  const double total = 2.0 * static_cast<double>(pairs);
  return TwoThreads{wall / total, total / (wall / 1e9)};
}

struct MapUnmap {
  uint64_t unmap_calls;
  uint64_t map_calls;
  uint64_t flushes;
  double wall_ms;
};

Result<MapUnmap> map_unmap(Domain& dom, IovaSpan region, bool strict, uint64_t cycles) {
  auto arena = DMAKIT_TRY(IovaArena::create(dom, confined(region, strict)));
  const uint64_t page = arena->page_size();
  const uint64_t max_pages = std::max<uint64_t>(1, (64u << 10) / page);
  auto buf = DMAKIT_TRY(HostBuffer::create(max_pages * page));
  const iommu::DomainStats before = dom.stats();
  std::mt19937_64 rng(1);
  const uint64_t t0 = now_ns();
  for (uint64_t i = 0; i < cycles; ++i) {
    const uint64_t len = (1 + rng() % max_pages) * page;
    auto span = arena->alloc({len, 0, ~0ull});
    if (!span) return std::unexpected(with_context(span.error(), "arena bench map_unmap"));
    if (auto st = dom.map(buf.get(), span->iova, len, iommu::kReadWrite); !st)
      return std::unexpected(with_context(st.error(), "arena bench map_unmap"));
    if (auto st = arena->free(*span); !st) return std::unexpected(with_context(st.error(), "arena bench map_unmap"));
  }
  DMAKIT_TRY(arena->flush());
  const double wall_ms = static_cast<double>(now_ns() - t0) / 1e6;
  const iommu::DomainStats after = dom.stats();
  const iommu::ArenaStats as = arena->stats();
  MapUnmap m{after.unmap_calls - before.unmap_calls, after.map_calls - before.map_calls, as.flushes, wall_ms};
  // The domain saw exactly our maps, and every one of them is gone again.
  if (m.map_calls != cycles || after.mappings != before.mappings || as.unmap_calls > m.unmap_calls ||
      (strict && as.unmap_calls != cycles))
    return fail(Errc::internal,
                "arena bench map_unmap ({}): {} maps for {} cycles, mappings {} -> {}, arena unmap calls {} vs "
                "domain {}",
                strict ? "strict" : "lazy", m.map_calls, cycles, before.mappings, after.mappings, as.unmap_calls,
                m.unmap_calls);
  DMAKIT_TRY(drain(*arena, strict ? "map_unmap strict" : "map_unmap lazy", cycles));
  return m;
}

}  // namespace

Result<Json> run_arena(Domain& domain, IovaSpan region, const ArenaBenchOptions& opt) {
  if (opt.repeats < 1 || opt.pairs == 0 || opt.cycles == 0)
    return fail(Errc::invalid_argument, "arena bench: repeats, pairs and cycles must be positive");
  auto results = Json::array();
  for (uint64_t pages : {1u, 16u, 512u}) {
    // Fewer pairs for big requests, so each case runs for a similar time.
    const uint64_t pairs = pages >= 512 ? std::max<uint64_t>(1, opt.pairs / 8) : opt.pairs;
    const OneThread one = DMAKIT_TRY(alloc_free_one_thread(domain, region, pages, pairs, opt.repeats));
    results.push_back(Json{{"case", "alloc_free"}, {"pages", pages}, {"threads", 1}, {"ns_per_op", one.ns_per_op}, {"cpu_ns_per_op", one.cpu_ns_per_op}, {"op", "alloc+free pair"}, {"pairs", pairs}, {"repeats", opt.repeats}});
  }
  const TwoThreads two = DMAKIT_TRY(alloc_free_two_threads(domain, region, opt.pairs, opt.repeats));
  results.push_back(Json{{"case", "alloc_free"}, {"pages", 1}, {"threads", 2}, {"ns_per_op", two.ns_per_op}, {"ops_per_sec", two.ops_per_sec}, {"op", "alloc+free pair"}, {"pairs", 2 * opt.pairs}, {"repeats", opt.repeats}});

  const MapUnmap lazy = DMAKIT_TRY(map_unmap(domain, region, false, opt.cycles));
  const MapUnmap strict = DMAKIT_TRY(map_unmap(domain, region, true, opt.cycles));
  const double ratio = static_cast<double>(lazy.unmap_calls) / static_cast<double>(strict.unmap_calls);
  for (const auto& [mode, m] : {std::pair{"lazy", lazy}, std::pair{"strict", strict}}) {
    results.push_back(Json{{"case", "map_unmap"}, {"mode", mode}, {"cycles", opt.cycles}, {"unmap_calls", m.unmap_calls}, {"map_calls", m.map_calls}, {"flushes", m.flushes}, {"wall_ms", m.wall_ms}, {"lazy_over_strict_unmap_calls", ratio}, {"backend", domain.info().backend}});
  }
  auto out = Json::object();
  out["bench"] = "arena"; out["results"] = results;
  return out;
}

Result<Json> run_arena(core::Context& ctx, bool quick) {
  // Reserve a region of the context's own arena, so the bench's arenas and
  // maps never meet mappings that other parts of the context own.
  iommu::IovaArena& owner = ctx.arena();
  Result<IovaSpan> region = fail(Errc::no_space, "no region");
  for (uint64_t len : {1ull << 30, 256ull << 20, 64ull << 20}) {
    region = owner.alloc({len, 2ull << 20, ~0ull});
    if (region) break;
  }
  if (!region) return std::unexpected(with_context(region.error(), "arena bench: reserving an IOVA region"));
  ArenaBenchOptions opt;
  if (quick) {
    opt.cycles = 2000;
    opt.pairs = 2000;
    opt.repeats = 1;
  }
  auto r = run_arena(ctx.domain(), *region, opt);
  if (auto st = owner.free(*region); !st && r) return std::unexpected(st.error());
  return r;
}

}  // namespace dmakit::bench
