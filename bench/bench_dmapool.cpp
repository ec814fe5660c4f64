// `dmakit bench dmapool`: the Linux kernel's dmapool benchmark pattern
// (mm/dmapool_test.c) on dmakit pools and on DPDK's rte_mempool.
//
// Six shapes (size/align/boundary); blocks = clamp((4096 / size) * 512,
// 1024, 8192); one timed run = `rounds` times: allocate every block one by
// one, then free every block. Each run starts from a fresh pool, so dmakit's
// growth (taking chunks from the backing) is inside the first round, as in
// the kernel's test; rte_mempool is populated at creation, outside the timing.
// The median of `repeats` runs is reported, the best one too. dmakit runs
// with validation on (it always is); rte_mempool validates nothing and
// honours neither alignment above its cache line nor boundaries.
//
// Two threads run three ways: dmakit sharing one pool, dmakit with a pool
// per thread (nothing shared: how far two threads scale on this machine at
// all), and rte_mempool with a cache per thread. Each carries its throughput
// over the same implementation's one-thread run. One more single-thread
// rte_mempool case also reads each object's IOVA, which a DMA user needs and
// dmakit returns; the goal is judged against plain rte_mempool.
//
// Besides wall time, each result carries CPU time (CLOCK_THREAD_CPUTIME_ID
// summed over the timed threads, per pair): on a shared host, two threads
// may get less than two cores, and the CPU time per pair then still shows
// whether the pool itself scales (equal CPU time per pair at one and two
// threads means no contention inside the pool).
//
// Each case is checked before it is timed (every block distinct, aligned,
// inside no boundary) and after (pool empty again, no validation failure);
// a broken run fails the benchmark instead of printing numbers.
#include "bench_dmapool.hpp"

#include <rte_errno.h>
#include <rte_lcore.h>
#include <pthread.h>
#include <rte_mempool.h>
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <string_view>
#include <thread>
#include <vector>

#include "base/eal.hpp"
#include "bench.hpp"
#include "timing.hpp"

namespace dmakit::bench {

namespace {

struct Shape {
  size_t size, align, boundary;
};
constexpr Shape kShapes[] = {{16, 16, 0}, {64, 64, 0}, {256, 256, 0}, {1024, 1024, 0}, {4096, 4096, 0}, {68, 32, 4096}};

uint32_t blocks_for(const Shape& s, uint32_t max_blocks) {
  const uint64_t n = std::clamp<uint64_t>((4096 / s.size) * 512, 1024, 8192);
  return static_cast<uint32_t>(std::min<uint64_t>(n, max_blocks));
}

// EAL pins the thread that initialised it (this one) to lcore 0, and new
// threads inherit that mask: "two threads" would take turns on one core.
// Worker i is pinned to the i-th CPU the process may use instead (as DPDK
// runs one lcore per core). Merely widening the mask is not enough: the
// scheduler leaves the new thread where it is and balances it away only
// after milliseconds, longer than a run.
void pin_worker(uint32_t i) {
  // Every bit set: the kernel keeps the CPUs that exist and that the cpuset
  // allows; reading the mask back gives the usable CPUs.
  cpu_set_t all;
  CPU_ZERO(&all);
  for (int c = 0; c < CPU_SETSIZE; ++c) CPU_SET(c, &all);
  if (pthread_setaffinity_np(pthread_self(), sizeof all, &all) != 0) return;  // best effort
  cpu_set_t usable;
  CPU_ZERO(&usable);
  if (pthread_getaffinity_np(pthread_self(), sizeof usable, &usable) != 0) return;
  const int n = CPU_COUNT(&usable);
  if (n <= 1) return;
  int want = static_cast<int>(i % static_cast<uint32_t>(n));
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (!CPU_ISSET(c, &usable)) continue;
    if (want-- == 0) {
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(c, &one);
      (void)pthread_setaffinity_np(pthread_self(), sizeof one, &one);
      return;
    }
  }
}

uint64_t thread_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000u + static_cast<uint64_t>(ts.tv_nsec);
}

