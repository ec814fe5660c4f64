// DmaPool on host memory with synthetic IOVAs: geometry, validation of every
// free, a device scribbling over all pool memory, growth and exhaustion,
// destruction with live blocks, threads freeing each other's blocks, two
// threads racing to free the same blocks, and rate-limited refusal logging.
#include <gtest/gtest.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include <spdlog/sinks/ringbuffer_sink.h>

#include "host_backing.hpp"
#include "base/log.hpp"
#include "pool/dma_pool.hpp"

namespace dmakit::pool {
namespace {

// Records every region the pool takes, so tests can check blocks against them.
struct Recorder {
  std::mutex mu;
  std::vector<Region> regions;
};

class RecordingBacking final : public Backing {
 public:
  RecordingBacking(HostBackingOptions o, std::shared_ptr<Recorder> rec)
      : inner_(make_host_backing(std::move(o))), rec_(std::move(rec)) {}
  Result<Region> grow(uint64_t len) override {
    auto r = inner_->grow(len);
    if (r) {
      std::lock_guard lock(rec_->mu);
      rec_->regions.push_back(*r);
    }
    return r;
  }
  void release(const Region& r) override { inner_->release(r); }
  void abandon(const Region& r) override { inner_->abandon(r); }
  std::string describe() const override { return inner_->describe(); }

