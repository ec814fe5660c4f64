#include "stress.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>
#include <vector>

#include "alloc_buffer/buffer_allocator.hpp"
#include "core/config.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"
#include "pool/dma_pool.hpp"

namespace dmakit::tool {

namespace {

using core::Context;

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

// Live objects one worker holds at most, per kind. Each allocation decision
// is taken with probability 1 - live/cap, so the live set reverts to half
// the cap: memory use stays bounded and flat however long the run.
constexpr size_t kBufferCap = 32, kBlockCap = 512, kMapCap = 16;
constexpr uint64_t kMapMaxBytes = 256 << 10;

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
  // Deliberate double frees go to a pool of their own, so its refusals
  // (counted, not logged) never mix with the workload's pools.
  pool::DmaPool* misuse = nullptr;
  std::mutex handoff_mu;
  std::deque<Block> handoff;  // blocks freed by a thread other than their allocator
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> ops{0};  // for progress reports, besides each worker's count
  std::atomic<unsigned> done{0};  // workers that finished their share of stress.ops
  std::atomic<uint64_t> live_bytes{0}, peak_live_bytes{0};
  std::mutex fail_mu;
  std::string first_failure;
  std::atomic<uint64_t> failures{0};

  void failed(std::string what) {
    failures.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard lock(fail_mu);
    if (first_failure.empty()) first_failure = std::move(what);
  }
  void hold(uint64_t n) {
    const uint64_t now = live_bytes.fetch_add(n, std::memory_order_relaxed) + n;
    uint64_t peak = peak_live_bytes.load(std::memory_order_relaxed);
    while (now > peak && !peak_live_bytes.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
    }
  }
  void release(uint64_t n) { live_bytes.fetch_sub(n, std::memory_order_relaxed); }
};

struct LiveBuffer {
  alloc_buffer::Buffer buf;
  uint64_t tag;
  uint64_t len;
};

// Memory of the worker's own that it registers with map_memory: whole
// pages from mmap, so two registrations never share a page.
class OwnMemory {
 public:
  static OwnMemory make(uint64_t len) {
    void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return OwnMemory(p == MAP_FAILED ? nullptr : p, len);
  }
  OwnMemory(OwnMemory&& o) noexcept : p_(std::exchange(o.p_, nullptr)), len_(o.len_) {}
  OwnMemory& operator=(OwnMemory&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = std::exchange(o.p_, nullptr);
      len_ = o.len_;
    }
    return *this;
  }
  OwnMemory(const OwnMemory&) = delete;
  OwnMemory& operator=(const OwnMemory&) = delete;
  ~OwnMemory() { reset(); }
  void* get() const { return p_; }
  uint64_t len() const { return len_; }

 private:
  OwnMemory(void* p, uint64_t len) : p_(p), len_(len) {}
  void reset() {
    if (p_ != nullptr) ::munmap(p_, len_);
    p_ = nullptr;
  }
  void* p_;
  uint64_t len_;
};

struct LiveMap {
  OwnMemory mem;
  uint64_t iova;
  uint64_t tag;
};

void fill(void* p, uint64_t len, uint64_t tag) {
  auto* w = static_cast<uint64_t*>(p);
  for (uint64_t i = 0; i < len / 8; ++i) w[i] = tag ^ (i * 0x9E3779B97F4A7C15ULL);
}

// Offset of the first word that differs from the pattern, or len if intact.
uint64_t check(const void* p, uint64_t len, uint64_t tag) {
  const auto* w = static_cast<const uint64_t*>(p);
  for (uint64_t i = 0; i < len / 8; ++i)
    if (w[i] != (tag ^ (i * 0x9E3779B97F4A7C15ULL))) return i * 8;
  return len;
}

uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

constexpr uint64_t kUnbounded = ~0ull;

class Worker {
 public:
  // quota: decisions this worker makes (kUnbounded: until told to stop).
  Worker(Shared& sh, const core::StressSettings& s, const core::StressMix& mix, unsigned id, uint64_t quota)
      : sh_(sh), s_(s), mix_(mix), rng_{s.seed * 0x100000001B3ULL + id + 1}, id_(id), quota_(quota) {}