struct Sample {
  double wall_ns = 0, cpu_ns = 0;  // cpu: summed over the timed threads
  uint64_t steals = 0;             // dmakit: magazines one thread took from another's cache
};

struct Timing {
  double median_ns = 0, best_ns = 0, cpu_median_ns = 0;
  uint64_t steals = 0;  // over all runs
};

Timing summarize(const std::vector<Sample>& samples) {
  std::vector<double> wall, cpu;
  for (const Sample& x : samples) {
    wall.push_back(x.wall_ns);
    cpu.push_back(x.cpu_ns);
  }
  uint64_t steals = 0;
  for (const Sample& x : samples) steals += x.steals;
  return {median(wall), *std::min_element(wall.begin(), wall.end()), median(cpu), steals};
}

base::Json result(const Shape& s, uint32_t blocks, uint32_t threads, const char* impl, uint32_t cache,
                  uint32_t rounds, const Timing& t) {
  const double pairs = double(blocks) * rounds * threads;
  auto j = base::Json::object();
  j.add("size", uint64_t{s.size})
      .add("align", uint64_t{s.align})
      .add("boundary", uint64_t{s.boundary})
      .add("blocks", blocks)
      .add("threads", threads)
      .add("impl", impl)
      .add("cache", cache)
      .add("rounds", rounds)
      .add("total_us", t.median_ns / 1e3)
      .add("best_us", t.best_ns / 1e3)
      .add("ns_per_pair", t.median_ns / pairs)
      .add("cpu_ns_per_pair", t.cpu_median_ns / pairs);
  return j;
}

Status check_blocks(const char* impl, const Shape& s, size_t len, std::vector<uintptr_t> addrs) {
  std::sort(addrs.begin(), addrs.end());
  for (size_t i = 0; i + 1 < addrs.size(); ++i)
    if (addrs[i] + len > addrs[i + 1])
      return fail(Errc::internal, "dmapool bench ({} {}/{}/{}): blocks {:#x} and {:#x} overlap", impl, s.size,
                  s.align, s.boundary, addrs[i], addrs[i + 1]);
  return ok();
}

// The kernel's pattern on one thread's share of blocks; false when an alloc or free failed.
bool alloc_free_rounds(pool::DmaPool& pool, std::vector<pool::DmaBlock>& held, uint32_t rounds) {
  for (uint32_t r = 0; r < rounds; ++r) {
    for (auto& b : held) {
      auto got = pool.alloc();
      if (!got) [[unlikely]] return false;
      b = *got;
    }
    for (const auto& b : held)
      if (!pool.free(b)) [[unlikely]] return false;
  }
  return true;
}

// Runs body(i) (false: failed) on `threads` pinned workers from a common,
// spinning start line: a thread parked in a futex (std::barrier) may take
// milliseconds to wake on a virtual machine whose other vCPU is halted, and
// the workers would then run one after the other. Wall time from the first
// start to the last end, CPU time summed. One thread runs on the caller.
template <class Body>
Sample run_workers(uint32_t threads, bool& failed, Body&& body) {
  if (threads == 1) {
    const uint64_t c0 = thread_cpu_ns();
    const uint64_t t0 = now_ns();
    failed = !body(0u);
    const uint64_t t1 = now_ns();
    return Sample{static_cast<double>(t1 - t0), static_cast<double>(thread_cpu_ns() - c0)};
  }
  std::atomic<uint32_t> arrived{0};
  std::atomic<bool> bad{false};
  std::vector<uint64_t> begins(threads), ends(threads), cpus(threads);
  std::vector<std::thread> ts;
  for (uint32_t i = 0; i < threads; ++i)
    ts.emplace_back([&, i] {
      pin_worker(i);
      arrived.fetch_add(1, std::memory_order_acq_rel);
      while (arrived.load(std::memory_order_acquire) < threads) {
      }
      // Each worker stamps its own start and end: the main thread may be
      // descheduled between the start line and a clock read of its own.
      const uint64_t c0 = thread_cpu_ns();
      const uint64_t b = now_ns();
      const bool good = body(i);
      const uint64_t e = now_ns();
      const uint64_t c = thread_cpu_ns() - c0;
      // Written once at the end: the result slots share a cache line.
      begins[i] = b;
      ends[i] = e;
      cpus[i] = c;
      if (!good) bad = true;
    });
  for (auto& t : ts) t.join();
  failed = bad;
  uint64_t cpu = 0;
  for (uint64_t c : cpus) cpu += c;
  const uint64_t t0 = *std::min_element(begins.begin(), begins.end());
  const uint64_t t1 = *std::max_element(ends.begin(), ends.end());
  return Sample{static_cast<double>(t1 - t0), static_cast<double>(cpu)};
}

