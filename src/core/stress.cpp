#include "core/stress.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "alloc_buffer/buffer_allocator.hpp"
#include "base/log.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"
#include "pool/dma_pool.hpp"

namespace dmakit::core {

namespace {

struct Rng {
  uint64_t s;
  uint64_t next() {  // xorshift64*
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545F4914F6CDD1DULL;
  }
  uint64_t below(uint64_t n) { return next() % n; }
};

struct PoolShape {
  const char* name;
  size_t size, align, boundary;
};
// NVMe submission entries, PRP lists, and the kernel benchmark's odd shape.
constexpr PoolShape kShapes[] = {
    {"stress-sqe", 64, 64, 0}, {"stress-prp", 4096, 4096, 0}, {"stress-odd", 68, 32, 4096}};

struct Block {
  pool::DmaBlock b;
  size_t shape;
  uint64_t tag;
};

struct Shared {
  Shared(Context& c, iommu::SimDomain* s) : ctx(c), sim(s) {}
  Context& ctx;
  iommu::SimDomain* sim;  // null on real VFIO: no device view
  pool::DmaPool* pools[std::size(kShapes)] = {};
  // Deliberate double frees go to a pool of their own, so the warnings the
  // pools log for refused frees name it and no pool used by the workload.
  pool::DmaPool* misuse = nullptr;
  std::mutex handoff_mu;
  std::deque<Block> handoff;  // blocks freed by a thread other than their allocator
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> ops{0};  // for progress reports, besides each worker's count
  std::mutex fail_mu;
  std::string first_failure;
  std::atomic<uint64_t> failures{0};

  void failed(std::string what) {
    failures.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard lock(fail_mu);
    if (first_failure.empty()) first_failure = std::move(what);
  }
};

struct LiveBuffer {
  alloc_buffer::Buffer buf;
  uint64_t tag;
};

void fill(void* p, uint64_t len, uint64_t tag) {
  auto* w = static_cast<uint64_t*>(p);
  for (uint64_t i = 0; i < len / 8; ++i) w[i] = tag ^ (i * 0x9E3779B97F4A7C15ULL);
}

// Offset of the first word that differs from the pattern, or len if intact.
uint64_t check(const void* p, uint64_t len, uint64_t tag, uint64_t word_offset = 0) {
  const auto* w = static_cast<const uint64_t*>(p);
  for (uint64_t i = 0; i < len / 8; ++i)
    if (w[i] != (tag ^ ((i + word_offset) * 0x9E3779B97F4A7C15ULL))) return i * 8;
  return len;
}

class Worker {
 public:
  Worker(Shared& sh, const StressSettings& s, unsigned id)
      : sh_(sh), s_(s), rng_{s.seed * 0x100000001B3ULL + id + 1}, id_(id) {}

  void run(StressReport& r) {
    while (!sh_.stop.load(std::memory_order_relaxed)) {
      uint64_t dice = rng_.below(100);
      if (dice < 25) alloc_buffer(r);
      else if (dice < 40) free_buffer(r);
      else if (dice < 75) alloc_block(r);
      else if (dice < 95) free_block(r);
      else if (dice < 97) bad_free(r);
      else drain_handoff(r);
    }
    while (!bufs_.empty()) free_buffer(r);
    while (!blocks_.empty()) free_block(r);
    drain_handoff(r);
  }

 private:
  // Counts one operation in the worker's report and for progress.
  void count_op(StressReport& r, uint64_t n = 1) {
    r.ops += n;
    sh_.ops.fetch_add(n, std::memory_order_relaxed);
  }
  static uint64_t now_ns() {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                     std::chrono::steady_clock::now().time_since_epoch())
                                     .count());
  }
  static void timed(StressReport& r, StressOp op, uint64_t since) {
    r.latency[static_cast<size_t>(op)].add(now_ns() - since);
  }

  std::string where(const char* what, uint64_t iova) {
    return fmt::format("thread {}: {} at iova {:#x}", id_, what, iova);
  }

