// `dmakit bench dmapool`: the Linux kernel's dmapool benchmark pattern
// (mm/dmapool_test.c) on dmakit pools and on DPDK's rte_mempool.
//
// Six shapes (size/align/boundary); blocks = clamp((4096 / size) * 512,
// 1024, 8192); one timed run = `rounds` times: allocate every block one by
// one, then free every block. Each run starts from a fresh pool, so dmakit's
// growth (taking chunks from the backing) is inside the first round, as in
// the kernel's test; rte_mempool is populated at creation, outside the timing.
// The cases of a shape are timed in turns, `repeats` turns; the median run
// is reported, the best one too, and ratios between cases are medians of
// ratios within a turn. dmakit runs with validation on (it always is);
// rte_mempool validates nothing and honours neither alignment above its
// cache line nor boundaries.
//
// rte_mempool on one thread runs three ways: rte_mempool_get/put, which
// find the calling lcore's cache on every call as dmakit's alloc and free
// find the thread's cache ("rte_mempool", the goal's baseline:
// vs_rte_mempool is dmakit's time over its time); generic get/put with a
// cache pointer the caller keeps, the fastest way to drive it
// ("rte_mempool+explicit_cache", vs_rte_mempool_explicit_cache); and
// get/put reading each object's IOVA, which a DMA user needs and dmakit
// returns ("rte_mempool+iova").
//
// "dmakit-c" is the one-thread dmakit loop through the C API, as a C driver
// runs it: pools from dmakit_pool_create_with in the context the bench runs
// on (same cache size, same buffer allocator as the C++ pools), blocks from
// dmakit_pool_alloc written straight into the caller's array, frees through
// dmakit_pool_free; the calls go to the library's exported functions, so
// every call looks up its handle. vs_dmakit is its time over the one-thread
// dmakit case's, paired within each turn.
//
// Two threads run three ways: dmakit sharing one pool, dmakit with a pool
// per thread (nothing shared: how far two threads scale on this machine at
// all), and rte_mempool with an explicit cache per thread. Each carries its
// throughput over the same implementation's one-thread run
// (throughput_vs_one_thread).
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
#include <utility>
#include <vector>

#include "base/eal.hpp"
#include "bench.hpp"
#include "core/c_handles.hpp"
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