// `threads` threads each doing the pattern on `blocks` blocks: of one shared
// dmakit pool, or (own_pools) each of a pool of its own, which shares
// nothing and so measures how far two threads scale on this machine at all.
Result<Sample> time_dmakit(const Shape& s, uint32_t blocks, uint32_t threads, bool own_pools,
                           const DmapoolBenchOptions& o, const BackingFactory& backing) {
  pool::PoolOptions po;
  po.cache_size = o.cache_size;
  std::vector<std::unique_ptr<pool::DmaPool>> pools;
  for (uint32_t i = 0; i < (own_pools ? threads : 1u); ++i)
    pools.push_back(DMAKIT_TRY(pool::DmaPool::create(backing(), "bench", s.size, s.align, s.boundary, po)));
  std::vector<std::vector<pool::DmaBlock>> held(threads, std::vector<pool::DmaBlock>(blocks));
  bool failed = false;
  const Sample x = run_workers(threads, failed, [&](uint32_t i) {
    return alloc_free_rounds(*pools[own_pools ? i : 0], held[i], o.rounds);
  });
  Sample out = x;
  for (const auto& pool : pools) {
    auto st = pool->stats();
    out.steals += st.steals;
    if (failed || st.active != 0 || st.validation_failures != 0)
      return fail(Errc::internal,
                  "dmapool bench (dmakit {}/{}/{}, {} threads): alloc or free failed, or {} blocks still active, "
                  "{} validation failures",
                  s.size, s.align, s.boundary, threads, st.active, st.validation_failures);
  }
  return out;
}

// Untimed: every block distinct, aligned, within its boundary; the pool empty afterwards.
Status verify_dmakit(const Shape& s, uint32_t blocks, const DmapoolBenchOptions& o, const BackingFactory& backing) {
  pool::PoolOptions po;
  po.cache_size = o.cache_size;
  auto pool = DMAKIT_TRY(pool::DmaPool::create(backing(), "bench-check", s.size, s.align, s.boundary, po));
  std::vector<pool::DmaBlock> held;
  std::vector<uintptr_t> addrs;
  for (uint32_t i = 0; i < blocks; ++i) {
    auto b = DMAKIT_TRY(pool->alloc());
    const auto v = reinterpret_cast<uintptr_t>(b.vaddr);
    if (v % s.align != 0 || b.iova % s.align != 0 ||
        (s.boundary != 0 && b.iova / s.boundary != (b.iova + pool->block_size() - 1) / s.boundary))
      return fail(Errc::internal, "dmapool bench: block {:#x} (IOVA {:#x}) breaks {}/{}/{}", v, b.iova, s.size,
                  s.align, s.boundary);
    held.push_back(b);
    addrs.push_back(v);
  }
  DMAKIT_TRY(check_blocks("dmakit", s, pool->block_size(), addrs));
  for (const auto& b : held) DMAKIT_TRY(pool->free(b));
  if (pool->stats().active != 0) return fail(Errc::internal, "dmapool bench: pool not empty after freeing all");
  return ok();
}