  void alloc_buffer(StressReport& r) {
    // Log-uniform sizes from 4 KiB to max_bytes, not always page multiples.
    uint64_t max_shift = 63 - static_cast<uint64_t>(__builtin_clzll(std::max<uint64_t>(s_.max_bytes, 4096)));
    uint64_t len = (1ull << (12 + rng_.below(max_shift - 11))) - rng_.below(64) * 8;
    len = std::min<uint64_t>(std::max<uint64_t>(len, 4096), s_.max_bytes);
    alloc_buffer::BufferRequest req;
    req.len = len;
    req.zeroed = rng_.below(3) == 0;
    const uint64_t t0 = now_ns();
    auto b = sh_.ctx.buffers().alloc(req);
    timed(r, StressOp::buffer_alloc, t0);
    count_op(r);
    if (!b) {
      if (b.error().code == Errc::no_memory || b.error().code == Errc::no_space) {
        ++r.alloc_errors;
        if (!bufs_.empty()) free_buffer(r);
        return;
      }
      sh_.failed(fmt::format("thread {}: buffer of {} bytes: {}", id_, len, b.error().what()));
      return;
    }
    ++r.buffer_allocs;
    r.buffer_bytes += len;
    uint64_t tag = rng_.next();
    for (const auto& c : b->chunks()) {
      uint64_t off = c.iova - b->iova();
      uint64_t n = std::min<uint64_t>(c.len, len > off ? len - off : 0) & ~7ull;
      if (req.zeroed) {
        const auto* bytes = static_cast<const unsigned char*>(c.vaddr);
        for (uint64_t i = 0; i < n; ++i)
          if (bytes[i] != 0) {
            sh_.failed(where("zeroed buffer has a non-zero byte", c.iova + i));
            break;
          }
      }
      auto io = b->iova_of(c.vaddr);
      if (!io || *io != c.iova) sh_.failed(where("iova_of(chunk start) disagrees with the chunk list", c.iova));
      if (b->at(off) != c.vaddr) sh_.failed(where("at(offset) disagrees with the chunk list", c.iova));
      fill(c.vaddr, n, tag ^ off);
    }
    if (sh_.sim != nullptr) device_check(*b, tag, r);
    bufs_.push_back({std::move(*b), tag});
  }

  // Reads the buffer back through the IOMMU model, as the device would.
  void device_check(const alloc_buffer::Buffer& b, uint64_t tag, StressReport& r) {
    for (const auto& c : b.chunks()) {
      uint64_t off = c.iova - b.iova();
      uint64_t n = std::min<uint64_t>(c.len, b.size() > off ? b.size() - off : 0) & ~7ull;
      if (n == 0) continue;
      auto view = sh_.sim->translate(c.iova, n, iommu::kRead | iommu::kWrite);
      ++r.device_checks;
      count_op(r);
      if (!view) {
        sh_.failed(where(("device cannot reach a live chunk: " + view.error().message).c_str(), c.iova));
        return;
      }
      if (check(view->data(), n, tag ^ off) != n) sh_.failed(where("device sees other bytes than the host", c.iova));
    }
  }

  void free_buffer(StressReport& r) {
    if (bufs_.empty()) return;
    size_t i = static_cast<size_t>(rng_.below(bufs_.size()));
    LiveBuffer& lb = bufs_[i];
    for (const auto& c : lb.buf.chunks()) {
      uint64_t off = c.iova - lb.buf.iova();
      uint64_t n = std::min<uint64_t>(c.len, lb.buf.size() > off ? lb.buf.size() - off : 0) & ~7ull;
      if (check(c.vaddr, n, lb.tag ^ off) != n) sh_.failed(where("buffer pattern changed while owned", c.iova));
    }
    std::swap(bufs_[i], bufs_.back());
    const uint64_t t0 = now_ns();
    bufs_.pop_back();  // the Buffer returns to its allocator here
    timed(r, StressOp::buffer_free, t0);
    count_op(r);
  }