 private:
  std::unique_ptr<Backing> inner_;
  std::shared_ptr<Recorder> rec_;
};

struct Made {
  std::unique_ptr<DmaPool> pool;
  std::shared_ptr<Recorder> rec;
};

Made make(size_t size, size_t align, size_t boundary, PoolOptions opts = {}, HostBackingOptions ho = {}) {
  auto rec = std::make_shared<Recorder>();
  auto p = DmaPool::create(std::make_unique<RecordingBacking>(std::move(ho), rec), "test", size, align,
                           boundary, opts);
  EXPECT_TRUE(p.has_value()) << (p ? "" : p.error().what());
  return {p ? std::move(*p) : nullptr, rec};
}

const Region* region_of(const Recorder& rec, const void* p, uint64_t len) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  for (const Region& r : rec.regions) {
    const auto base = reinterpret_cast<uintptr_t>(r.vaddr);
    if (v >= base && v + len <= base + r.len) return &r;
  }
  return nullptr;
}

TEST(DmaPool, RefusesInvalidGeometry) {
  struct Case {
    size_t size, align, boundary;
    const char* needle;
  } cases[] = {
      {0, 8, 0, "block size 0"},
      {64, 48, 0, "align 48 is not a power of two"},
      {64, 64, 100, "boundary 100 is not a power of two"},
      {68, 32, 64, "boundary 64 is smaller than the block size 96"},
      {4097, 4096, 4096, "boundary 4096 is smaller than the block size 8192"},
      {size_t{1} << 31, 8, 0, "too large"},
  };
  for (const auto& c : cases) {
    auto p = DmaPool::create(make_host_backing(), "geo", c.size, c.align, c.boundary);
    ASSERT_FALSE(p.has_value()) << c.size << "/" << c.align << "/" << c.boundary;
    EXPECT_EQ(p.error().code, Errc::invalid_argument);
    EXPECT_NE(p.error().message.find(c.needle), std::string::npos) << p.error().message;
    EXPECT_NE(p.error().message.find("pool 'geo'"), std::string::npos) << p.error().message;
  }
  PoolOptions bad_chunk;
  bad_chunk.chunk_bytes = 3 << 12;
  auto p = DmaPool::create(make_host_backing(), "geo", 64, 64, 0, bad_chunk);
  ASSERT_FALSE(p.has_value());
  EXPECT_NE(p.error().message.find("chunk_bytes 12288"), std::string::npos) << p.error().message;
  EXPECT_FALSE(DmaPool::create(make_host_backing(), "", 64, 64, 0).has_value());
  EXPECT_FALSE(DmaPool::create(nullptr, "x", 64, 64, 0).has_value());
}

// A backing whose preferred chunk size is no power of two is refused at
// create, naming it, rather than trusted with the table's range arithmetic.
TEST(DmaPool, RefusesABackingsChunkSizeThatIsNoPowerOfTwo) {
  class OddChunks final : public Backing {
   public:
    Result<Region> grow(uint64_t len) override { return inner_->grow(len); }
    void release(const Region& r) override { inner_->release(r); }
    void abandon(const Region& r) override { inner_->abandon(r); }
    std::string describe() const override { return "odd-chunk backing"; }
    uint64_t chunk_size(uint64_t) const override { return 3 << 12; }

   private:
    std::unique_ptr<Backing> inner_ = make_host_backing();
  };
  auto p = DmaPool::create(std::make_unique<OddChunks>(), "odd", 64, 64, 0);
  ASSERT_FALSE(p.has_value());
  EXPECT_EQ(p.error().code, Errc::internal);
  EXPECT_NE(p.error().message.find("odd-chunk backing suggests chunks of 12288 bytes"), std::string::npos)
      << p.error().message;
}

TEST(DmaPool, RoundsSizeLikeTheKernel) {
  auto a = make(68, 32, 4096);
  EXPECT_EQ(a.pool->block_size(), 96u);
  auto b = make(1, 0, 0);  // align 0 means 1; blocks are at least 8 bytes
  EXPECT_EQ(b.pool->block_size(), 8u);
  EXPECT_EQ(b.pool->align(), 1u);
}

// Every block of every pool in the matrix: aligned in VA and IOVA, inside one
// region with IOVA = region IOVA + offset, never across a boundary, no overlap.
TEST(DmaPool, AlignmentBoundaryMatrix) {
  const size_t sizes[] = {8, 16, 24, 64, 68, 100, 256, 1000, 1024, 4096, 5000, 6000};
  const size_t aligns[] = {1, 8, 32, 64, 4096, 8192};
  const size_t boundaries[] = {0, 4096, 8192, 1 << 14, 1 << 16, 1 << 22};
  // 4096: regions straddle lookup ranges, IOVAs off the grid. 12288 with a
  // 16 KiB boundary and 6000-byte blocks: no block fits the rest of the
  // first segment.
  const uint64_t skews[] = {0, 4096, 12288};
  int pools = 0;
  for (size_t size : sizes)
    for (size_t align : aligns)
      for (size_t boundary : boundaries)
        for (uint64_t skew : skews) {
          const size_t rsize = (std::max<size_t>(size, 8) + align - 1) & ~(align - 1);
          if (boundary != 0 && boundary < rsize) continue;
          PoolOptions o;
          o.cache_size = 8;
          HostBackingOptions ho;
          ho.va_skew = skew;
          ho.iova_skew = skew;
          auto m = make(size, align, boundary, o, ho);
          ASSERT_TRUE(m.pool);
          ++pools;
          const uint64_t want = 3 * m.pool->chunk_bytes() / rsize;  // about three chunks
          std::vector<DmaBlock> blocks;
          for (uint64_t i = 0; i < want; ++i) {
            auto b = m.pool->alloc();
            ASSERT_TRUE(b.has_value()) << b.error().what();
            blocks.push_back(*b);
          }
          std::sort(blocks.begin(), blocks.end(),
                    [](const DmaBlock& x, const DmaBlock& y) { return x.vaddr < y.vaddr; });
          for (size_t i = 0; i < blocks.size(); ++i) {
            const auto v = reinterpret_cast<uintptr_t>(blocks[i].vaddr);
            const uint64_t iova = blocks[i].iova;
            SCOPED_TRACE(::testing::Message() << size << "/" << align << "/" << boundary << " skew " << skew
                                              << " block " << i);
            ASSERT_EQ(v % align, 0u);
            ASSERT_EQ(iova % align, 0u);
            if (boundary != 0) {
              ASSERT_EQ(iova / boundary, (iova + rsize - 1) / boundary);
            }
            const Region* r = region_of(*m.rec, blocks[i].vaddr, rsize);
            ASSERT_NE(r, nullptr);
            ASSERT_EQ(iova, r->iova + (v - reinterpret_cast<uintptr_t>(r->vaddr)));
            if (i + 1 < blocks.size()) {
              ASSERT_LE(v + rsize, reinterpret_cast<uintptr_t>(blocks[i + 1].vaddr));
            }
          }
          // Nothing inside a block is a block start: its second byte, its
          // second granule and its last (state is kept per granule, the
          // size's lowest set bit, so odd sizes span several).
          const uint64_t gran = rsize & (~rsize + 1);
          uint64_t refused = 0;
          for (uint64_t off : {uint64_t{1}, gran, rsize - gran}) {
            if (off == 0 || off >= rsize) continue;  // power-of-two sizes: one granule per block
            auto bad = m.pool->free(static_cast<char*>(blocks[0].vaddr) + off, blocks[0].iova + off);
            ASSERT_FALSE(bad.has_value()) << size << "/" << align << "/" << boundary << " offset " << off;
            ++refused;
          }
          auto st = m.pool->stats();
          EXPECT_EQ(st.active, want);
          EXPECT_EQ(st.chunks, m.rec->regions.size());
          // Every block that fits is carved: counted here window by window
          // (boundary windows, at most a chunk long; without a boundary,
          // multiples of the size from the alignment grid).
          uint64_t fits = 0;
          for (const Region& r : m.rec->regions) {
            const uint64_t end = r.iova + r.len;
            const uint64_t win = boundary != 0 ? std::min<uint64_t>(boundary, m.pool->chunk_bytes()) : 0;
            for (uint64_t w = win != 0 ? r.iova / win * win : r.iova / align * align; w < end;
                 w = win != 0 ? w + win : end) {
              const uint64_t per = win != 0 ? win / rsize : ~uint64_t{0};
              for (uint64_t k = 0; k < per; ++k) {
                const uint64_t x = w + k * rsize;
                if (x + rsize > end) break;
                fits += x >= r.iova;
              }
            }
          }
          EXPECT_EQ(st.blocks, fits) << size << "/" << align << "/" << boundary << " skew " << skew;
          std::shuffle(blocks.begin(), blocks.end(), std::mt19937(7));
          for (const auto& b : blocks) ASSERT_TRUE(m.pool->free(b).has_value());
          EXPECT_EQ(m.pool->stats().active, 0u);
          EXPECT_EQ(m.pool->stats().validation_failures, refused);
        }
  EXPECT_GT(pools, 300);
}

TEST(DmaPool, RefusesBadFreesAndCountsThem) {
  auto m = make(64, 64, 0);
  auto other = make(64, 64, 0);
  auto a = m.pool->alloc();
  auto b = m.pool->alloc();
  auto foreign = other.pool->alloc();
  ASSERT_TRUE(a && b && foreign);
  auto* a8 = static_cast<char*>(a->vaddr) + 8;
  int on_stack = 0;

  struct Bad {
    void* vaddr;
    uint64_t iova;
    const char* needle;
  } bad[] = {
      {a8, a->iova + 8, "not the start of a block"},
      {a->vaddr, a->iova + 64, "IOVA does not match"},
      {foreign->vaddr, foreign->iova, "not inside any chunk"},
      {&on_stack, 0x1000, "not inside any chunk"},
      {nullptr, 0, "not inside any chunk"},
  };
  uint64_t expected = 0;
  for (const auto& x : bad) {
    auto st = m.pool->free(x.vaddr, x.iova);
    ASSERT_FALSE(st.has_value());
    EXPECT_EQ(st.error().code, Errc::corrupted);
    EXPECT_NE(st.error().message.find(x.needle), std::string::npos) << st.error().message;
    EXPECT_NE(st.error().message.find("pool 'test'"), std::string::npos);
    EXPECT_EQ(m.pool->stats().validation_failures, ++expected);
  }
  EXPECT_EQ(m.pool->stats().active, 2u);  // nothing changed

  ASSERT_TRUE(m.pool->free(*a).has_value());
  auto twice = m.pool->free(*a);  // a now sits in this thread's cache
  ASSERT_FALSE(twice.has_value());
  EXPECT_EQ(twice.error().code, Errc::corrupted);
  EXPECT_NE(twice.error().message.find("not allocated"), std::string::npos);
  EXPECT_EQ(m.pool->stats().validation_failures, ++expected);

  // The pool is intact: a comes back exactly once, b frees normally.
  auto c = m.pool->alloc();
  auto d = m.pool->alloc();
  ASSERT_TRUE(c && d);
  EXPECT_EQ(c->vaddr, a->vaddr);
  EXPECT_NE(d->vaddr, a->vaddr);
  EXPECT_NE(d->vaddr, b->vaddr);
  for (const auto& x : {*b, *c, *d}) EXPECT_TRUE(m.pool->free(x).has_value());
  EXPECT_EQ(m.pool->stats().active, 0u);
  EXPECT_TRUE(other.pool->free(*foreign).has_value());
}

// Addresses on the block grid but holding no block: the chunk's tail, where
// a block would not fit, and the gap a boundary leaves at a segment's end.
TEST(DmaPool, RefusesGridAddressesThatHoldNoBlock) {
  struct Case {
    size_t size, align, boundary;
    uint64_t off;  // in the first region
  };
  // 96-byte blocks: 682 fit in 64 KiB, the 683rd would start at 65472.
  // 68 rounded to 96, boundary 4096: 42 per 4 KiB segment, the gap at 4032.
  for (const Case& k : {Case{96, 32, 0, 65472}, Case{68, 32, 4096, 4032}}) {
    PoolOptions o;
    o.chunk_bytes = 64 << 10;
    auto m = make(k.size, k.align, k.boundary, o);
    auto a = m.pool->alloc();
    ASSERT_TRUE(a.has_value());
    ASSERT_EQ(m.rec->regions.size(), 1u);
    const Region& r = m.rec->regions.front();
    auto st = m.pool->free(static_cast<char*>(r.vaddr) + k.off, r.iova + k.off);
    ASSERT_FALSE(st.has_value());
    EXPECT_EQ(st.error().code, Errc::corrupted);
    EXPECT_NE(st.error().message.find("not the start of a block"), std::string::npos) << st.error().message;
    EXPECT_EQ(m.pool->stats().validation_failures, 1u);
    EXPECT_TRUE(m.pool->free(*a).has_value());
    EXPECT_EQ(m.pool->stats().active, 0u);
  }
}

// A device may write anything anywhere in DMA memory, free blocks included;
// the pool keeps working because none of its state is there.
TEST(DmaPool, SurvivesDeviceScribblingAllBlockMemory) {
  for (auto [size, align, boundary] : {std::tuple<size_t, size_t, size_t>{64, 64, 0}, {68, 32, 4096},
                                       {4096, 4096, 0}}) {
    PoolOptions o;
    o.cache_size = 16;
    auto m = make(size, align, boundary, o);
    std::mt19937_64 rng(size);
    std::vector<DmaBlock> live{*m.pool->alloc()};
    const uint64_t n = 2 * m.pool->stats().blocks;  // two chunks' worth
    for (int round = 0; round < 20; ++round) {
      while (live.size() < n) {
        auto b = m.pool->alloc();
        ASSERT_TRUE(b.has_value()) << b.error().what();
        live.push_back(*b);
      }
      for (const Region& r : m.rec->regions) {  // the device scribbles over every byte
        auto* p = static_cast<uint64_t*>(r.vaddr);
        for (uint64_t i = 0; i < r.len / 8; ++i) p[i] = rng();
      }
      std::shuffle(live.begin(), live.end(), rng);
      for (size_t i = 0; i < live.size() / 2; ++i) ASSERT_TRUE(m.pool->free(live[i]).has_value());
      live.erase(live.begin(), live.begin() + static_cast<ptrdiff_t>(live.size() / 2));
    }
    std::vector<DmaBlock> sorted = live;
    std::sort(sorted.begin(), sorted.end(), [](auto& x, auto& y) { return x.vaddr < y.vaddr; });
    for (size_t i = 1; i < sorted.size(); ++i) ASSERT_NE(sorted[i - 1].vaddr, sorted[i].vaddr);
    auto st = m.pool->stats();
    EXPECT_EQ(st.active, live.size());
    EXPECT_EQ(st.chunks, 2u);  // no growth beyond the working set: nothing was lost
    EXPECT_EQ(st.validation_failures, 0u);
    EXPECT_FALSE(m.pool->free(live[0].vaddr, live[0].iova + 1).has_value());  // checks still on
    for (const auto& b : live) ASSERT_TRUE(m.pool->free(b).has_value());
    EXPECT_EQ(m.pool->stats().active, 0u);
  }
}

TEST(DmaPool, PoisonReportsWritesToFreeBlocksAndZeroClears) {
  PoolOptions o;
  o.poison = true;
  o.zero = true;
  auto m = make(256, 64, 0, o);
  // Debug pools have no caches whatever cache_size says: one LIFO stack, so
  // the block freed last comes back first.
  EXPECT_FALSE(m.pool->thread_caches());
  auto a = m.pool->alloc();
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(m.pool->stats().poison_failures, 0u);  // fresh memory is poisoned at growth
  ASSERT_TRUE(m.pool->free(*a).has_value());
  static_cast<uint8_t*>(a->vaddr)[200] = 0x42;  // a late device write into a free block
  auto b = m.pool->alloc();
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(b->vaddr, a->vaddr);
  EXPECT_EQ(m.pool->stats().poison_failures, 1u);
  const auto* p = static_cast<const uint8_t*>(b->vaddr);
  EXPECT_TRUE(std::all_of(p, p + 256, [](uint8_t x) { return x == 0; }));
  ASSERT_TRUE(m.pool->free(*b).has_value());
  auto c = m.pool->alloc();  // untouched while free: no report
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(m.pool->stats().poison_failures, 1u);
  ASSERT_TRUE(m.pool->free(*c).has_value());
}

TEST(DmaPool, GrowsOnDemandAndReportsExhaustion) {
  PoolOptions o;
  o.max_chunks = 2;
  o.chunk_bytes = 64 << 10;
  auto m = make(1024, 1024, 0, o);
  std::vector<DmaBlock> got;
  for (;;) {
    auto b = m.pool->alloc();
    if (!b) {
      EXPECT_EQ(b.error().code, Errc::no_space);
      EXPECT_NE(b.error().message.find("max_chunks 2"), std::string::npos) << b.error().message;
      break;
    }
    got.push_back(*b);
    ASSERT_LE(got.size(), 128u);
  }
  EXPECT_EQ(got.size(), 128u);  // two chunks of 64 blocks
  auto st = m.pool->stats();
  EXPECT_EQ(st.chunks, 2u);
  EXPECT_EQ(st.blocks, 128u);
  EXPECT_EQ(st.active, 128u);
  EXPECT_GE(st.grow_failures, 1u);
  ASSERT_TRUE(m.pool->free(got.back()).has_value());
  EXPECT_TRUE(m.pool->alloc().has_value());  // a freed block serves the next alloc

  HostBackingOptions ho;
  ho.max_regions = 1;
  auto n = make(1024, 1024, 0, o, ho);
  for (int i = 0; i < 64; ++i) ASSERT_TRUE(n.pool->alloc().has_value());
  auto fail = n.pool->alloc();
  ASSERT_FALSE(fail.has_value());
  EXPECT_EQ(fail.error().code, Errc::no_memory);
  EXPECT_NE(fail.error().message.find("pool 'test': cannot grow by 65536 bytes"), std::string::npos)
      << fail.error().message;
}

TEST(DmaPool, DestroyKeepsChunksWithLiveBlocks) {
  HostBackingOptions ho;
  ho.counters = std::make_shared<HostBackingOptions::Counters>();
  PoolOptions o;
  o.chunk_bytes = 64 << 10;
  auto m = make(4096, 4096, 0, o, ho);
  std::vector<DmaBlock> blocks;
  for (int i = 0; i < 48; ++i) blocks.push_back(*m.pool->alloc());  // three chunks of 16
  for (int i = 0; i < 48; ++i)
    if (i / 16 != 1 || i == 20) {  // chunk 1 keeps 15
      ASSERT_TRUE(m.pool->free(blocks[i]).has_value());
    }
  EXPECT_EQ(m.pool->stats().active, 15u);
  m.pool.reset();
  EXPECT_EQ(ho.counters->grown.load(), 3u);
  EXPECT_EQ(ho.counters->released.load(), 2u);
  EXPECT_EQ(ho.counters->abandoned.load(), 1u);
  // The live block's memory is still there for the device (and the test) to write.
  std::memset(blocks[16].vaddr, 0x5a, 4096);
  EXPECT_EQ(static_cast<uint8_t*>(blocks[16].vaddr)[4095], 0x5a);
}

// Blocks travel between threads through queues and are freed where they land.
TEST(DmaPool, CrossThreadFree) {
  PoolOptions o;
  o.cache_size = 16;
  auto m = make(64, 64, 0, o);
  DmaPool& pool = *m.pool;
  constexpr int kThreads = 4, kOps = 20000;
  std::mutex mu;
  std::vector<std::deque<DmaBlock>> inbox(kThreads);
  std::atomic<int> errors{0};
  auto worker = [&](int id) {
    std::mt19937 rng(static_cast<unsigned>(id));
    for (int i = 0; i < kOps; ++i) {
      auto b = pool.alloc();
      if (!b) {
        ++errors;
        continue;
      }
      std::memcpy(b->vaddr, &i, sizeof i);
      std::memset(static_cast<char*>(b->vaddr) + 4, id, 60);
      {
        std::lock_guard lock(mu);
        inbox[rng() % kThreads].push_back(*b);
      }
      DmaBlock mine{};
      {
        std::lock_guard lock(mu);
        if (inbox[id].empty()) continue;
        mine = inbox[id].front();
        inbox[id].pop_front();
      }
      // Whoever wrote this block last still owns its bytes: a block handed out twice would show.
      const auto* p = static_cast<const unsigned char*>(mine.vaddr);
      if (std::any_of(p + 5, p + 64, [&](unsigned char x) { return x != p[4]; })) ++errors;
      if (!pool.free(mine)) ++errors;
    }
  };
  std::vector<std::thread> ts;
  for (int i = 0; i < kThreads; ++i) ts.emplace_back(worker, i);
  for (auto& t : ts) t.join();
  for (auto& q : inbox)
    for (const auto& b : q) ASSERT_TRUE(pool.free(b).has_value());
  EXPECT_EQ(errors.load(), 0);
  auto st = pool.stats();
  EXPECT_EQ(st.active, 0u);
  EXPECT_EQ(st.validation_failures, 0u);
  // The exited threads' caches came back: every block can be allocated here without growth.
  pool.flush_thread_cache();
  std::vector<DmaBlock> all;
  for (uint64_t i = 0; i < st.blocks; ++i) all.push_back(*pool.alloc());
  EXPECT_EQ(pool.stats().chunks, st.chunks);
  for (const auto& b : all) ASSERT_TRUE(pool.free(b).has_value());
}

// A pool destroyed while a thread still caches its blocks, and a new pool
// taking over its cache slot in that thread.
// A thread that runs what it is given, one call at a time, and stays alive
// in between: its pool caches (home magazines included) stay its own, where
// an exiting thread would hand them to the depot.
class Worker {
 public:
  Worker() : t_([this] { loop(); }) {}
  ~Worker() {
    {
      std::lock_guard lk(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    t_.join();
  }
  void run(std::function<void()> fn) {
    std::unique_lock lk(mu_);
    job_ = std::move(fn);
    cv_.notify_all();
    cv_.wait(lk, [&] { return !job_; });
  }

 private:
  void loop() {
    std::unique_lock lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return quit_ || job_; });
      if (quit_) return;
      job_();
      job_ = nullptr;
      cv_.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::function<void()> job_;
  bool quit_ = false;
  std::thread t_;
};

// Blocks another live thread keeps at home are not taken while the pool can
// grow: a steal moves the magazine's lines between cores and, with two
// threads out of phase, turns into stealing back and forth every round.
// 1 KiB blocks, 64 per chunk, magazines of 8; thread a has allocated and
// freed 256 of them, which now sit in its cache (mostly at home).
struct HomeFilled {
  explicit HomeFilled(uint32_t max_chunks) {
    PoolOptions o;
    o.cache_size = 16;
    o.chunk_bytes = 64 << 10;
    o.max_chunks = max_chunks;
    m = make(1024, 1024, 0, o);
    std::vector<DmaBlock> held(256);
    a.run([&] {
      for (auto& x : held) x = *m.pool->alloc();
      for (auto& x : held) ASSERT_TRUE(m.pool->free(x).has_value());
    });
  }
  Made m;
  Worker a, b;
};

TEST(DmaPool, GrowsRatherThanStealWhileItCan) {
  HomeFilled h(0);
  auto& m = h.m;
  auto& b = h.b;
  std::vector<DmaBlock> held(256);
  const uint64_t chunks = m.pool->stats().chunks;
  EXPECT_EQ(chunks, 4u);
  b.run([&] {
    for (auto& x : held) x = *m.pool->alloc();
  });
  auto st = m.pool->stats();
  EXPECT_EQ(st.steals, 0u);
  EXPECT_EQ(st.chunks, 2 * chunks);  // b grew; a's home kept its magazines
  b.run([&] {
    for (auto& x : held) ASSERT_TRUE(m.pool->free(x).has_value());
  });
  EXPECT_EQ(m.pool->stats().active, 0u);
}

// When the pool cannot grow, the blocks at another thread's home are taken
// rather than failing the alloc; only what that thread holds in hand (its
// two magazines, at most cache_size blocks) stays out of reach.
TEST(DmaPool, StealsWhenThePoolCannotGrow) {
  HomeFilled h(4);
  auto& m = h.m;
  auto& b = h.b;
  std::vector<DmaBlock> held;
  b.run([&] {
    for (;;) {
      auto got = m.pool->alloc();
      if (!got) {
        EXPECT_EQ(got.error().code, Errc::no_space) << got.error().what();
        break;
      }
      held.push_back(*got);
    }
  });
  auto st = m.pool->stats();
  EXPECT_EQ(held.size(), 256u - 16u);
  EXPECT_GT(st.steals, 0u);
  EXPECT_EQ(st.grow_failures, 1u);  // only the alloc that nothing could serve
  EXPECT_EQ(st.chunks, 4u);
  b.run([&] {
    for (auto& x : held) ASSERT_TRUE(m.pool->free(x).has_value());
  });
}

// What a thread keeps at home is bounded (16 MiB of blocks, here 16 blocks
// of 1 MiB): a thread that only frees blocks another allocates passes the
// rest to the depot, where the allocating thread finds them.
TEST(DmaPool, HomeIsBoundedSoAFreeingThreadFeedsTheDepot) {
  PoolOptions o;
  o.cache_size = 2;  // magazines of one block
  auto m = make(1 << 20, 4096, 0, o);
  Worker producer, consumer;
  std::vector<DmaBlock> held(40);
  auto produce = [&] {
    for (auto& x : held) {
      auto got = m.pool->alloc();
      ASSERT_TRUE(got.has_value()) << got.error().what();
      x = *got;
    }
  };
  producer.run(produce);
  const uint64_t first = m.pool->stats().blocks;
  EXPECT_GE(first, 40u);
  consumer.run([&] {
    for (auto& x : held) ASSERT_TRUE(m.pool->free(x).has_value());
  });
  producer.run(produce);
  auto st = m.pool->stats();
  EXPECT_EQ(st.steals, 0u);
  // The consumer kept at most 16 at home plus its two magazines; the other
  // 22 came back through the depot, so the pool grew by at most 18 blocks.
  EXPECT_LE(st.blocks, first + 18) << st.blocks;
  EXPECT_GE(st.blocks, first + 16) << st.blocks;
  consumer.run([&] {
    for (auto& x : held) ASSERT_TRUE(m.pool->free(x).has_value());
  });
  EXPECT_EQ(m.pool->stats().active, 0u);
}

TEST(DmaPool, PoolDestroyedBeforeThreadExits) {
  auto first = make(128, 128, 0);
  std::mutex mu;
  std::condition_variable cv;
  int stage = 0;
  std::atomic<int> errors{0};
  std::thread t([&] {
    auto b = first.pool->alloc();
    if (!b || !first.pool->free(*b)) ++errors;  // leaves a cached block in this thread
    {
      std::unique_lock lock(mu);
      stage = 1;
      cv.notify_all();
      cv.wait(lock, [&] { return stage == 2; });
    }
    auto second = make(128, 128, 0);  // likely takes the freed slot
    for (int i = 0; i < 100; ++i) {
      auto c = second.pool->alloc();
      if (!c || !second.pool->free(*c)) ++errors;
    }
    if (second.pool->stats().active != 0) ++errors;
  });
  {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return stage == 1; });
    first.pool.reset();
    stage = 2;
    cv.notify_all();
  }
  t.join();
  EXPECT_EQ(errors.load(), 0);
}

