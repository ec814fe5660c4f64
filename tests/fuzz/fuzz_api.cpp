// API-sequence fuzzer: the input is a program of calls on the simulated IOMMU
// stack - IovaArena alloc/free/flush, BufferAllocator buffers over memory
// sources that fail on command, DmaPool create/alloc/free/destroy including
// invalid frees - checked after every step against a model kept here:
//
//   - live objects (raw arena ranges, buffers, pool blocks) never overlap in
//     IOVA, and buffers and blocks never share host memory (a tag byte
//     written at each end of each object must read back, through the device);
//   - SimDomain::translate of every live object gives its host memory, with
//     the permission asked for and not the other one;
//   - a freed IOVA faults once the contract says it is unmapped: at once in
//     strict mode, after flush() in lazy mode, after trim(all) for buffers;
//     and an arena range is never handed out while it is still mapped;
//   - refusals are the documented error codes and change nothing; pool and
//     allocator statistics agree with the model; at the end, with everything
//     freed, no mapping and no source memory is left.
//
// Any mismatch aborts with "FUZZ INVARIANT: ..." (a finding). The planted
// bug of the fuzz build (DMAKIT_PLANT_BUG=arena-double-handout) must be
// caught here; scripts/ci/fuzz.sh checks that it is.
#include <fuzzer/FuzzedDataProvider.h>
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "alloc_buffer/buffer_allocator.hpp"
#include "alloc_buffer/memory_source.hpp"
#include "fault_source.hpp"
#include "fuzz_support.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/sim_domain.hpp"
#include "pool/dma_pool.hpp"

using namespace dmakit;
using alloc_buffer::Buffer;
using iommu::IovaSpan;
using fuzz::violation;

namespace {

constexpr uint64_t kPage = 4096;
constexpr size_t kMaxRaw = 32, kMaxBuffers = 8, kMaxPools = 4, kMaxBlocks = 64;
constexpr uint64_t kScratchBytes = 64 * kPage;  // host memory behind one raw range (a slot of scratch_)

// Two windows with a hole between them, like the x86 MSI hole.
const std::vector<iommu::IovaWindow> kWindows = {{0x0, 0x3fffff}, {0x800000, 0x2ffffff}};

struct Raw {
  IovaSpan span;
  uint32_t slot;  // its host memory: scratch_ + slot * kScratchBytes
};

struct Buf {
  Buffer b;
  alloc_buffer::BufferRequest req;
  uint8_t tag;
};

struct Block {
  pool::DmaBlock b;
  uint8_t tag;
};

struct Pool {
  std::unique_ptr<pool::DmaPool> p;
  uint64_t size = 0, align = 1, boundary = 0, dma_limit = ~0ull;
  std::vector<Block> live;
  std::vector<pool::DmaBlock> freed;  // never live again in this pool unless re-allocated
  uint64_t refused = 0;
};

std::string_view errc(const Error& e) { return errc_name(e.code); }

class Model {
 public:
  explicit Model(FuzzedDataProvider& in) : in_(in) {}

  void run() {
    if (!setup()) return;
    for (int step = 0; step < 200 && in_.remaining_bytes() > 0; ++step) {
      this->step();
      if (step % 16 == 15) full_check();
    }
    full_check();
    teardown();
  }