  void alloc_block(StressReport& r) {
    size_t shape = static_cast<size_t>(rng_.below(std::size(kShapes)));
    const PoolShape& ps = kShapes[shape];
    const uint64_t t0 = now_ns();
    auto blk = sh_.pools[shape]->alloc();
    timed(r, StressOp::block_alloc, t0);
    count_op(r);
    if (!blk) {
      if (blk.error().code == Errc::no_memory || blk.error().code == Errc::no_space) {
        ++r.alloc_errors;
        return;
      }
      sh_.failed(fmt::format("thread {}: pool {}: {}", id_, ps.name, blk.error().what()));
      return;
    }
    ++r.block_allocs;
    uint64_t va = reinterpret_cast<uintptr_t>(blk->vaddr);
    if ((va & (ps.align - 1)) != 0 || (blk->iova & (ps.align - 1)) != 0)
      sh_.failed(where("block not aligned", blk->iova));
    if (ps.boundary != 0 && (blk->iova / ps.boundary) != ((blk->iova + ps.size - 1) / ps.boundary))
      sh_.failed(where("block crosses its boundary", blk->iova));
    uint64_t tag = rng_.next();
    fill(blk->vaddr, ps.size & ~7ull, tag);
    if (sh_.sim != nullptr) {
      auto view = sh_.sim->translate(blk->iova, ps.size, iommu::kRead | iommu::kWrite);
      ++r.device_checks;
      count_op(r);
      if (!view || view->data() != blk->vaddr) sh_.failed(where("device view of a block is not the block", blk->iova));
    }
    blocks_.push_back({*blk, shape, tag});
  }

  void free_block(StressReport& r) {
    if (blocks_.empty()) return;
    size_t i = static_cast<size_t>(rng_.below(blocks_.size()));
    Block b = blocks_[i];
    blocks_[i] = blocks_.back();
    blocks_.pop_back();
    const PoolShape& ps = kShapes[b.shape];
    if (check(b.b.vaddr, ps.size & ~7ull, b.tag) != (ps.size & ~7ull))
      sh_.failed(where("block pattern changed while owned", b.b.iova));
    if (rng_.below(3) == 0) {  // let another thread free it
      std::lock_guard lock(sh_.handoff_mu);
      sh_.handoff.push_back(b);
      return;
    }
    release(b, r);
  }

  void release(const Block& b, StressReport& r) {
    const uint64_t t0 = now_ns();
    auto st = sh_.pools[b.shape]->free(b.b.vaddr, b.b.iova);
    timed(r, StressOp::block_free, t0);
    count_op(r);
    if (!st) sh_.failed(where(("valid free refused: " + st.error().message).c_str(), b.b.iova));
  }

  void drain_handoff(StressReport& r) {
    std::deque<Block> mine;
    {
      std::lock_guard lock(sh_.handoff_mu);
      mine.swap(sh_.handoff);
    }
    for (const auto& b : mine) {
      release(b, r);
      ++r.cross_thread_frees;
    }
  }

  // A double free and a free inside a block must both be refused, and the
  // pool must stay usable.
  void bad_free(StressReport& r) {
    pool::DmaPool& p = *sh_.misuse;
    auto blk = p.alloc();
    if (!blk) return;
    auto first = p.free(blk->vaddr, blk->iova);
    auto second = p.free(blk->vaddr, blk->iova);
    auto inside = p.free(static_cast<char*>(blk->vaddr) + 8, blk->iova + 8);
    count_op(r, 4);
    if (!first) sh_.failed(where("valid free refused", blk->iova));
    if (second) sh_.failed(where("double free accepted", blk->iova));
    if (inside) sh_.failed(where("free of a pointer inside a block accepted", blk->iova + 8));
    if (!second && !inside) r.refused_bad_frees += 2;
  }

  Shared& sh_;
  const StressSettings& s_;
  Rng rng_;
  unsigned id_;
  std::vector<LiveBuffer> bufs_;
  std::vector<Block> blocks_;
};

}  // namespace