// Cache slots are finite (detail::kCacheSlots): a pool created when all are
// taken works without caches, and a destroyed pool's slot is reused.
TEST(DmaPool, PoolsBeyondTheCacheSlotsWorkWithoutCaches) {
  std::vector<Made> pools;
  while (pools.size() <= detail::kCacheSlots) {
    pools.push_back(make(64, 64, 0));
    if (!pools.back().pool->thread_caches()) break;
  }
  ASSERT_FALSE(pools.back().pool->thread_caches());
  EXPECT_EQ(pools.size(), detail::kCacheSlots);  // slot 0 means none: 1023 pools got one
  for (DmaPool* p : {pools.front().pool.get(), pools.back().pool.get()}) {
    std::vector<DmaBlock> held;
    for (int i = 0; i < 300; ++i) {
      auto b = p->alloc();
      ASSERT_TRUE(b.has_value()) << b.error().message;
      held.push_back(*b);
    }
    for (const DmaBlock& b : held) ASSERT_TRUE(p->free(b).has_value());
    EXPECT_EQ(p->free(held.front()).error().code, Errc::corrupted);  // still validated
    const PoolStats s = p->stats();
    EXPECT_EQ(s.active, 0u);
    EXPECT_EQ(s.validation_failures, 1u);
  }
  pools.front().pool.reset();
  EXPECT_TRUE(make(64, 64, 0).pool->thread_caches());
}