  void run(StressReport& r) {
    const uint64_t total_weight = uint64_t{mix_.buffers} + mix_.blocks + mix_.maps;
    for (uint64_t n = 0; !sh_.stop.load(std::memory_order_relaxed) && n < quota_; ++n) {
      const uint64_t dice = rng_.below(100);
      if (dice < 2) {
        misuse(r);
        continue;
      }
      if (dice < 5) {
        drain_handoff(r);
        continue;
      }
      uint64_t w = rng_.below(total_weight);
      if (w < mix_.buffers) {
        if (rng_.below(kBufferCap) >= bufs_.size()) alloc_buffer(r);
        else free_buffer(r);
      } else if ((w -= mix_.buffers) < mix_.blocks) {
        if (rng_.below(kBlockCap) >= blocks_.size()) alloc_block(r);
        else free_block(r);
      } else {
        if (rng_.below(kMapCap) >= maps_.size()) map(r);
        else unmap(r);
      }
    }
    if (quota_ != kUnbounded) sh_.done.fetch_add(1);
    while (!bufs_.empty()) free_buffer(r);
    while (!blocks_.empty()) free_block(r);
    while (!maps_.empty()) unmap(r);
    drain_handoff(r);
  }

 private:
  KindReport& kind(StressReport& r, StressKind k) { return r.kinds[static_cast<size_t>(k)]; }
  // Counts one timed operation of kind k that started at t0.
  void done(StressReport& r, StressKind k, uint64_t t0) {
    auto& kr = kind(r, k);
    kr.latency.add(now_ns() - t0);
    ++kr.ops;
    ++r.ops;
    sh_.ops.fetch_add(1, std::memory_order_relaxed);
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
    const uint64_t tag = rng_.next();
    const uint64_t t0 = now_ns();
    auto b = sh_.ctx.buffers().alloc(req);
    done(r, StressKind::buffers, t0);
    if (!b) {
      if (b.error().code == Errc::no_memory || b.error().code == Errc::no_space) {
        ++r.alloc_errors;
        return;
      }
      sh_.failed(fmt::format("thread {}: buffer of {} bytes: {}", id_, len, b.error().what()));
      return;
    }
    r.buffer_bytes += len;
    sh_.hold(len);
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
    bufs_.push_back({std::move(*b), tag, len});
  }