Result<StressReport> run_stress(Context& ctx, const StressSettings& s, const std::atomic<bool>* stop,
                                const std::function<void(const StressProgress&)>& progress,
                                std::chrono::milliseconds progress_every) {
  StressReport total;
  total.backend = ctx.backend();
  Shared sh{ctx, dynamic_cast<iommu::SimDomain*>(&ctx.domain())};
  total.mappings_at_start = ctx.domain().stats().mappings;

  for (size_t i = 0; i < std::size(kShapes); ++i) {
    const auto& ps = kShapes[i];
    sh.pools[i] = DMAKIT_TRY(ctx.create_pool(ps.name, ps.size, ps.align, ps.boundary));
  }
  // Its bad frees are deliberate: counted in the report, not logged as the user's bugs.
  pool::PoolOptions misuse_opts;
  misuse_opts.cache_size = ctx.config().pool.cache_size;
  misuse_opts.poison = ctx.config().pool.poison;
  misuse_opts.log_refusals = false;
  sh.misuse = DMAKIT_TRY(ctx.create_pool("stress-misuse", 64, 64, 0, misuse_opts));

  std::vector<StressReport> parts(s.threads);
  std::vector<std::thread> threads;
  auto t0 = std::chrono::steady_clock::now();
  for (unsigned t = 0; t < s.threads; ++t)
    threads.emplace_back([&, t] { Worker(sh, s, t).run(parts[t]); });
  // Short slices, so an interrupt stops the run within one.
  const auto deadline = t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                 std::chrono::duration<double>(s.seconds));
  auto next_report = t0 + progress_every;
  while (std::chrono::steady_clock::now() < deadline) {
    if (stop != nullptr && stop->load(std::memory_order_relaxed)) {
      total.interrupted = true;
      break;
    }
    if (s.ops != 0 && sh.ops.load(std::memory_order_relaxed) >= s.ops) break;
    if (progress && std::chrono::steady_clock::now() >= next_report) {
      next_report += progress_every;
      progress(StressProgress{std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                              sh.ops.load(std::memory_order_relaxed), sh.failures.load(std::memory_order_relaxed)});
    }
    std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(
        deadline - std::chrono::steady_clock::now(), std::chrono::milliseconds(20)));
  }
  sh.stop.store(true);
  for (auto& t : threads) t.join();
  {
    StressReport rest;  // blocks parked for a cross-thread free after their thread ended
    Worker(sh, s, s.threads).run(rest);
    parts.push_back(rest);
  }
  total.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  for (const auto& p : parts) {
    total.ops += p.ops;
    total.buffer_allocs += p.buffer_allocs;
    total.buffer_bytes += p.buffer_bytes;
    total.block_allocs += p.block_allocs;
    total.cross_thread_frees += p.cross_thread_frees;
    total.device_checks += p.device_checks;
    total.refused_bad_frees += p.refused_bad_frees;
    total.alloc_errors += p.alloc_errors;
    for (size_t k = 0; k < kStressOps; ++k) total.latency[k].merge(p.latency[k]);
  }

  // Everything was freed: pools, recycled buffers and stale IOVAs must all
  // go, leaving the domain with the mappings it had before the run.
  std::vector<pool::DmaPool*> all(std::begin(sh.pools), std::end(sh.pools));
  all.push_back(sh.misuse);
  for (auto* p : all) {
    if (p->stats().active != 0) sh.failed(fmt::format("pool {} has {} blocks active after the run", p->stats().name, p->stats().active));
    DMAKIT_TRY(ctx.destroy_pool(p));
  }
  ctx.buffers().trim(true);
  DMAKIT_TRY(ctx.arena().flush());
  total.mappings_at_end = ctx.domain().stats().mappings;
  if (total.mappings_at_end != total.mappings_at_start)
    sh.failed(fmt::format("{} mappings left in the domain after freeing everything (started with {})",
                          total.mappings_at_end, total.mappings_at_start));
  auto arena = ctx.arena().stats();
  if (arena.pages_in_use != 0) sh.failed(fmt::format("{} IOVA pages still in use after the run", arena.pages_in_use));
  total.failures = sh.failures.load();
  total.first_failure = sh.first_failure;
  return total;
}

}  // namespace dmakit::core