// The same pattern on one rte_mempool of threads x blocks objects (plus,
// with two threads, twice a cache per thread: objects one worker's cache
// holds back must not starve the other). One
// thread uses the per-lcore cache (the EAL thread is lcore 0); with two, each
// worker (not an EAL lcore) gets a cache of its own from
// rte_mempool_cache_create, as DPDK documents for non-EAL threads.
//
// with_iova: each get also reads the object's IOVA (rte_mempool_virt2iova,
// from the object header) and keeps it beside the pointer, as a DMA user
// must and as dmakit's alloc returns it.
Result<Sample> time_mempool(const Shape& s, uint32_t blocks, uint32_t threads, const DmapoolBenchOptions& o,
                            bool verify, bool with_iova = false) {
  static std::atomic<int> seq{0};
  const std::string name = fmt::format("dmakit-bench-{}", seq++);
  const uint32_t total = threads == 1 ? blocks : threads * (blocks + 2 * o.mempool_cache);
  rte_mempool* mp = rte_mempool_create(name.c_str(), total, static_cast<unsigned>(s.size), o.mempool_cache, 0,
                                       nullptr, nullptr, nullptr, nullptr, SOCKET_ID_ANY, 0);
  if (mp == nullptr)
    return fail_errno(rte_errno, "rte_mempool_create({}, n={}, size={}, cache={})", name, total, s.size,
                      o.mempool_cache);
  std::vector<rte_mempool_cache*> caches(threads, nullptr);
  for (uint32_t i = 0; i < threads && threads > 1; ++i) {
    caches[i] = rte_mempool_cache_create(o.mempool_cache, SOCKET_ID_ANY);
    if (caches[i] == nullptr) {
      for (rte_mempool_cache* c : caches) rte_mempool_cache_free(c);
      rte_mempool_free(mp);
      return fail_errno(rte_errno, "rte_mempool_cache_create({})", o.mempool_cache);
    }
  }
  std::vector<std::vector<void*>> held(threads, std::vector<void*>(blocks));
  std::vector<std::vector<pool::DmaBlock>> held_iova(with_iova ? threads : 0, std::vector<pool::DmaBlock>(blocks));
  const uint32_t rounds = verify ? 1 : o.rounds;
  std::string bad_blocks;
  bool failed = false;
  const Sample x = run_workers(threads, failed, [&](uint32_t i) {
    rte_mempool_cache* cache = threads > 1 ? caches[i] : rte_mempool_default_cache(mp, rte_lcore_id());
    if (with_iova) {
      for (uint32_t r = 0; r < rounds; ++r) {
        for (auto& b : held_iova[i]) {
          void* p;
          if (rte_mempool_generic_get(mp, &p, 1, cache) != 0) [[unlikely]] return false;
          b = pool::DmaBlock{p, rte_mempool_virt2iova(p)};
        }
        for (const auto& b : held_iova[i]) rte_mempool_generic_put(mp, &b.vaddr, 1, cache);
      }
      if (cache != nullptr) rte_mempool_cache_flush(cache, mp);
      return true;
    }
    std::vector<void*>& mine = held[i];
    for (uint32_t r = 0; r < rounds; ++r) {
      for (auto& p : mine)
        if (rte_mempool_generic_get(mp, &p, 1, cache) != 0) [[unlikely]] return false;
      if (verify && i == 0) {
        std::vector<uintptr_t> addrs;
        for (void* p : mine) addrs.push_back(reinterpret_cast<uintptr_t>(p));
        if (auto st = check_blocks("rte_mempool", s, s.size, addrs); !st) {
          bad_blocks = st.error().message;
          return false;
        }
      }
      for (void* p : mine) rte_mempool_generic_put(mp, &p, 1, cache);
    }
    if (cache != nullptr) rte_mempool_cache_flush(cache, mp);
    return true;
  });
  const unsigned avail = rte_mempool_avail_count(mp);
  for (rte_mempool_cache* c : caches) rte_mempool_cache_free(c);
  rte_mempool_free(mp);
  if (!bad_blocks.empty()) return fail(Errc::internal, "{}", bad_blocks);
  if (failed || avail != total)
    return fail(Errc::internal, "dmapool bench (rte_mempool {}/{}/{}, {} threads): get failed or {} of {} objects back",
                s.size, s.align, s.boundary, threads, avail, total);
  return x;
}

}  // namespace

