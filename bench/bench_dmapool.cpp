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
};

struct Timing {
  double median_ns = 0, best_ns = 0, cpu_median_ns = 0;
};

Timing summarize(const std::vector<Sample>& samples) {
  std::vector<double> wall, cpu;
  for (const Sample& x : samples) {
    wall.push_back(x.wall_ns);
    cpu.push_back(x.cpu_ns);
  }
  return {median(wall), *std::min_element(wall.begin(), wall.end()), median(cpu)};
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

// One dmakit pool, `threads` threads each doing the pattern on `blocks` blocks.
// With more than one thread the wall time runs from a common start to the last finish.
Result<Sample> time_dmakit(const Shape& s, uint32_t blocks, uint32_t threads, const DmapoolBenchOptions& o,
                           const BackingFactory& backing) {
  pool::PoolOptions po;
  po.cache_size = o.cache_size;
  auto pool = DMAKIT_TRY(pool::DmaPool::create(backing(), "bench", s.size, s.align, s.boundary, po));
  std::atomic<bool> failed{false};
  uint64_t t0 = 0, t1 = 0, cpu = 0;
  if (threads == 1) {
    std::vector<pool::DmaBlock> held(blocks);
    const uint64_t c0 = thread_cpu_ns();
    t0 = now_ns();
    failed = !alloc_free_rounds(*pool, held, o.rounds);
    t1 = now_ns();
    cpu = thread_cpu_ns() - c0;
  } else {
    // Each worker stamps its own start and end: the main thread may be
    // descheduled between the barrier and a clock read of its own.
    // A spinning start line: a thread parked in a futex (std::barrier) may
    // take milliseconds to wake on a virtual machine whose other vCPU is
    // halted, and the workers would then run one after the other.
    std::atomic<uint32_t> arrived{0};
    std::vector<uint64_t> begins(threads), ends(threads), cpus(threads);
    std::vector<std::thread> ts;
    for (uint32_t i = 0; i < threads; ++i)
      ts.emplace_back([&, i] {
        pin_worker(i);
        std::vector<pool::DmaBlock> held(blocks);
        arrived.fetch_add(1, std::memory_order_acq_rel);
        while (arrived.load(std::memory_order_acquire) < threads) {
        }
        const uint64_t c0 = thread_cpu_ns();
        const uint64_t b = now_ns();
        const bool good = alloc_free_rounds(*pool, held, o.rounds);
        const uint64_t e = now_ns();
        const uint64_t c = thread_cpu_ns() - c0;
        // Written once at the end: the result slots share a cache line.
        begins[i] = b;
        ends[i] = e;
        cpus[i] = c;
        if (!good) failed = true;
      });
    for (auto& t : ts) t.join();
    t0 = *std::min_element(begins.begin(), begins.end());
    t1 = *std::max_element(ends.begin(), ends.end());
    for (uint64_t c : cpus) cpu += c;
  }
  auto st = pool->stats();
  if (failed || st.active != 0 || st.validation_failures != 0)
    return fail(Errc::internal,
                "dmapool bench (dmakit {}/{}/{}, {} threads): alloc or free failed, or {} blocks still active, "
                "{} validation failures",
                s.size, s.align, s.boundary, threads, st.active, st.validation_failures);
  return Sample{static_cast<double>(t1 - t0), static_cast<double>(cpu)};
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

Result<Sample> time_mempool(const Shape& s, uint32_t blocks, const DmapoolBenchOptions& o, bool verify) {
  static std::atomic<int> seq{0};
  const std::string name = fmt::format("dmakit-bench-{}", seq++);
  rte_mempool* mp = rte_mempool_create(name.c_str(), blocks, static_cast<unsigned>(s.size), o.mempool_cache, 0,
                                       nullptr, nullptr, nullptr, nullptr, SOCKET_ID_ANY, 0);
  if (mp == nullptr)
    return fail_errno(rte_errno, "rte_mempool_create({}, n={}, size={}, cache={})", name, blocks, s.size,
                      o.mempool_cache);
  std::vector<void*> held(blocks);
  bool failed = false;
  const uint32_t rounds = verify ? 1 : o.rounds;
  const uint64_t c0 = thread_cpu_ns();
  const uint64_t t0 = now_ns();
  for (uint32_t r = 0; r < rounds && !failed; ++r) {
    for (auto& p : held)
      if (rte_mempool_get(mp, &p) != 0) [[unlikely]] failed = true;
    if (verify) {
      std::vector<uintptr_t> addrs;
      for (void* p : held) addrs.push_back(reinterpret_cast<uintptr_t>(p));
      if (auto st = check_blocks("rte_mempool", s, s.size, addrs); !st) {
        rte_mempool_free(mp);
        return std::unexpected(st.error());
      }
    }
    for (void* p : held) rte_mempool_put(mp, p);
  }
  const uint64_t t1 = now_ns();
  const uint64_t cpu = thread_cpu_ns() - c0;
  const unsigned avail = rte_mempool_avail_count(mp);
  rte_mempool_free(mp);
  if (failed || avail != blocks)
    return fail(Errc::internal, "dmapool bench (rte_mempool {}/{}/{}): get failed or {} of {} objects back", s.size,
                s.align, s.boundary, avail, blocks);
  return Sample{static_cast<double>(t1 - t0), static_cast<double>(cpu)};
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
  for (const Shape& s : kShapes) {
    const uint32_t blocks = blocks_for(s, o.max_blocks);
    DMAKIT_TRY(verify_dmakit(s, blocks, o, backing));
    for (uint32_t threads : {1u, 2u}) {
      if (threads == 2 && !o.two_threads) continue;
      std::vector<Sample> samples;
      for (uint32_t i = 0; i < o.repeats; ++i) samples.push_back(DMAKIT_TRY(time_dmakit(s, blocks, threads, o, backing)));
      results.push(result(s, blocks, threads, "dmakit", o.cache_size, o.rounds, summarize(samples)));
    }
    if (o.mempool) {
      DMAKIT_TRY(time_mempool(s, blocks, o, true));
      std::vector<Sample> samples;
      for (uint32_t i = 0; i < o.repeats; ++i) samples.push_back(DMAKIT_TRY(time_mempool(s, blocks, o, false)));
      results.push(result(s, blocks, 1, "rte_mempool", lcore_cache ? o.mempool_cache : 0, o.rounds,
                          summarize(samples)));
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