TEST(DmaPool, FormatsTheKernelPoolsListing) {
  auto m = make(68, 32, 4096);
  auto a = m.pool->alloc();
  ASSERT_TRUE(a.has_value());
  EXPECT_FALSE(m.pool->free(a->vaddr, a->iova + 4).has_value());
  PoolStats s[] = {m.pool->stats()};
  const std::string out = format_pools(s);
  const std::string head = "poolinfo - 0.1\n";
  ASSERT_EQ(out.substr(0, head.size()), head);
  const std::string line = out.substr(head.size());
  // name padded to 25, then active, blocks, size, chunks as the kernel prints them
  const std::string want = fmt::format("{:<25} {:>4} {:>4} {:>4} {:>2}  ", "test", 1, s[0].blocks, 96, 1);
  EXPECT_EQ(line.substr(0, want.size()), want) << line;
  EXPECT_NE(line.find("validation_failures=1"), std::string::npos) << line;
  EXPECT_NE(line.find("boundary=4096"), std::string::npos) << line;
  ASSERT_TRUE(m.pool->free(*a).has_value());
}

// Two threads free the same blocks at the same moment: for every block
// exactly one free succeeds and the other is refused as a double free, and
// no block ends up on the free lists twice (a duplicate would be handed out
// twice below, or the pool would report more free blocks than it has).
// fast: as the C API frees, try_free() first and free() when it says so;
// a refused free is then still refused (and counted) exactly once.
TEST(DmaPool, RacingDoubleFreesExactlyOneWins) {
  for (bool fast : {false, true})
  for (uint32_t cache : {0u, 16u, 256u}) {
    SCOPED_TRACE(::testing::Message() << "cache " << cache << (fast ? ", try_free first" : ""));
    PoolOptions o;
    o.cache_size = cache;
    auto m = make(64, 64, 0, o);
    DmaPool& pool = *m.pool;
    constexpr int kRounds = 300, kBlocks = 64;
    std::vector<DmaBlock> blocks(kBlocks);
    std::atomic<int> go{0}, done{0};
    std::atomic<bool> stop{false};
    std::vector<std::vector<char>> won(2, std::vector<char>(size_t{kRounds} * kBlocks));
    std::vector<int> corrupted(2, 0);
    auto racer = [&](int id) {
      for (int r = 0; r < kRounds; ++r) {
        while (go.load(std::memory_order_acquire) <= r) {
          if (stop.load(std::memory_order_relaxed)) return;
          std::this_thread::yield();
        }
        for (int i = 0; i < kBlocks; ++i) {  // both threads walk the same blocks in the same order
          const DmaBlock& x = blocks[static_cast<size_t>(i)];
          if (fast && pool.try_free(x.vaddr, x.iova)) {
            won[static_cast<size_t>(id)][static_cast<size_t>(r * kBlocks + i)] = true;
            continue;
          }
          auto st = pool.free(x);
          won[static_cast<size_t>(id)][static_cast<size_t>(r * kBlocks + i)] = st.has_value();
          if (!st && st.error().code == Errc::corrupted) ++corrupted[static_cast<size_t>(id)];
        }
        done.fetch_add(1, std::memory_order_acq_rel);
      }
    };
    std::thread a(racer, 0), b(racer, 1);
    for (int r = 0; r < kRounds; ++r) {
      for (auto& x : blocks) {
        auto got = pool.alloc();
        ASSERT_TRUE(got.has_value()) << got.error().what();
        x = *got;
      }
      go.store(r + 1, std::memory_order_release);
      while (done.load(std::memory_order_acquire) < 2 * (r + 1)) std::this_thread::yield();
    }
    stop = true;
    a.join();
    b.join();
    int both = 0, neither = 0;
    for (size_t i = 0; i < won[0].size(); ++i) {
      both += won[0][i] && won[1][i];
      neither += !won[0][i] && !won[1][i];
    }
    EXPECT_EQ(both, 0);
    EXPECT_EQ(neither, 0);
    EXPECT_EQ(corrupted[0] + corrupted[1], kRounds * kBlocks);
    auto st = pool.stats();
    EXPECT_EQ(st.validation_failures, uint64_t{kRounds} * kBlocks);
    EXPECT_EQ(st.active, 0u);
    // Every block comes out exactly once, and without growth.
    std::vector<DmaBlock> all;
    for (uint64_t i = 0; i < st.blocks; ++i) {
      auto got = pool.alloc();
      ASSERT_TRUE(got.has_value()) << got.error().what();
      all.push_back(*got);
    }
    std::sort(all.begin(), all.end(), [](auto& x, auto& y) { return x.vaddr < y.vaddr; });
    for (size_t i = 1; i < all.size(); ++i) ASSERT_NE(all[i - 1].vaddr, all[i].vaddr);
    EXPECT_EQ(pool.stats().chunks, st.chunks);
    for (const auto& x : all) ASSERT_TRUE(pool.free(x).has_value());
  }
}