Result<base::Json> run_dmapool(const base::Config& cfg, const DmapoolBenchOptions& o, const BackingFactory& backing) {
  if (o.rounds == 0 || o.repeats == 0)
    return fail(Errc::invalid_argument, "dmapool bench: rounds {} and repeats {} must be positive", o.rounds,
                o.repeats);
  bool lcore_cache = false;
  if (o.mempool) {
    DMAKIT_TRY(base::ensure_eal(cfg.eal));
    // The per-lcore cache only works on an EAL thread; a plain thread gets the ring.
    lcore_cache = rte_lcore_id() != LCORE_ID_ANY;
  }
  auto results = base::Json::array();
  auto timed = [&](auto&& once) -> Result<Timing> {
    std::vector<Sample> samples;
    for (uint32_t i = 0; i < o.repeats; ++i) samples.push_back(DMAKIT_TRY(once()));
    return summarize(samples);
  };
  // Two-thread results carry the in-run throughput ratio to the same
  // implementation on one thread (its ns_per_pair over theirs).
  auto push = [&](const Shape& s, uint32_t blocks, uint32_t threads, const char* impl, uint32_t cache,
                  const Timing& t, const Timing* one) {
    base::Json j = result(s, blocks, threads, impl, cache, o.rounds, t);
    if (one != nullptr) j.add("throughput_vs_one_thread", one->median_ns / (t.median_ns / threads));
    if (threads > 1 && std::string_view(impl).starts_with("dmakit")) j.add("steals", t.steals);
    results.push(std::move(j));
  };
  for (const Shape& s : kShapes) {
    const uint32_t blocks = blocks_for(s, o.max_blocks);
    DMAKIT_TRY(verify_dmakit(s, blocks, o, backing));
    const Timing one = DMAKIT_TRY(timed([&] { return time_dmakit(s, blocks, 1, false, o, backing); }));
    push(s, blocks, 1, "dmakit", o.cache_size, one, nullptr);
    if (o.two_threads) {
      const Timing two = DMAKIT_TRY(timed([&] { return time_dmakit(s, blocks, 2, false, o, backing); }));
      push(s, blocks, 2, "dmakit", o.cache_size, two, &one);
      const Timing own = DMAKIT_TRY(timed([&] { return time_dmakit(s, blocks, 2, true, o, backing); }));
      push(s, blocks, 2, "dmakit-own-pools", o.cache_size, own, &one);
    }
    if (o.mempool) {
      DMAKIT_TRY(time_mempool(s, blocks, 1, o, true));
      const Timing mp1 = DMAKIT_TRY(timed([&] { return time_mempool(s, blocks, 1, o, false); }));
      push(s, blocks, 1, "rte_mempool", lcore_cache ? o.mempool_cache : 0, mp1, nullptr);
      const Timing mpi = DMAKIT_TRY(timed([&] { return time_mempool(s, blocks, 1, o, false, true); }));
      push(s, blocks, 1, "rte_mempool+iova", lcore_cache ? o.mempool_cache : 0, mpi, nullptr);
      if (o.two_threads) {
        const Timing mp2 = DMAKIT_TRY(timed([&] { return time_mempool(s, blocks, 2, o, false); }));
        push(s, blocks, 2, "rte_mempool", o.mempool_cache, mp2, &mp1);
      }
    }
  }
  return base::Json::object().add("bench", "dmapool").add("results", results);
}

Result<base::Json> run_dmapool(core::Context& ctx) {
  DmapoolBenchOptions o;
  o.cache_size = ctx.config().pool.cache_size;
  alloc_buffer::BufferAllocator& buffers = ctx.buffers();
  return run_dmapool(ctx.config(), o, [&buffers] { return pool::make_buffer_backing(buffers); });
}

}  // namespace dmakit::bench