Json result(const Shape& s, uint32_t blocks, uint32_t threads, const char* impl, uint32_t cache,
                  uint32_t rounds, const Timing& t) {
  const double pairs = double(blocks) * rounds * threads;
  auto j = Json::object();
  j["size"] = uint64_t{s.size}; j["align"] = uint64_t{s.align}; j["boundary"] = uint64_t{s.boundary}; j["blocks"] = blocks; j["threads"] = threads; j["impl"] = impl; j["cache"] = cache; j["rounds"] = rounds; j["total_us"] = t.median_ns / 1e3; j["best_us"] = t.best_ns / 1e3; j["ns_per_pair"] = t.median_ns / pairs; j["cpu_ns_per_pair"] = t.cpu_median_ns / pairs;
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

// The C API's pools: one per timed run (as time_dmakit), destroyed with its handle.
class CPool {
 public:
  static Result<CPool> create(dmakit_ctx* ctx, const Shape& s, uint32_t cache_size) {
    static std::atomic<uint32_t> seq{0};
    const std::string name = fmt::format("dmakit-bench-c-{}", seq++);
    dmakit_pool_params p;
    dmakit_pool_params_init(&p, name.c_str(), s.size);
    p.align = s.align;
    p.boundary = s.boundary;
    p.cache_size = cache_size;
    dmakit_pool* pool = nullptr;
    if (const int rc = dmakit_pool_create_with(ctx, &p, &pool); rc != DMAKIT_OK)
      return fail(static_cast<Errc>(-rc), "dmapool bench (dmakit-c {}/{}/{}): {}", s.size, s.align, s.boundary,
                  dmakit_last_error());
    return CPool(pool);
  }
  CPool(CPool&& o) noexcept : pool_(std::exchange(o.pool_, nullptr)) {}
  CPool& operator=(CPool&&) = delete;
  ~CPool() {
    if (pool_ != nullptr) (void)dmakit_pool_destroy(pool_);
  }
  dmakit_pool* get() const { return pool_; }
  // Refused frees and blocks still allocated: a run that did not leave the pool as it found it.
  Status check_idle(const Shape& s) const {
    dmakit_pool_stats st{};
    st.struct_size = sizeof st;
    if (dmakit_pool_get_stats(pool_, &st) != DMAKIT_OK)
      return fail(Errc::internal, "dmapool bench (dmakit-c): {}", dmakit_last_error());
    if (st.active != 0 || st.validation_failures != 0)
      return fail(Errc::internal, "dmapool bench (dmakit-c {}/{}/{}): {} blocks still active, {} validation failures",
                  s.size, s.align, s.boundary, st.active, st.validation_failures);
    return ok();
  }

 private:
  explicit CPool(dmakit_pool* p) : pool_(p) {}
  dmakit_pool* pool_;
};

// The kernel's pattern through the C API; a function of its own, as alloc_free_rounds.
[[gnu::noinline]] bool c_api_rounds(dmakit_pool* pool, std::vector<pool::DmaBlock>& held, uint32_t rounds) {
  for (uint32_t r = 0; r < rounds; ++r) {
    for (auto& b : held)
      if (dmakit_pool_alloc(pool, &b.vaddr, &b.iova) != DMAKIT_OK) [[unlikely]] return false;
    for (const auto& b : held)
      if (dmakit_pool_free(pool, b.vaddr, b.iova) != DMAKIT_OK) [[unlikely]] return false;
  }
  return true;
}

Result<Sample> time_dmakit_c(const Shape& s, uint32_t blocks, const DmapoolBenchOptions& o) {
  CPool pool = DMAKIT_TRY(CPool::create(o.c_ctx, s, o.cache_size));
  std::vector<pool::DmaBlock> held(blocks);
  bool failed = false;
  const Sample x = run_workers(1, failed, [&](uint32_t) { return c_api_rounds(pool.get(), held, o.rounds); });
  if (failed)
    return fail(Errc::internal, "dmapool bench (dmakit-c {}/{}/{}): alloc or free failed: {}", s.size, s.align,
                s.boundary, dmakit_last_error());
  DMAKIT_TRY(pool.check_idle(s));
  return x;
}

// Untimed, as verify_dmakit, through the C API.
Status verify_dmakit_c(const Shape& s, uint32_t blocks, const DmapoolBenchOptions& o) {
  CPool pool = DMAKIT_TRY(CPool::create(o.c_ctx, s, o.cache_size));
  dmakit_pool_stats st{};
  st.struct_size = sizeof st;
  if (dmakit_pool_get_stats(pool.get(), &st) != DMAKIT_OK)
    return fail(Errc::internal, "dmapool bench (dmakit-c): {}", dmakit_last_error());
  const uint64_t len = st.size;  // the block size, rounded as the pool rounds it
  std::vector<pool::DmaBlock> held(blocks);
  std::vector<uintptr_t> addrs;
  for (auto& b : held) {
    if (dmakit_pool_alloc(pool.get(), &b.vaddr, &b.iova) != DMAKIT_OK)
      return fail(Errc::internal, "dmapool bench (dmakit-c): {}", dmakit_last_error());
    const auto v = reinterpret_cast<uintptr_t>(b.vaddr);
    if (v % s.align != 0 || b.iova % s.align != 0 ||
        (s.boundary != 0 && b.iova / s.boundary != (b.iova + len - 1) / s.boundary))
      return fail(Errc::internal, "dmapool bench (dmakit-c): block {:#x} (IOVA {:#x}) breaks {}/{}/{}", v, b.iova,
                  s.size, s.align, s.boundary);
    addrs.push_back(v);
  }
  DMAKIT_TRY(check_blocks("dmakit-c", s, len, addrs));
  for (const auto& b : held)
    if (dmakit_pool_free(pool.get(), b.vaddr, b.iova) != DMAKIT_OK)
      return fail(Errc::internal, "dmapool bench (dmakit-c): {}", dmakit_last_error());
  return pool.check_idle(s);
}

// rte_mempool driven three ways, each loop in a function of its own (as
// alloc_free_rounds is): inlined into the worker lambda, the compiler kept
// the pool and cache pointers in memory and the baseline ran up to twice as
// slow as it does for a user.
enum class MempoolApi {
  lcore,           // rte_mempool_get/put: the calling lcore's cache, found on every call
  explicit_cache,  // rte_mempool_generic_get/put with a cache pointer the caller keeps
  lcore_iova,      // rte_mempool_get/put, and each object's IOVA read beside it
};

const char* impl_name(MempoolApi api) {
  switch (api) {
    case MempoolApi::lcore: return "rte_mempool";
    case MempoolApi::explicit_cache: return "rte_mempool+explicit_cache";
    case MempoolApi::lcore_iova: return "rte_mempool+iova";
  }
  return "?";
}

[[gnu::noinline]] bool mempool_rounds(rte_mempool* mp, std::vector<void*>& held, uint32_t rounds) {
  for (uint32_t r = 0; r < rounds; ++r) {
    for (auto& p : held)
      if (rte_mempool_get(mp, &p) != 0) [[unlikely]] return false;
    for (void* p : held) rte_mempool_put(mp, p);
  }
  return true;
}

[[gnu::noinline]] bool mempool_rounds(rte_mempool* mp, rte_mempool_cache* cache, std::vector<void*>& held,
                                      uint32_t rounds) {
  for (uint32_t r = 0; r < rounds; ++r) {
    for (auto& p : held)
      if (rte_mempool_generic_get(mp, &p, 1, cache) != 0) [[unlikely]] return false;
    for (void* p : held) rte_mempool_generic_put(mp, &p, 1, cache);
  }
  return true;
}

// The IOVA comes from the object header (rte_mempool_virt2iova), as a DMA
// user must read it and as dmakit's alloc returns it.
[[gnu::noinline]] bool mempool_rounds(rte_mempool* mp, std::vector<pool::DmaBlock>& held, uint32_t rounds) {
  for (uint32_t r = 0; r < rounds; ++r) {
    for (auto& b : held) {
      void* p;
      if (rte_mempool_get(mp, &p) != 0) [[unlikely]] return false;
      b = pool::DmaBlock{p, rte_mempool_virt2iova(p)};
    }
    for (const auto& b : held) rte_mempool_put(mp, b.vaddr);
  }
  return true;
}

// The same pattern on one rte_mempool of threads x blocks objects (plus,
// with two threads, twice a cache per thread: objects one worker's cache
// holds back must not starve the other). One thread runs on the EAL thread
// (lcore 0) and uses its per-lcore cache; two workers are not EAL lcores,
// so each gets a cache of its own from rte_mempool_cache_create, as DPDK
// documents for non-EAL threads, and only the explicit-cache API applies.
// verify: one round, the objects checked for overlap.
Result<Sample> time_mempool(const Shape& s, uint32_t blocks, uint32_t threads, const DmapoolBenchOptions& o,
                            MempoolApi api, bool verify = false) {
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
  std::vector<std::vector<pool::DmaBlock>> held_iova(api == MempoolApi::lcore_iova ? threads : 0,
                                                     std::vector<pool::DmaBlock>(blocks));
  const uint32_t rounds = verify ? 1 : o.rounds;
  bool failed = false;
  const Sample x = run_workers(threads, failed, [&](uint32_t i) {
    rte_mempool_cache* cache = threads > 1 ? caches[i] : rte_mempool_default_cache(mp, rte_lcore_id());
    bool good = false;
    switch (api) {
      case MempoolApi::lcore: good = mempool_rounds(mp, held[i], rounds); break;
      case MempoolApi::explicit_cache: good = mempool_rounds(mp, cache, held[i], rounds); break;
      case MempoolApi::lcore_iova: good = mempool_rounds(mp, held_iova[i], rounds); break;
    }
    if (cache != nullptr) rte_mempool_cache_flush(cache, mp);
    return good;
  });
  std::string bad_blocks;
  if (verify && !failed) {  // the last round's objects, all freed again but still distinct
    std::vector<uintptr_t> addrs;
    for (void* p : held[0]) addrs.push_back(reinterpret_cast<uintptr_t>(p));
    if (auto st = check_blocks("rte_mempool", s, s.size, addrs); !st) bad_blocks = st.error().message;
  }
  const unsigned avail = rte_mempool_avail_count(mp);
  for (rte_mempool_cache* c : caches) rte_mempool_cache_free(c);
  rte_mempool_free(mp);
  if (!bad_blocks.empty()) return fail(Errc::internal, "{}", bad_blocks);
  if (failed || avail != total)
    return fail(Errc::internal, "dmapool bench ({} {}/{}/{}, {} threads): get failed or {} of {} objects back",
                impl_name(api), s.size, s.align, s.boundary, threads, avail, total);
  return x;
}

}  // namespace