 private:
  bool setup() {
    iommu::SimConfig sc;
    sc.windows = kWindows;
    sc.dma_entry_limit = in_.ConsumeBool() ? 65535 : 48;
    entry_limit_ = sc.dma_entry_limit;
    auto d = iommu::SimDomain::create(sc);
    if (!d) violation("SimDomain::create: {}", d.error().what());
    sim_ = std::move(*d);

    iommu::ArenaConfig ac;
    ac.shards = in_.ConsumeBool() ? 2 : 1;
    ac.strict = in_.ConsumeBool();
    ac.stale_max_pages = std::array<uint64_t, 3>{0, 8, 256}[in_.ConsumeIntegralInRange(0, 2)];
    ac.stale_max_age = std::chrono::milliseconds(0);  // no clock in a replayable run
    strict_ = ac.strict;
    auto a = iommu::IovaArena::create(*sim_, ac);
    if (!a) violation("IovaArena::create: {}", a.error().what());
    arena_ = std::move(*a);

    std::vector<std::unique_ptr<alloc_buffer::MemorySource>> sources;
    for (uint64_t order : {uint64_t{2} << 20, uint64_t{64} << 10, kPage}) {
      auto s = alloc_buffer::make_anon_source(order, in_.ConsumeBool());
      if (!s) violation("make_anon_source({}): {}", order, s.error().what());
      auto f = std::make_unique<alloc_buffer::FaultSource>(std::move(*s));
      faults_.push_back(f.get());
      sources.push_back(std::move(f));
    }
    alloc_buffer::BufferSettings bs;
    bs.orders = "2M,64K,4K";
    bs.prezero = false;  // no threads: one input, one schedule
    bs.psi = false;
    bs.backoff_ms = 0;
    bs.recycle_high_mb = in_.ConsumeBool() ? 256 : 1;
    auto b = alloc_buffer::create_buffer_allocator(*arena_, bs, std::move(sources));
    if (!b) violation("create_buffer_allocator: {}", b.error().what());
    buffers_ = std::move(*b);

    void* p = ::mmap(nullptr, kMaxRaw * kScratchBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    scratch_ = static_cast<std::byte*>(p);
    return true;
  }

  void teardown() {
    for (auto& pl : pools_) {
      for (auto& blk : pl.live)
        if (auto st = pl.p->free(blk.b); !st) violation("teardown: valid pool free refused: {}", st.error().what());
      pl.live.clear();
    }
    pools_.clear();
    bufs_.clear();
    for (auto& r : raws_)
      if (auto st = arena_->free(r.span); !st) violation("teardown: raw free refused: {}", st.error().what());
    raws_.clear();
    buffers_->trim(true);
    if (auto st = arena_->flush(); !st) violation("teardown: flush: {}", st.error().what());
    {
      const auto ds = sim_->stats();
      if (ds.mappings != 0 || ds.mapped_bytes != 0)
        violation("everything freed and flushed, yet {} mappings ({} bytes) remain", ds.mappings, ds.mapped_bytes);
      for (const auto* s : buffers_->sources())
        if (s->stats().live_bytes != 0)
          violation("everything freed and trimmed, yet source {} holds {} bytes", s->name(), s->stats().live_bytes);
      const auto as = arena_->stats();
      if (as.pages_in_use != 0) violation("everything freed, yet the arena has {} pages in use", as.pages_in_use);
    }
    if (auto st = arena_->check(); !st) violation("arena check at teardown: {}", st.error().what());
    buffers_.reset();
    arena_.reset();
    sim_.reset();
    ::munmap(scratch_, kMaxRaw * kScratchBytes);
  }

  // ---- choices ----
  uint64_t pick_limit() {
    switch (in_.ConsumeIntegralInRange(0, 5)) {
      case 0: return 0x3fffff;                       // the low window only
      case 1: return 0xffffff;
      case 2: return 0xfff;                          // below the first usable page: refused
      case 3: return 0x800000 + in_.ConsumeIntegralInRange<uint64_t>(0, 0x2000000);
      default: return ~0ull;
    }
  }
  uint64_t pick_align() {
    static constexpr uint64_t a[] = {0, kPage, 2 * kPage, 64 << 10, 2 << 20, 3 * kPage};
    return a[in_.ConsumeIntegralInRange<size_t>(0, std::size(a) - 1)];
  }

  // ---- model checks ----
  struct Range {
    uint64_t lo, hi;  // [lo, hi)
    const char* what;
  };
  void live_iova(std::vector<Range>& out) const {
    for (const auto& r : raws_) out.push_back({r.span.iova, r.span.end(), "raw range"});
    for (const auto& b : bufs_) out.push_back({b.b.iova(), b.b.iova() + b.b.span(), "buffer"});
    for (const auto& pl : pools_)
      for (const auto& blk : pl.live) out.push_back({blk.b.iova, blk.b.iova + pl.size, "pool block"});
  }
  std::byte* host_of(const Raw& r) const { return scratch_ + r.slot * kScratchBytes; }
  void live_host(std::vector<Range>& out) const {
    for (const auto& r : raws_)
      out.push_back({reinterpret_cast<uintptr_t>(host_of(r)), reinterpret_cast<uintptr_t>(host_of(r)) + r.span.len,
                     "raw range"});
    for (const auto& b : bufs_)
      for (const auto& c : b.b.chunks())
        out.push_back({reinterpret_cast<uintptr_t>(c.vaddr), reinterpret_cast<uintptr_t>(c.vaddr) + c.len, "buffer"});
    for (const auto& pl : pools_)
      for (const auto& blk : pl.live)
        out.push_back({reinterpret_cast<uintptr_t>(blk.b.vaddr), reinterpret_cast<uintptr_t>(blk.b.vaddr) + pl.size,
                       "pool block"});
  }
  // A new object [lo, hi) against every live one (itself included once).
  void no_overlap(const std::vector<Range>& live, Range x, const char* space) const {
    int self = 0;
    for (const auto& r : live) {
      if (r.lo == x.lo && r.hi == x.hi && std::strcmp(r.what, x.what) == 0 && self++ == 0) continue;
      if (r.lo < x.hi && x.lo < r.hi)
        violation("{} {} {:#x}-{:#x} overlaps live {} {:#x}-{:#x}", x.what, space, x.lo, x.hi, r.what, r.lo, r.hi);
    }
  }
  void check_new_iova(uint64_t lo, uint64_t hi, const char* what) const {
    std::vector<Range> live;
    live_iova(live);
    no_overlap(live, {lo, hi, what}, "IOVA");
    bool inside = false;
    for (const auto& w : kWindows) inside |= lo >= w.start && hi - 1 <= w.last;
    if (!inside || lo == 0) violation("{} IOVA {:#x}-{:#x} is outside the IOVA windows", what, lo, hi);
  }
  void check_new_host(uintptr_t lo, uintptr_t hi, const char* what) const {
    std::vector<Range> live;
    live_host(live);
    no_overlap(live, {lo, hi, what}, "host memory");
  }
  // The device reaches [iova, iova+len) as host memory `host` with `prot`,
  // and not with the permission prot lacks.
  void check_translate(uint64_t iova, uint64_t len, const void* host, uint32_t prot, const char* what) const {
    auto t = sim_->translate(iova, len, prot);
    if (!t) violation("{} at IOVA {:#x}+{:#x} is not reachable by the device: {}", what, iova, len, t.error().what());
    if (t->data() != host)
      violation("{} at IOVA {:#x} translates to host {} instead of {}", what, iova, static_cast<void*>(t->data()), host);
    for (uint32_t other : {uint32_t{iommu::kRead}, uint32_t{iommu::kWrite}})
      if ((prot & other) == 0 && sim_->translate(iova, len, other))
        violation("{} at IOVA {:#x} mapped with prot {} is reachable for access {}", what, iova, prot, other);
  }
  void check_faults(uint64_t iova, uint64_t len, const char* when) const {
    std::vector<Range> live;
    live_iova(live);
    // The first and last page and up to 8 between: a flush unmaps whole runs.
    const uint64_t pages = len / kPage, stride = std::max<uint64_t>(1, pages / 8);
    std::vector<uint64_t> sample;
    for (uint64_t p = 0; p < pages; p += stride) sample.push_back(p);
    sample.push_back(pages - 1);
    for (uint64_t p : sample) {
      const uint64_t a = iova + p * kPage;
      bool reused = false;
      for (const auto& r : live) reused |= r.lo <= a && a < r.hi;
      if (!reused && sim_->translate(a, 1, iommu::kRead))
        violation("freed IOVA {:#x} (range {:#x}+{:#x}) is still mapped {}", a, iova, len, when);
    }
  }

  // A tag at both ends of an object; read back through the device later.
  static void put_tag(void* first, void* last, uint8_t tag) {
    std::memcpy(first, &tag, 1);
    std::memcpy(last, &tag, 1);
  }
  void check_tag(uint64_t iova, uint64_t len, uint32_t prot, uint8_t tag, const char* what) const {
    for (uint64_t at : {iova, iova + len - 1}) {
      uint8_t got = 0;
      if (prot & iommu::kRead) {
        std::byte v{};
        if (auto st = sim_->device_read(at, {&v, 1}); !st)
          violation("device read of live {} at {:#x}: {}", what, at, st.error().what());
        got = static_cast<uint8_t>(v);
      } else {
        auto t = sim_->translate(at, 1, iommu::kWrite);
        if (!t) violation("live {} at {:#x} not writable: {}", what, at, t.error().what());
        got = static_cast<uint8_t>((*t)[0]);
      }
      if (got != tag)
        violation("{} byte at IOVA {:#x} reads {:#x}, its owner wrote {:#x}: host memory shared with another object",
                  what, at, got, tag);
    }
  }

  void full_check() {
    std::vector<Range> iovas, hosts;
    live_iova(iovas);
    live_host(hosts);
    for (auto* v : {&iovas, &hosts}) {
      std::sort(v->begin(), v->end(), [](const Range& a, const Range& b) { return a.lo < b.lo; });
      for (size_t i = 1; i < v->size(); ++i)
        if ((*v)[i - 1].hi > (*v)[i].lo)
          violation("live {} {:#x}-{:#x} and {} {:#x}-{:#x} overlap ({})", (*v)[i - 1].what, (*v)[i - 1].lo,
                    (*v)[i - 1].hi, (*v)[i].what, (*v)[i].lo, (*v)[i].hi, v == &iovas ? "IOVA" : "host");
    }
    for (const auto& b : bufs_) {
      for (const auto& c : b.b.chunks()) check_translate(c.iova, c.len, c.vaddr, b.req.prot, "buffer chunk");
      check_tag(b.b.iova(), b.b.size(), b.req.prot, b.tag, "buffer");
    }
    for (const auto& pl : pools_) {
      for (const auto& blk : pl.live) {
        check_translate(blk.b.iova, pl.size, blk.b.vaddr, iommu::kReadWrite, "pool block");
        check_tag(blk.b.iova, pl.size, iommu::kReadWrite, blk.tag, "pool block");
      }
      const auto st = pl.p->stats();
      if (st.active != pl.live.size())
        violation("pool {} reports {} active blocks, the model has {}", st.name, st.active, pl.live.size());
      if (st.validation_failures != pl.refused)
        violation("pool {} counts {} refused frees, the model {}", st.name, st.validation_failures, pl.refused);
    }
    uint64_t chunk_buffers = 0;
    for (const auto& pl : pools_) chunk_buffers += pl.p->stats().chunks;
    const auto bs = buffers_->stats();
    if (bs.buffers_live != bufs_.size() + chunk_buffers)
      violation("allocator reports {} live buffers, the model has {} (+{} pool chunks)", bs.buffers_live, bufs_.size(),
                chunk_buffers);
    const auto ds = sim_->stats();
    if (ds.mappings + sim_->dma_avail() != entry_limit_)
      violation("{} mappings and {} entries free, the limit is {}", ds.mappings, sim_->dma_avail(), entry_limit_);
    if (auto st = arena_->check(); !st) violation("arena check: {}", st.error().what());
    uint64_t raw_pages = 0;
    for (const auto& r : raws_) raw_pages += r.span.len / kPage;
    if (arena_->stats().pages_in_use < raw_pages)
      violation("arena has {} pages in use, the model's raw ranges alone {}", arena_->stats().pages_in_use, raw_pages);
  }

  // Freed ranges waiting for their unmap; pool growth may take them over
  // (a chunk is not in the model), so growth forgets them.
  void forget_freed() {
    freed_raw_.clear();
    freed_buf_.clear();
  }

  // An IOVA handed out again was unmapped first (the arena's rule, checked
  // by raw_alloc's map): its earlier free needs no check, and once the new
  // owner frees it, it may stay mapped as recycled memory.
  void forget_reused(uint64_t lo, uint64_t hi) {
    for (auto* v : {&freed_raw_, &freed_buf_})
      std::erase_if(*v, [&](const IovaSpan& s) { return s.iova < hi && lo < s.end(); });
  }

  // ---- operations ----
  void step() {
    switch (in_.ConsumeIntegralInRange(0, 15)) {
      case 0: case 1: raw_alloc(); break;
      case 2: raw_free(); break;
      case 3: raw_bad_free(); break;
      case 4: case 5: buffer_alloc(); break;
      case 6: buffer_free(); break;
      case 7: source_fault(); break;
      case 8: trim(); break;
      case 9: flush(); break;
      case 10: pool_create(); break;
      case 11: case 12: pool_alloc(); break;
      case 13: pool_free(); break;
      case 14: pool_bad_free(); break;
      case 15: in_.ConsumeBool() ? pool_destroy() : device_scribble(); break;
    }
  }

  void raw_alloc() {
    if (raws_.size() >= kMaxRaw) return;
    iommu::IovaRequest req;
    req.len = in_.ConsumeIntegralInRange<uint64_t>(1, kScratchBytes);
    req.align = pick_align();
    req.dma_limit = pick_limit();
    const auto before = arena_->stats().pages_in_use;
    auto r = arena_->alloc(req);
    ++allocs_since_free_;
    if (!r) {
      if (r.error().code != Errc::no_space && r.error().code != Errc::invalid_argument)
        violation("raw alloc refused with {}: {}", errc(r.error()), r.error().what());
      if (arena_->stats().pages_in_use != before) violation("refused raw alloc changed pages_in_use");
      return;
    }
    const uint64_t want = (req.len + kPage - 1) & ~(kPage - 1);
    if (r->len != want) violation("raw alloc of {:#x} returned {:#x} bytes", req.len, r->len);
    if (req.align > kPage && r->iova % req.align != 0)
      violation("raw alloc aligned {:#x} returned IOVA {:#x}", req.align, r->iova);
    if (r->end() - 1 > req.dma_limit)
      violation("raw alloc below {:#x} returned {:#x}-{:#x}", req.dma_limit, r->iova, r->end() - 1);
    check_new_iova(r->iova, r->end(), "raw range");
    uint32_t slot = 0;
    while (raw_slots_ & (1u << slot)) ++slot;  // a free slot: fewer than kMaxRaw are live
    std::byte* host = scratch_ + slot * kScratchBytes;
    // The range must be unmapped: a stale IOVA is never handed out before its unmap returned.
    if (auto st = sim_->map(host, r->iova, r->len, iommu::kReadWrite); !st) {
      if (st.error().code == Errc::exists)
        violation("arena handed out IOVA {:#x}+{:#x} that is still mapped: {}", r->iova, r->len, st.error().what());
      if (auto fr = arena_->free(*r); !fr) violation("free of an unmapped raw range refused: {}", fr.error().what());
      return;  // out of mapping entries
    }
    forget_reused(r->iova, r->end());
    raws_.push_back({*r, slot});
    raw_slots_ |= 1u << slot;
    check_translate(r->iova, r->len, host, iommu::kReadWrite, "raw range");
  }

  void raw_free() {
    if (raws_.empty()) return;
    const size_t i = in_.ConsumeIntegralInRange<size_t>(0, raws_.size() - 1);
    const IovaSpan s = raws_[i].span;
    raw_slots_ &= ~(1u << raws_[i].slot);
    raws_.erase(raws_.begin() + static_cast<ptrdiff_t>(i));
    if (auto st = arena_->free(s); !st) violation("valid raw free of {:#x}+{:#x} refused: {}", s.iova, s.len, st.error().what());
    if (strict_) check_faults(s.iova, s.len, "after a strict free");
    else freed_raw_.push_back(s);
    last_freed_raw_ = s;
    allocs_since_free_ = 0;
  }

  void raw_bad_free() {
    std::optional<IovaSpan> bad;
    const int kind = in_.ConsumeIntegralInRange(0, 2);
    if (kind == 0 && last_freed_raw_ && allocs_since_free_ == 0) {
      bad = last_freed_raw_;  // a double free: nothing took the range since
    } else if (!raws_.empty()) {
      const IovaSpan s = raws_[in_.ConsumeIntegralInRange<size_t>(0, raws_.size() - 1)].span;
      if (kind == 1 && s.len > kPage) bad = IovaSpan{s.iova + kPage, s.len - kPage};  // not its start
      else bad = IovaSpan{s.iova, s.len + kPage};                                      // too long
    }
    if (!bad) return;
    const auto before = arena_->stats();
    auto st = arena_->free(*bad);
    if (st) violation("arena accepted the invalid free of {:#x}+{:#x}", bad->iova, bad->len);
    if (st.error().code != Errc::corrupted && st.error().code != Errc::invalid_argument)
      violation("invalid raw free refused with {}: {}", errc(st.error()), st.error().what());
    const auto after = arena_->stats();
    if (after.pages_in_use != before.pages_in_use || after.stale_pages != before.stale_pages)
      violation("a refused raw free changed the arena ({} -> {} pages in use)", before.pages_in_use, after.pages_in_use);
  }

  void buffer_alloc() {
    if (bufs_.size() >= kMaxBuffers) return;
    alloc_buffer::BufferRequest req;
    const int shape = in_.ConsumeIntegralInRange(0, 3);
    // Sizes stay small enough for thousands of runs a second: the anonymous
    // source populates what it commits, and every run starts with fresh sources.
    req.len = shape == 0   ? in_.ConsumeIntegralInRange<uint64_t>(1, 3 * kPage)
              : shape == 1 ? in_.ConsumeIntegralInRange<uint64_t>(1, 256 << 10)
              : shape == 2 ? in_.ConsumeIntegralInRange<uint64_t>(1, 1 << 20)
                           : in_.ConsumeIntegralInRange<uint64_t>(2 << 20, (5 << 20) / 2);
    const uint64_t aligns[] = {kPage, 64 << 10, 2 << 20};
    req.align = aligns[in_.ConsumeIntegralInRange(0, 2)];
    req.zeroed = in_.ConsumeBool();
    req.dma_limit = pick_limit();
    const uint32_t prots[] = {iommu::kReadWrite, iommu::kRead, iommu::kWrite};
    req.prot = prots[in_.ConsumeIntegralInRange(0, 2)];
    const auto before = buffers_->stats().buffers_live;
    const auto grows = buffers_->stats().slab_grows;
    auto r = buffers_->alloc(req);
    ++allocs_since_free_;
    // A new slab is mapped over IOVA the model cannot see (like pool growth).
    if (buffers_->stats().slab_grows != grows) forget_freed();
    if (!r) {
      const Errc c = r.error().code;
      // invalid_argument: a dma_limit the request can never fit under.
      if (c != Errc::no_memory && c != Errc::no_space && !(c == Errc::invalid_argument && req.dma_limit != ~0ull))
        violation("buffer alloc of {:#x} refused with {}: {}", req.len, errc(r.error()), r.error().what());
      if (buffers_->stats().buffers_live != before) violation("refused buffer alloc changed buffers_live");
      return;
    }
    Buffer& b = *r;
    if (b.size() != req.len || b.span() < req.len || b.span() % kPage != 0)
      violation("buffer of {:#x} has size {:#x} span {:#x}", req.len, b.size(), b.span());
    if (b.iova() % req.align != 0) violation("buffer aligned {:#x} at IOVA {:#x}", req.align, b.iova());
    if (b.iova() + b.span() - 1 > req.dma_limit)
      violation("buffer below {:#x} ends at {:#x}", req.dma_limit, b.iova() + b.span() - 1);
    uint64_t at = b.iova(), total = 0;
    for (const auto& c : b.chunks()) {
      if (c.iova != at) violation("buffer chunks not contiguous in IOVA at {:#x} (chunk at {:#x})", at, c.iova);
      if (c.len == 0 || c.len % c.order != 0 || c.iova % c.order != 0 ||
          reinterpret_cast<uintptr_t>(c.vaddr) % c.order != 0)
        violation("buffer chunk {:#x}+{:#x} of order {:#x} is misaligned", c.iova, c.len, c.order);
      at += c.len;
      total += c.len;
      check_new_host(reinterpret_cast<uintptr_t>(c.vaddr), reinterpret_cast<uintptr_t>(c.vaddr) + c.len, "buffer");
      check_translate(c.iova, c.len, c.vaddr, req.prot, "buffer chunk");
    }
    if (total != b.span()) violation("buffer chunks cover {:#x} of its {:#x}-byte span", total, b.span());
    check_new_iova(b.iova(), b.iova() + b.span(), "buffer");
    forget_reused(b.iova(), b.iova() + b.span());
    if (req.zeroed)
      for (uint64_t off : {uint64_t{0}, req.len / 2, req.len - 1})
        if (*static_cast<const uint8_t*>(b.at(off)) != 0)
          violation("zeroed buffer of {:#x} has a non-zero byte at {:#x}", req.len, off);
    const uint8_t tag = next_tag();
    put_tag(b.at(0), b.at(req.len - 1), tag);
    bufs_.push_back({std::move(b), req, tag});
  }

  void buffer_free() {
    if (bufs_.empty()) return;
    const size_t i = in_.ConsumeIntegralInRange<size_t>(0, bufs_.size() - 1);
    freed_buf_.push_back({bufs_[i].b.iova(), bufs_[i].b.span()});
    bufs_.erase(bufs_.begin() + static_cast<ptrdiff_t>(i));  // the destructor frees it
  }

  void source_fault() {
    auto* f = faults_[in_.ConsumeIntegralInRange<size_t>(0, faults_.size() - 1)];
    if (in_.ConsumeBool()) f->heal();
    else f->fail_after(in_.ConsumeIntegralInRange<uint64_t>(0, 3));
  }

  void trim() {
    const bool all = in_.ConsumeBool();
    buffers_->trim(all);
    if (!all) return;
    // trim(all) retires every recycled buffer and every wholly free slab and
    // flushes the arena. A freed slab buffer stays mapped while a slot of
    // its slab is in use (the DMA contract); the model does not track slab
    // extents, so freed buffers are checked once no slot is in use at all.
    if (buffers_->stats().slab_bytes_in_use == 0)
      for (const auto& s : freed_buf_) check_faults(s.iova, s.len, "after trim(all)");
    for (const auto& s : freed_raw_) check_faults(s.iova, s.len, "after trim(all) flushed the arena");
    forget_freed();
  }

  void flush() {
    if (auto st = arena_->flush(); !st) violation("flush: {}", st.error().what());
    for (const auto& s : freed_raw_) check_faults(s.iova, s.len, "after flush()");
    freed_raw_.clear();
    if (arena_->stats().stale_pages != 0) violation("{} stale pages after flush()", arena_->stats().stale_pages);
  }

  void pool_create() {
    if (pools_.size() >= kMaxPools) return;
    Pool pl;
    const uint64_t size = in_.ConsumeIntegralInRange<uint64_t>(1, in_.ConsumeBool() ? 64 : 4096);
    const uint64_t align = uint64_t{1} << in_.ConsumeIntegralInRange(0, 12);
    uint64_t rsize = std::max<uint64_t>((size + align - 1) & ~(align - 1), 8);
    uint64_t boundary = 0;
    if (in_.ConsumeBool()) boundary = std::bit_ceil(rsize) << in_.ConsumeIntegralInRange(0, 4);
    const bool invalid = in_.ConsumeIntegralInRange(0, 7) == 0;
    const uint64_t give_align = invalid ? align * 3 : align;
    pool::PoolOptions o;
    o.cache_size = in_.ConsumeBool() ? 256 : 0;
    o.poison = in_.ConsumeIntegralInRange(0, 3) == 0;
    o.zero = in_.ConsumeIntegralInRange(0, 3) == 0;
    o.max_chunks = in_.ConsumeIntegralInRange<uint32_t>(0, 2);
    o.dma_limit = in_.ConsumeBool() ? ~0ull : 0xffffffull;
    o.log_refusals = false;
    auto p = pool::DmaPool::create(*buffers_, "fuzz" + std::to_string(pool_seq_++), size, give_align, boundary, o);
    if (invalid) {
      if (p) violation("pool with alignment {} created", give_align);
      if (p.error().code != Errc::invalid_argument) violation("bad pool refused with {}", errc(p.error()));
      return;
    }
    if (!p) violation("valid pool size {} align {} boundary {} refused: {}", size, align, boundary, p.error().what());
    pl.p = std::move(*p);
    pl.size = pl.p->block_size();
    if (pl.size < size || pl.size % align != 0)
      violation("pool of size {} align {} has blocks of {}", size, align, pl.size);
    pl.align = align;
    pl.boundary = boundary;
    pl.dma_limit = o.dma_limit;
    pools_.push_back(std::move(pl));
  }

  Pool* pick_pool() {
    if (pools_.empty()) return nullptr;
    return &pools_[in_.ConsumeIntegralInRange<size_t>(0, pools_.size() - 1)];
  }

  void pool_alloc() {
    Pool* pl = pick_pool();
    if (pl == nullptr || pl->live.size() >= kMaxBlocks) return;
    const auto chunks = pl->p->stats().chunks;
    auto r = pl->p->alloc();
    ++allocs_since_free_;
    if (pl->p->stats().chunks != chunks) forget_freed();
    if (!r) {
      if (r.error().code != Errc::no_memory && r.error().code != Errc::no_space)
        violation("pool alloc refused with {}: {}", errc(r.error()), r.error().what());
      return;
    }
    const pool::DmaBlock b = *r;
    if (b.iova % pl->align != 0) violation("pool block IOVA {:#x} not aligned to {}", b.iova, pl->align);
    if ((reinterpret_cast<uintptr_t>(b.vaddr) - b.iova) % std::min<uint64_t>(pl->align, kPage) != 0)
      violation("pool block vaddr {} and IOVA {:#x} disagree on alignment", b.vaddr, b.iova);
    if (pl->boundary != 0 && b.iova / pl->boundary != (b.iova + pl->size - 1) / pl->boundary)
      violation("pool block {:#x}+{} crosses the {} boundary", b.iova, pl->size, pl->boundary);
    if (b.iova + pl->size - 1 > pl->dma_limit) violation("pool block {:#x} above dma_limit {:#x}", b.iova, pl->dma_limit);
    check_new_iova(b.iova, b.iova + pl->size, "pool block");
    check_new_host(reinterpret_cast<uintptr_t>(b.vaddr), reinterpret_cast<uintptr_t>(b.vaddr) + pl->size, "pool block");
    check_translate(b.iova, pl->size, b.vaddr, iommu::kReadWrite, "pool block");
    const uint8_t tag = next_tag();
    put_tag(b.vaddr, static_cast<std::byte*>(b.vaddr) + pl->size - 1, tag);
    pl->live.push_back({b, tag});
    std::erase_if(pl->freed, [&](const pool::DmaBlock& f) { return f.vaddr == b.vaddr; });
  }

  void pool_free() {
    Pool* pl = pick_pool();
    if (pl == nullptr || pl->live.empty()) return;
    const size_t i = in_.ConsumeIntegralInRange<size_t>(0, pl->live.size() - 1);
    const pool::DmaBlock b = pl->live[i].b;
    if (auto st = pl->p->free(b); !st) violation("valid pool free of {} refused: {}", b.vaddr, st.error().what());
    pl->live.erase(pl->live.begin() + static_cast<ptrdiff_t>(i));
    if (pl->freed.size() < 64) pl->freed.push_back(b);
  }

  void pool_bad_free() {
    Pool* pl = pick_pool();
    if (pl == nullptr) return;
    std::optional<pool::DmaBlock> bad;
    switch (in_.ConsumeIntegralInRange(0, 3)) {
      case 0:  // double free
        if (!pl->freed.empty()) bad = pl->freed[in_.ConsumeIntegralInRange<size_t>(0, pl->freed.size() - 1)];
        break;
      case 1:  // misaligned: inside a live block
        if (!pl->live.empty() && pl->size > 1) {
          const auto b = pl->live[in_.ConsumeIntegralInRange<size_t>(0, pl->live.size() - 1)].b;
          const uint64_t k = in_.ConsumeIntegralInRange<uint64_t>(1, pl->size - 1);
          bad = pool::DmaBlock{static_cast<std::byte*>(b.vaddr) + k, b.iova + k};
        }
        break;
      case 2:  // a live block with the wrong IOVA
        if (!pl->live.empty()) {
          const auto b = pl->live[in_.ConsumeIntegralInRange<size_t>(0, pl->live.size() - 1)].b;
          bad = pool::DmaBlock{b.vaddr, b.iova ^ (pl->size * in_.ConsumeIntegralInRange<uint64_t>(1, 4))};
        }
        break;
      default:  // foreign: another pool's block or a buffer
        for (const auto& other : pools_)
          if (&other != pl && !other.live.empty()) bad = other.live.front().b;
        if (!bad && !bufs_.empty()) bad = pool::DmaBlock{bufs_.front().b.vaddr(), bufs_.front().b.iova()};
    }
    if (!bad) return;
    for (const auto& l : pl->live)
      if (l.b.vaddr == bad->vaddr && l.b.iova == bad->iova) return;  // that one is a valid free
    const auto active = pl->p->stats().active;
    auto st = pl->p->free(*bad);
    if (st) violation("pool {} accepted the invalid free of {} iova {:#x}", pl->p->name(), bad->vaddr, bad->iova);
    if (st.error().code != Errc::corrupted)
      violation("invalid pool free refused with {}: {}", errc(st.error()), st.error().what());
    ++pl->refused;
    if (pl->p->stats().active != active) violation("a refused pool free changed the active count");
  }

  void pool_destroy() {
    if (pools_.empty()) return;
    const size_t i = in_.ConsumeIntegralInRange<size_t>(0, pools_.size() - 1);
    Pool& pl = pools_[i];
    // Live blocks are freed first: a pool destroyed with live blocks keeps
    // their chunks mapped for good, which would leak across runs.
    for (auto& blk : pl.live)
      if (auto st = pl.p->free(blk.b); !st) violation("valid pool free refused: {}", st.error().what());
    pl.live.clear();
    pools_.erase(pools_.begin() + static_cast<ptrdiff_t>(i));
  }

  void device_scribble() {
    if (bufs_.empty()) return;
    auto& b = bufs_[in_.ConsumeIntegralInRange<size_t>(0, bufs_.size() - 1)];
    const uint64_t off = in_.ConsumeIntegralInRange<uint64_t>(0, b.b.size() - 1);
    const uint64_t len = std::min<uint64_t>(in_.ConsumeIntegralInRange<uint64_t>(1, 3 * kPage), b.b.size() - off);
    std::vector<std::byte> data(len, std::byte{0x5a});
    auto st = sim_->device_write(b.b.iova() + off, data);
    if ((b.req.prot & iommu::kWrite) != 0) {
      if (!st) violation("device write into a writable buffer at +{:#x} faulted: {}", off, st.error().what());
      put_tag(b.b.at(0), b.b.at(b.b.size() - 1), b.tag);  // the device may have hit a tag
    } else if (st) {
      violation("device wrote into a read-only buffer at IOVA {:#x}", b.b.iova() + off);
    }
  }

  uint8_t next_tag() { return static_cast<uint8_t>(++tag_seq_ | 1); }

  FuzzedDataProvider& in_;
  std::unique_ptr<iommu::SimDomain> sim_;
  std::unique_ptr<iommu::IovaArena> arena_;
  std::unique_ptr<alloc_buffer::BufferAllocator> buffers_;
  std::vector<alloc_buffer::FaultSource*> faults_;
  std::byte* scratch_ = nullptr;
  bool strict_ = false;
  uint64_t entry_limit_ = 0;
  std::vector<Raw> raws_;
  uint32_t raw_slots_ = 0;  // bit i: slot i of scratch_ holds a live raw range
  std::vector<Buf> bufs_;
  std::vector<Pool> pools_;  // destroyed before bufs_/buffers_ (declared after them)
  std::vector<IovaSpan> freed_raw_, freed_buf_;
  std::optional<IovaSpan> last_freed_raw_;
  uint64_t allocs_since_free_ = 1;
  uint32_t pool_seq_ = 0;
  uint32_t tag_seq_ = 0;
};

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet_log();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  Model m(in);
  m.run();
  return 0;
}