  // Reads the buffer back through the IOMMU model, as the device would.
  void device_check(const alloc_buffer::Buffer& b, uint64_t tag, StressReport& r) {
    for (const auto& c : b.chunks()) {
      uint64_t off = c.iova - b.iova();
      uint64_t n = std::min<uint64_t>(c.len, b.size() > off ? b.size() - off : 0) & ~7ull;
      if (n == 0) continue;
      auto view = sh_.sim->translate(c.iova, n, iommu::kRead | iommu::kWrite);
      ++r.device_checks;
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
    sh_.release(lb.len);
    std::swap(bufs_[i], bufs_.back());
    const uint64_t t0 = now_ns();
    bufs_.pop_back();  // the Buffer returns to its allocator here
    done(r, StressKind::buffers, t0);
  }

  void alloc_block(StressReport& r) {
    size_t shape = static_cast<size_t>(rng_.below(std::size(kShapes)));
    const PoolShape& ps = kShapes[shape];
    const uint64_t tag = rng_.next();
    const uint64_t t0 = now_ns();
    auto blk = sh_.pools[shape]->alloc();
    done(r, StressKind::blocks, t0);
    if (!blk) {
      if (blk.error().code == Errc::no_memory || blk.error().code == Errc::no_space) {
        ++r.alloc_errors;
        return;
      }
      sh_.failed(fmt::format("thread {}: pool {}: {}", id_, ps.name, blk.error().what()));
      return;
    }
    sh_.hold(ps.size);
    uint64_t va = reinterpret_cast<uintptr_t>(blk->vaddr);
    if ((va & (ps.align - 1)) != 0 || (blk->iova & (ps.align - 1)) != 0)
      sh_.failed(where("block not aligned", blk->iova));
    if (ps.boundary != 0 && (blk->iova / ps.boundary) != ((blk->iova + ps.size - 1) / ps.boundary))
      sh_.failed(where("block crosses its boundary", blk->iova));
    fill(blk->vaddr, ps.size & ~7ull, tag);
    if (sh_.sim != nullptr) {
      auto view = sh_.sim->translate(blk->iova, ps.size, iommu::kRead | iommu::kWrite);
      ++r.device_checks;
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
    sh_.release(kShapes[b.shape].size);
    const uint64_t t0 = now_ns();
    auto st = sh_.pools[b.shape]->free(b.b.vaddr, b.b.iova);
    done(r, StressKind::blocks, t0);
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

  // Registers pages of the worker's own; the IOVA must translate back to
  // them, and the device must see what the host wrote.
  void map(StressReport& r) {
    const uint64_t len = (1 + rng_.below(kMapMaxBytes / 4096)) * 4096;
    const uint64_t tag = rng_.next();
    OwnMemory mem = OwnMemory::make(len);
    if (mem.get() == nullptr) {
      ++r.alloc_errors;
      return;
    }
    fill(mem.get(), len, tag);
    const uint64_t t0 = now_ns();
    auto iova = sh_.ctx.map_memory(mem.get(), len, iommu::kRead | iommu::kWrite);
    done(r, StressKind::maps, t0);
    if (!iova) {
      if (iova.error().code == Errc::no_memory || iova.error().code == Errc::no_space) {
        ++r.alloc_errors;
        return;
      }
      sh_.failed(fmt::format("thread {}: map of {} bytes: {}", id_, len, iova.error().what()));
      return;
    }
    sh_.hold(len);
    auto run = sh_.ctx.translate(mem.get());
    if (!run || run->iova != *iova) sh_.failed(where("translate(mapped memory) is not its IOVA", *iova));
    if (sh_.sim != nullptr) {
      auto view = sh_.sim->translate(*iova, len, iommu::kRead | iommu::kWrite);
      ++r.device_checks;
      if (!view || check(view->data(), len, tag) != len) sh_.failed(where("device sees other bytes than mapped", *iova));
    }
    maps_.push_back({std::move(mem), *iova, tag});
  }

  // Unmaps at once: afterwards the device must no longer reach the pages.
  void unmap(StressReport& r) {
    if (maps_.empty()) return;
    size_t i = static_cast<size_t>(rng_.below(maps_.size()));
    std::swap(maps_[i], maps_.back());
    LiveMap m = std::move(maps_.back());
    maps_.pop_back();
    if (check(m.mem.get(), m.mem.len(), m.tag) != m.mem.len())
      sh_.failed(where("mapped memory changed while registered", m.iova));
    const uint64_t t0 = now_ns();
    auto st = sh_.ctx.unmap_memory(m.mem.get());
    done(r, StressKind::maps, t0);
    sh_.release(m.mem.len());
    if (!st) {
      sh_.failed(where(("unmap refused: " + st.error().message).c_str(), m.iova));
      return;
    }
    if (sh_.sim != nullptr) {
      ++r.device_checks;
      if (sh_.sim->translate(m.iova, 4096, iommu::kRead)) sh_.failed(where("device still reaches unmapped memory", m.iova));
    }
  }

  // Misuse that must be refused, with every part of dmakit still usable
  // after: a double free and a free inside a block (on the misuse pool,
  // which logs no refusals), and with a map of its own, a second
  // registration of the same pages and an unmap of an address never mapped.
  void misuse(StressReport& r) {
    if (rng_.below(2) == 0) {
      pool::DmaPool& p = *sh_.misuse;
      auto blk = p.alloc();
      if (!blk) return;
      auto first = p.free(blk->vaddr, blk->iova);
      auto second = p.free(blk->vaddr, blk->iova);
      auto inside = p.free(static_cast<char*>(blk->vaddr) + 8, blk->iova + 8);
      if (!first) sh_.failed(where("valid free refused", blk->iova));
      if (second) sh_.failed(where("double free accepted", blk->iova));
      else ++r.misuse_checks;
      if (inside) sh_.failed(where("free of a pointer inside a block accepted", blk->iova + 8));
      else ++r.misuse_checks;
      return;
    }
    if (maps_.empty()) return;
    const LiveMap& m = maps_[static_cast<size_t>(rng_.below(maps_.size()))];
    if (auto again = sh_.ctx.map_memory(m.mem.get(), 4096, iommu::kRead); again) {
      sh_.failed(where("second registration of mapped pages accepted", *again));
      (void)sh_.ctx.unmap_memory(m.mem.get());
    } else {
      ++r.misuse_checks;
    }
    // One page past the registration's start: an address inside it, never given to map_memory.
    if (m.mem.len() > 4096) {
      if (sh_.ctx.unmap_memory(static_cast<const char*>(m.mem.get()) + 4096))
        sh_.failed(where("unmap of an address never mapped accepted", m.iova + 4096));
      else ++r.misuse_checks;
    }
  }

  Shared& sh_;
  const core::StressSettings& s_;
  const core::StressMix& mix_;
  Rng rng_;
  unsigned id_;
  uint64_t quota_;
  std::vector<LiveBuffer> bufs_;
  std::vector<Block> blocks_;
  std::vector<LiveMap> maps_;
};

// "VmRSS:" or "VmHWM:" of /proc/self/status, in bytes (0 if unreadable).
uint64_t proc_status_bytes(const char* key) {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind(key, 0) == 0) return std::strtoull(line.c_str() + std::strlen(key), nullptr, 10) << 10;
  return 0;
}

uint64_t open_fds() {
  std::error_code ec;
  uint64_t n = 0;
  for (std::filesystem::directory_iterator it("/proc/self/fd", ec), end; !ec && it != end; it.increment(ec)) ++n;
  return n;
}

SoakSample sample(Context& ctx, double seconds) {
  return {seconds, proc_status_bytes("VmRSS:"), ctx.domain().stats().mappings, open_fds()};
}

}  // namespace

SoakVerdict check_soak(const std::vector<SoakSample>& samples) {
  SoakVerdict v;
  v.samples = samples.size();
  v.warmup = samples.size() / 4;
  const size_t rest = samples.size() - v.warmup;
  if (rest < 8) {
    v.why = fmt::format("too few samples after warm-up ({} of {}; at least 8 needed): run longer", rest,
                        samples.size());
    return v;
  }
  const size_t third = rest / 3;
  auto max_of = [&](size_t from, size_t n) {
    SoakSample m;
    for (size_t i = from; i < from + n; ++i) {
      m.rss_bytes = std::max(m.rss_bytes, samples[i].rss_bytes);
      m.mappings = std::max(m.mappings, samples[i].mappings);
      m.fds = std::max(m.fds, samples[i].fds);
    }
    return m;
  };
  v.first_max = max_of(v.warmup, third);
  v.last_max = max_of(samples.size() - third, third);
  v.first_max.seconds = samples[v.warmup].seconds;
  v.last_max.seconds = samples[samples.size() - third].seconds;
  struct Series {
    const char* name;
    uint64_t first, last;
    double rel;
    uint64_t abs;
  } series[] = {
      {"RSS (bytes)", v.first_max.rss_bytes, v.last_max.rss_bytes, 0.10, 16ull << 20},
      {"mappings", v.first_max.mappings, v.last_max.mappings, 0.25, 16},
      {"open fds", v.first_max.fds, v.last_max.fds, 0.25, 4},
  };
  for (const auto& s : series) {
    const double limit = static_cast<double>(s.first) * (1 + s.rel) + static_cast<double>(s.abs);
    if (static_cast<double>(s.last) > limit) {
      v.why += fmt::format("{}{} grew from {} to {} after warm-up (limit {:.0f})", v.why.empty() ? "" : "; ",
                           s.name, s.first, s.last, limit);
    }
  }
  v.flat = v.why.empty();
  return v;
}

Result<StressReport> run_stress(Context& ctx, const core::StressSettings& s, const StressOptions& opts) {
  const core::StressMix mix = DMAKIT_TRY(core::parse_stress_mix(s.mix));
  StressReport total;
  total.backend = ctx.backend();
  total.soak = opts.soak;
  Shared sh{ctx, dynamic_cast<iommu::SimDomain*>(&ctx.domain())};
  total.mappings_at_start = ctx.domain().stats().mappings;
  const uint64_t flushes_at_start = ctx.arena().stats().flushes;
  const uint64_t fallbacks_at_start = ctx.buffers().stats().order_fallbacks;

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
  auto since = [&t0] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  for (unsigned t = 0; t < s.threads; ++t) {
    const uint64_t quota = s.ops == 0 ? kUnbounded : s.ops / s.threads + (t < s.ops % s.threads ? 1 : 0);
    threads.emplace_back([&, t, quota] { Worker(sh, s, mix, t, quota).run(parts[t]); });
  }
  // Short slices, so an interrupt stops the run within one. Soak samples:
  // about 2000 over the run, never more often than every 100 ms.
  const auto deadline = t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                 std::chrono::duration<double>(s.seconds));
  const auto sample_every = std::max<std::chrono::steady_clock::duration>(
      std::chrono::milliseconds(100), (deadline - t0) / 2000);
  auto next_report = t0 + opts.progress_every;
  auto next_sample = t0;
  while (std::chrono::steady_clock::now() < deadline) {
    if (opts.stop != nullptr && opts.stop->load(std::memory_order_relaxed)) {
      total.interrupted = true;
      break;
    }
    if (s.ops != 0 && sh.done.load() == s.threads) break;
    const auto now = std::chrono::steady_clock::now();
    if (opts.soak && now >= next_sample) {
      next_sample += sample_every;
      total.samples.push_back(sample(ctx, since()));
    }
    if (opts.progress && now >= next_report) {
      next_report += opts.progress_every;
      opts.progress(StressProgress{since(), sh.ops.load(std::memory_order_relaxed),
                                   sh.failures.load(std::memory_order_relaxed)});
    }
    std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(
        deadline - std::chrono::steady_clock::now(), std::chrono::milliseconds(20)));
  }
  sh.stop.store(true);
  for (auto& t : threads) t.join();
  {
    StressReport rest;  // blocks parked for a cross-thread free after their thread ended
    Worker(sh, s, mix, s.threads, 0).run(rest);  // no steps: only the cleanup
    parts.push_back(rest);
  }
  total.seconds = since();

  for (const auto& p : parts) {
    total.ops += p.ops;
    total.buffer_bytes += p.buffer_bytes;
    total.cross_thread_frees += p.cross_thread_frees;
    total.device_checks += p.device_checks;
    total.misuse_checks += p.misuse_checks;
    total.alloc_errors += p.alloc_errors;
    for (size_t k = 0; k < kStressKinds; ++k) {
      total.kinds[k].ops += p.kinds[k].ops;
      total.kinds[k].latency.merge(p.kinds[k].latency);
    }
  }
  total.peak_live_bytes = sh.peak_live_bytes.load();

  // Everything was freed: pools, recycled buffers and stale IOVAs must all
  // go, leaving the domain with the mappings it had before the run.
  for (auto* p : sh.pools) {
    const auto st = p->stats();
    total.validation_failures += st.validation_failures + st.poison_failures;
    if (st.active != 0) sh.failed(fmt::format("pool {} has {} blocks active after the run", st.name, st.active));
    DMAKIT_TRY(ctx.destroy_pool(p));
  }
  if (total.validation_failures != 0)
    sh.failed(fmt::format("the workload's pools refused {} valid frees", total.validation_failures));
  DMAKIT_TRY(ctx.destroy_pool(sh.misuse));
  ctx.buffers().trim(true);
  DMAKIT_TRY(ctx.arena().flush());
  total.flushes = ctx.arena().stats().flushes - flushes_at_start;
  total.order_fallbacks = ctx.buffers().stats().order_fallbacks - fallbacks_at_start;
  total.mappings_at_end = ctx.domain().stats().mappings;
  if (total.mappings_at_end != total.mappings_at_start)
    sh.failed(fmt::format("{} mappings left in the domain after freeing everything (started with {})",
                          total.mappings_at_end, total.mappings_at_start));
  auto arena = ctx.arena().stats();
  if (arena.pages_in_use != 0) sh.failed(fmt::format("{} IOVA pages still in use after the run", arena.pages_in_use));
  if (opts.soak) {
    total.soak_verdict = check_soak(total.samples);
    if (!total.soak_verdict.flat) sh.failed("soak: " + total.soak_verdict.why);
  }
  total.peak_rss_bytes = proc_status_bytes("VmHWM:");
  total.failures = sh.failures.load();
  total.first_failure = sh.first_failure;
  return total;
}

}  // namespace dmakit::tool