Result<Json> run_dmapool(const core::Config& cfg, const DmapoolBenchOptions& o, const BackingFactory& backing) {
  if (o.rounds == 0 || o.repeats == 0)
    return fail(Errc::invalid_argument, "dmapool bench: rounds {} and repeats {} must be positive", o.rounds,
                o.repeats);
  bool lcore_cache = false;
  if (o.mempool) {
    DMAKIT_TRY(base::ensure_eal(cfg.eal));
    // The per-lcore cache only works on an EAL thread; a plain thread gets the ring.
    lcore_cache = rte_lcore_id() != LCORE_ID_ANY;
  }
  // The cases of one shape, timed in turns (one run of each, then the next
  // round of runs): a shared host speeds up and slows down over seconds, and
  // a case timed in one stretch after another would compare two different
  // machines. Ratios are taken within a turn and their median reported.
  struct Case {
    const char* impl;
    uint32_t threads, cache;
    int one = -1;  // index of the same implementation's one-thread case (2-thread cases)
    std::function<Result<Sample>()> run;
    std::vector<Sample> samples{};
  };
  auto results = Json::array();
  for (const Shape& s : kShapes) {
    const uint32_t blocks = blocks_for(s, o.max_blocks);
    DMAKIT_TRY(verify_dmakit(s, blocks, o, backing));
    std::vector<Case> cases;
    auto dmakit = [&, blocks](uint32_t threads, bool own) {
      return [&, blocks, threads, own] { return time_dmakit(s, blocks, threads, own, o, backing); };
    };
    auto mempool = [&, blocks](uint32_t threads, MempoolApi api) {
      return [&, blocks, threads, api] { return time_mempool(s, blocks, threads, o, api); };
    };
    cases.push_back({"dmakit", 1, o.cache_size, -1, dmakit(1, false)});
    if (o.c_ctx != nullptr) {  // right after the case it is compared with, in every turn
      DMAKIT_TRY(verify_dmakit_c(s, blocks, o));
      cases.push_back({"dmakit-c", 1, o.cache_size, -1, [&, blocks] { return time_dmakit_c(s, blocks, o); }});
    }
    if (o.two_threads) {
      cases.push_back({"dmakit", 2, o.cache_size, 0, dmakit(2, false)});
      cases.push_back({"dmakit-own-pools", 2, o.cache_size, 0, dmakit(2, true)});
    }
    int mp1 = -1, mpx = -1;
    if (o.mempool) {
      DMAKIT_TRY(time_mempool(s, blocks, 1, o, MempoolApi::explicit_cache, true));
      const uint32_t cache = lcore_cache ? o.mempool_cache : 0;
      mp1 = static_cast<int>(cases.size());
      cases.push_back({impl_name(MempoolApi::lcore), 1, cache, -1, mempool(1, MempoolApi::lcore)});
      mpx = static_cast<int>(cases.size());
      cases.push_back({impl_name(MempoolApi::explicit_cache), 1, cache, -1, mempool(1, MempoolApi::explicit_cache)});
      cases.push_back({impl_name(MempoolApi::lcore_iova), 1, cache, -1, mempool(1, MempoolApi::lcore_iova)});
      if (o.two_threads)
        cases.push_back({impl_name(MempoolApi::explicit_cache), 2, o.mempool_cache, mpx,
                         mempool(2, MempoolApi::explicit_cache)});
    }
    for (uint32_t i = 0; i < o.repeats; ++i)
      for (Case& c : cases) c.samples.push_back(DMAKIT_TRY(c.run()));

    // Median over the turns of a / b, each turn's runs paired.
    auto paired = [](const Case& a, const Case& b, auto&& ratio) {
      std::vector<double> r;
      for (size_t i = 0; i < a.samples.size(); ++i) r.push_back(ratio(a.samples[i], b.samples[i]));
      return median(r);
    };
    auto time_ratio = [](const Sample& a, const Sample& b) { return a.wall_ns / b.wall_ns; };
    for (const Case& c : cases) {
      const Timing t = summarize(c.samples);
      Json j = result(s, blocks, c.threads, c.impl, c.cache, o.rounds, t);
      if (c.one >= 0)  // pairs per ns over the one-thread case's
        j["throughput_vs_one_thread"] = paired(c, cases[size_t(c.one)], [&](const Sample& two, const Sample& one) {
                return one.wall_ns / (two.wall_ns / c.threads);
              });
      if (std::string_view(c.impl) == "dmakit-c") j["vs_dmakit"] = paired(c, cases[0], time_ratio);
      if (c.threads == 1 && std::string_view(c.impl) == "dmakit" && mp1 >= 0) {
        j["vs_rte_mempool"] = paired(c, cases[size_t(mp1)], time_ratio);
        j["vs_rte_mempool_explicit_cache"] = paired(c, cases[size_t(mpx)], time_ratio);
      }
      if (c.threads > 1 && std::string_view(c.impl).starts_with("dmakit")) j["steals"] = t.steals;
      results.push_back(std::move(j));
    }
  }
  return Json{{"bench", "dmapool"}, {"results", results}};
}

Result<Json> run_dmapool(core::Context& ctx, const DmapoolBenchOptions& opts) {
  DmapoolBenchOptions o = opts;
  o.c_ctx = core::borrow_c_handle(ctx);
  if (o.c_ctx == nullptr) return fail(Errc::no_space, "dmapool bench: every C context handle is in use");
  alloc_buffer::BufferAllocator& buffers = ctx.buffers();
  auto r = run_dmapool(ctx.config(), o, [&buffers] { return pool::make_buffer_backing(buffers); });
  if (dmakit_ctx_destroy(o.c_ctx) != DMAKIT_OK && r)
    return fail(Errc::internal, "dmapool bench: {}", dmakit_last_error());
  return r;
}

Result<Json> run_dmapool(core::Context& ctx, bool quick) {
  DmapoolBenchOptions o;
  o.cache_size = ctx.config().pool.cache_size;
  if (quick) {
    o.rounds = 2;
    o.repeats = 1;
    o.max_blocks = 512;
    o.mempool_cache = 32;  // rte_mempool wants its cache at most n / 1.5
  }
  return run_dmapool(ctx, o);
}

}  // namespace dmakit::bench