// Refused frees are all counted and returned, but logged only in part: the
// first 8 in full, then one line per 1024.
TEST(DmaPool, RefusalWarningsAreRateLimited) {
  auto sink = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(10000);
  base::log().sinks().push_back(sink);
  auto m = make(64, 64, 0);
  auto a = m.pool->alloc();
  ASSERT_TRUE(a.has_value());
  ASSERT_TRUE(m.pool->free(*a).has_value());
  constexpr int kBad = 3000;
  for (int i = 0; i < kBad; ++i) {
    auto st = m.pool->free(*a);
    ASSERT_FALSE(st.has_value());
    EXPECT_EQ(st.error().code, Errc::corrupted);
  }
  base::log().sinks().pop_back();
  EXPECT_EQ(m.pool->stats().validation_failures, uint64_t{kBad});
  const auto lines = sink->last_formatted();
  size_t full = 0, summary = 0;
  for (const auto& l : lines) {
    if (l.find("frees refused so far") != std::string::npos) {
      ++summary;
      EXPECT_TRUE(l.find(" 1024 frees") != std::string::npos || l.find(" 2048 frees") != std::string::npos) << l;
    } else if (l.find("refused: block is not allocated") != std::string::npos) {
      ++full;
    }
  }
  EXPECT_EQ(full, 8u);
  EXPECT_EQ(summary, 2u);  // at 1024 and 2048
  EXPECT_LE(lines.size(), 12u);
}

}  // namespace
}  // namespace dmakit::pool
