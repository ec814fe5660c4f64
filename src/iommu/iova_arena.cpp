#include "iommu/iova_arena.hpp"

#include <time.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <new>
#include <mutex>
#include <shared_mutex>
#include <string_view>
#include <thread>
#include <utility>

#include "base/clock.hpp"
#include "base/fault_inject.hpp"
#include "base/log.hpp"
#include "iommu/iova_bits.hpp"

namespace dmakit::iommu {

namespace detail {

namespace {

constexpr std::array<WordGroup, kSegGroups> filled(uint64_t used) {
  std::array<WordGroup, kSegGroups> a{};
  for (WordGroup& g : a) g.used = used;
  return a;
}

constexpr uint64_t kMidEntries = 1ull << kMidShift;

// Middles whose every segment is a sentinel: what the top level starts with
// (zero) and what a hole spanning a whole middle becomes. Never written.
Middle* sentinel_middle(const WordGroup* seg) {
  auto* m = ::new (std::nothrow) Middle;  // leaked on purpose: shared by every arena for the process's life
  if (m == nullptr) return nullptr;
  for (auto& e : m->seg) e.store(const_cast<WordGroup*>(seg), std::memory_order_relaxed);
  return m;
}
// Made on first use; a failed attempt is not remembered (a function-local
// static would keep the null, and no arena could be made in the process
// again), the next call tries again.
Middle* shared_middle(std::atomic<Middle*>& slot, const WordGroup* seg) {
  Middle* m = slot.load(std::memory_order_acquire);
  if (m != nullptr) return m;
  Middle* fresh = sentinel_middle(seg);
  if (fresh == nullptr) return nullptr;
  if (slot.compare_exchange_strong(m, fresh, std::memory_order_acq_rel)) return fresh;
  delete fresh;  // another thread made it first
  return m;
}
constinit std::atomic<Middle*> g_zero_middle{nullptr};
constinit std::atomic<Middle*> g_hole_middle{nullptr};
Middle* zero_middle() { return shared_middle(g_zero_middle, kZeroSegment.data()); }
Middle* hole_middle() { return shared_middle(g_hole_middle, kHoleSegment.data()); }
}  // namespace

bool is_sentinel_middle(const Middle* m) { return m == zero_middle() || m == hole_middle(); }

namespace {

constexpr std::align_val_t kSegAlign{64};  // a group never straddles a cache line

}  // namespace

alignas(64) constinit const std::array<WordGroup, kSegGroups> kZeroSegment = filled(0);
alignas(64) constinit const std::array<WordGroup, kSegGroups> kHoleSegment = filled(~0ull);

Result<PageBits> PageBits::create(uint64_t first_pn, uint64_t end_pn) {
  PageBits b;
  Middle* zero = zero_middle();
  if (zero == nullptr || hole_middle() == nullptr)
    return fail(Errc::no_memory, "IOVA arena: no memory for the bitmaps' shared empty directory");
  b.top_base_ = (first_pn & ~63ull) >> kTopShift;
  b.top_len_ = ((end_pn - 1) >> kTopShift) - b.top_base_ + 1;
  b.top_.reset(::new (std::nothrow) std::atomic<Middle*>[b.top_len_]);
  if (!b.top_)
    return fail(Errc::no_memory, "IOVA arena: no memory for the bitmaps' directory ({} bytes for {} pages)",
                b.top_len_ * sizeof(void*), end_pn - first_pn);
  for (uint64_t i = 0; i < b.top_len_; ++i) b.top_[i].store(zero, std::memory_order_relaxed);
  b.committed_.store(b.top_len_ * sizeof(void*), std::memory_order_relaxed);
  return b;
}

PageBits::~PageBits() {
  if (!top_) return;
  for (uint64_t i = 0; i < top_len_; ++i) {
    Middle* m = top_[i].load(std::memory_order_relaxed);
    if (is_sentinel_middle(m)) continue;
    std::unique_ptr<Middle> owned(m);
    for (auto& e : m->seg) {
      WordGroup* s = e.load(std::memory_order_relaxed);
      if (!is_sentinel(s)) ::operator delete[](s, kSegAlign);
    }
  }
}

Middle* PageBits::ensure_middle(uint64_t pn) {
  std::atomic<Middle*>& slot = top_[(pn >> kTopShift) - top_base_];
  Middle* m = slot.load(std::memory_order_acquire);
  if (!is_sentinel_middle(m)) return m;
  auto fresh = std::unique_ptr<Middle>(::new (std::nothrow) Middle);
  if (!fresh) return nullptr;
  // A middle under a hole keeps the hole's segments.
  for (uint64_t i = 0; i < kMidEntries; ++i)
    fresh->seg[i].store(m->seg[i].load(std::memory_order_relaxed), std::memory_order_relaxed);
  if (slot.compare_exchange_strong(m, fresh.get(), std::memory_order_acq_rel, std::memory_order_acquire)) {
    committed_.fetch_add(sizeof(Middle), std::memory_order_relaxed);
    return fresh.release();
  }
  return m;  // another thread installed one first
}

bool PageBits::ensure(uint64_t pn, uint64_t n) {
  for (uint64_t at = pn & ~(kSegPages - 1); at < pn + n; at += kSegPages) {
    if (!is_sentinel(segment(at))) continue;
    Middle* m = ensure_middle(at);
    if (m == nullptr) return false;
    std::atomic<WordGroup*>& slot = m->seg[(at >> kSegShift) & (kMidEntries - 1)];
    WordGroup* cur = slot.load(std::memory_order_acquire);
    if (!is_sentinel(cur)) continue;
    auto* fresh = static_cast<WordGroup*>(::operator new[](kSegGroups * sizeof(WordGroup), kSegAlign, std::nothrow));
    if (fresh == nullptr) return false;
    std::memcpy(fresh, cur, kSegGroups * sizeof(WordGroup));  // zero, or a hole's edge
    if (slot.compare_exchange_strong(cur, fresh, std::memory_order_acq_rel, std::memory_order_acquire)) {
      committed_.fetch_add(kSegGroups * sizeof(WordGroup), std::memory_order_relaxed);
    } else {
      ::operator delete[](fresh, kSegAlign);
    }
  }
  return true;
}

bool PageBits::ready(uint64_t pn, uint64_t n) const {
  for (uint64_t at = pn & ~(kSegPages - 1); at < pn + n; at += kSegPages)
    if (is_sentinel(segment(at))) return false;
  return true;
}

bool PageBits::mark_hole(uint64_t pn, uint64_t n) {
  const uint64_t end = pn + n;
  while (pn < end) {
    const uint64_t top_end = (pn | ((1ull << kTopShift) - 1)) + 1;
    const uint64_t seg_end = (pn | (kSegPages - 1)) + 1;
    if ((pn & ((1ull << kTopShift) - 1)) == 0 && top_end <= end) {
      top_[(pn >> kTopShift) - top_base_].store(hole_middle(), std::memory_order_release);
      pn = top_end;
    } else if ((pn & (kSegPages - 1)) == 0 && seg_end <= end) {
      Middle* m = ensure_middle(pn);
      if (m == nullptr) return false;
      m->seg[(pn >> kSegShift) & (kMidEntries - 1)].store(const_cast<WordGroup*>(kHoleSegment.data()),
                                                         std::memory_order_release);
      pn = seg_end;
    } else {
      const uint64_t k = std::min(seg_end, end) - pn;
      if (!ensure(pn, k)) return false;
      assign(&WordGroup::used, pn, k, true);
      pn += k;
    }
  }
  return true;
}

// pn lies in a sentinel segment: the end of the run of pages around it that
// reads the same, a whole middle at a time where the middle is a sentinel
// too (so a scan over a 57-bit space steps 2^29 pages at a time).
uint64_t PageBits::sentinel_end(uint64_t pn) const {
  if (is_sentinel_middle(top_[(pn >> kTopShift) - top_base_].load(std::memory_order_acquire)))
    return (pn | ((1ull << kTopShift) - 1)) + 1;
  return (pn | (kSegPages - 1)) + 1;
}

uint64_t PageBits::next_real(uint64_t pn, uint64_t to) const {
  while (pn < to && is_sentinel(segment(pn))) pn = sentinel_end(pn);
  return pn < to ? pn : to;
}

uint64_t PageBits::next(Field f, bool set, uint64_t from, uint64_t to) const {
  uint64_t pn = from;
  while (pn < to) {
    const WordGroup* seg = segment(pn);
    if (is_sentinel(seg)) {
      // Every bit of f in a sentinel has one value: used in a hole, else 0.
      const bool value = seg == kHoleSegment.data() && f == &WordGroup::used;
      if (value == set) return pn;
      pn = sentinel_end(pn);
      continue;
    }
    const uint64_t seg_end = std::min((pn | (kSegPages - 1)) + 1, to);
    uint64_t wi = (pn >> 6) & (kSegGroups - 1);
    uint64_t w = set ? seg[wi].*f : ~(seg[wi].*f);
    w &= ~0ull << (pn & 63);
    uint64_t base = pn & ~63ull;
    for (;;) {
      if (w != 0) {
        const uint64_t hit = base + static_cast<uint64_t>(std::countr_zero(w));
        return hit < to ? hit : to;
      }
      base += 64;
      if (base >= seg_end) break;
      ++wi;
      w = set ? seg[wi].*f : ~(seg[wi].*f);
    }
    pn = seg_end;
  }
  return to;
}

uint64_t PageBits::count(Field f, uint64_t pn, uint64_t n) const {
  uint64_t c = 0;
  while (n > 0) {
    const WordGroup* seg = segment(pn);
    if (is_sentinel(seg)) {
      const uint64_t k = std::min(n, sentinel_end(pn) - pn);
      if (seg == kHoleSegment.data() && f == &WordGroup::used) c += k;
      pn += k;
      n -= k;
      continue;
    }
    const uint64_t bit = pn & 63;
    const uint64_t k = n < 64 - bit ? n : 64 - bit;
    const uint64_t mask = (k == 64 ? ~0ull : ((1ull << k) - 1)) << bit;
    c += static_cast<uint64_t>(std::popcount(seg[(pn >> 6) & (kSegGroups - 1)].*f & mask));
    pn += k;
    n -= k;
  }
  return c;
}

}  // namespace detail

namespace {

using detail::Counter;
using detail::Field;
using detail::kSegGroups;
using detail::kSegShift;
using detail::WordGroup;
using detail::PageBits;
using detail::SpinLock;

constexpr uint64_t kNone = ~0ull;
constexpr uint64_t kBusy = ~0ull - 1;
constexpr uint64_t kNoMemory = ~0ull - 2;  // the bitmaps could not grow to cover the range found
// Smallest small shard: below this, splitting costs more locality than it buys.
constexpr uint64_t kMinShardPages = 512;

constexpr Field kUsed = &WordGroup::used;
constexpr Field kStale = &WordGroup::stale;
constexpr Field kHead = &WordGroup::head;
constexpr Field kTail = &WordGroup::tail;

// CLOCK_MONOTONIC_COARSE is read from the vDSO without touching the clock
// source (a few ns); its tick-sized resolution is ample for a stale age bound.
using base::coarse_now_ns;

// A stable per-thread number, handed out in order of first use: N threads
// land on N different shards, where a hash of the thread id could collide.
// Constant-initialised (0 = not numbered yet), so reading it needs no TLS
// init guard call on the fast path.
uint32_t thread_number() {
  static std::atomic<uint32_t> next{0};
  // initial-exec: one %fs-relative load, where -fPIC's default is a
  // __tls_get_addr call (4 bytes of static TLS are always to be had).
  [[gnu::tls_model("initial-exec")]] constinit thread_local uint32_t mine = 0;
  if (mine == 0) [[unlikely]]
    mine = next.fetch_add(1, std::memory_order_relaxed) + 1;
  return mine - 1;
}

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }

struct Run {
  uint64_t pn;
  uint64_t n;
  bool ok;
};

// One shard: pages [first, end). Everything but the counters and `runs` is
// guarded by `lock`; `runs` by `flush_mu`, which is taken before `lock`.
// The fast paths touch the first cache line (lock, countdown, hint, extent,
// stale range, two counters) and the page's bitmap group, nothing else.
struct alignas(64) Shard {
  SpinLock lock;
  uint32_t check_in = 1;          // operations until the flush bounds are checked again
  uint64_t hint = 0;              // next-fit: where the next search starts
  uint64_t first = 0;
  uint64_t end = 0;
  // The materialised segment the fast paths write without a directory walk:
  // its number (pn >> kSegShift; kNone = none yet) and groups. Set by the
  // general path after a commit; segments live as long as the arena.
  uint64_t seg_no = kNone;
  WordGroup* seg = nullptr;
  Counter in_use, stale;
  uint64_t stale_lo = kNone;      // extent of the stale bits, so a flush scans only it
  uint64_t stale_hi = 0;
  uint64_t pending_ranges = 0;    // stale ranges not yet flushed
  uint64_t flush_at = 0;          // flush when stale pages reach this
  int64_t oldest_ns = 0;          // coarse time when the oldest stale range was freed; 0 = none yet
  uint64_t hole_pages = 0;        // reserved pages inside [first, end)
  Counter unmapping, flushes, unmap_calls, ranges_flushed, borrows, flush_errors;
  std::mutex flush_mu;            // one flush at a time per shard
  std::vector<Run> runs;          // scratch of the running flush
};

struct Need {
  uint64_t n;          // pages
  uint64_t align;      // pages, power of two
  uint64_t limit_end;  // first page number the range may not reach
};

class ShardedArena final : public IovaArena {
 public:
  ShardedArena(Domain& domain, const ArenaConfig& cfg) : domain_(domain), cfg_(cfg) {}
  ~ShardedArena() override;

  Status init();

  Result<IovaSpan> alloc(const IovaRequest& req) override;
  Status free(IovaSpan range) override;
  [[gnu::noinline]] Result<IovaSpan> alloc_general(const IovaRequest& req);
  [[gnu::noinline]] Status free_general(IovaSpan range);
  Status flush() override;
  Result<ListenerId> add_flush_listener(FlushListener listener) override;
  void remove_flush_listener(ListenerId id) override;
  ArenaStats stats() const override;
  uint64_t page_size() const override { return page_; }
  Domain& domain() override { return domain_; }
  std::vector<IovaSpan> shard_spans() const override;
  Status check() const override;

 private:
  uint32_t shard_count() const { return nsmall_ + (has_large_ ? 1u : 0u); }
  // Small shard i covers base_pn_ + [i, i+1) << small_shift_ and the large
  // shard starts right above the last one, so a shift and a clamp find any
  // page's shard.
  uint32_t shard_of(uint64_t pn) const {
    return static_cast<uint32_t>(std::min<uint64_t>((pn - base_pn_) >> small_shift_, last_shard_));
  }
  [[gnu::always_inline]] uint64_t find(uint64_t from, uint64_t to, const Need& need) const;
  uint64_t take(Shard& p, const Need& need, bool wait, bool borrow);
  uint64_t take_locked(Shard& p, const Need& need, bool borrow);
  [[gnu::always_inline]] void commit(Shard& p, uint64_t pn, uint64_t n);
  [[gnu::always_inline]] void mark_stale(Shard& p, uint64_t pn, uint64_t n);
  [[gnu::always_inline]] bool tick(Shard& p);
  bool check_bounds(Shard& p);
  void rearm(Shard& p);
  [[gnu::noinline]] Result<IovaSpan> alloc_checked(Shard& p, uint64_t pn);
  [[gnu::noinline]] Result<IovaSpan> alloc_home_slow(Shard& p, const IovaRequest& req);
  [[gnu::noinline]] Status free_checked(Shard& p);
  Status flush_shard(Shard& p, bool notify_listener);
  Status unmap_strict(Shard& p, uint64_t pn, uint64_t n);
  void notify(std::span<const IovaSpan> done);
  void unlock_then_flush_if(Shard& p, bool due);
  Status check_shard(const Shard& p) const;

  Domain& domain_;
  const ArenaConfig cfg_;
  uint64_t page_ = 0;
  unsigned shift_ = 0;
  uint64_t lo_ = 0, hi_ = 0;       // the space, page numbers [lo_, hi_)
  uint64_t base_pn_ = 0;           // lo_ rounded down to 64 pages
  uint64_t total_pages_ = 0;       // usable pages
  uint32_t nsmall_ = 1;
  unsigned small_shift_ = 63;      // small shard i covers base_pn_ + [i, i+1) << small_shift_
  uint64_t large_first_ = kNone;   // first page of the large shard
  bool has_large_ = false;
  uint32_t last_shard_ = 0;        // index of the topmost shard
  int64_t max_age_ns_ = 0;
  uint64_t last_iova_ = 0;         // last byte of the space: a dma_limit at or above it limits nothing
  uint64_t fast_len_ = 0;          // len - 1 below this takes the 1-page fast alloc (0 = never)
  uint64_t fast_free_len_ = 0;     // the same for the fast free
  PageBits bits_;
  std::unique_ptr<Shard[]> shards_;
  std::vector<std::pair<uint64_t, uint64_t>> holes_;  // [pn, n) reserved between windows
  std::atomic<uint64_t> failures_{0};
  // Held shared while listeners run, exclusively to change the list: a
  // removed listener is never running once remove_flush_listener returns.
  std::shared_mutex listeners_mu_;
  std::vector<std::pair<ListenerId, FlushListener>> listeners_;
  ListenerId next_listener_ = 1;
#ifdef DMAKIT_FUZZ_HOOKS
  // Planted bug of the fuzz build (DMAKIT_PLANT_BUG=arena-double-handout):
  // hand out the last range again while it is still in use, so the API
  // fuzzer proves its model catches a real allocator bug. Single-threaded
  // use only; never compiled into a normal build.
  Result<IovaSpan> alloc_planted(const IovaRequest& req);
  bool planted_ = false;
  IovaSpan planted_last_{};
  uint64_t planted_calls_ = 0;
#endif
};

Status ShardedArena::init() {
#ifdef DMAKIT_FUZZ_HOOKS
  const char* plant = std::getenv("DMAKIT_PLANT_BUG");
  planted_ = plant != nullptr && std::string_view(plant) == "arena-double-handout";
#endif
  const DomainInfo& info = domain_.info();
  page_ = info.min_page();
  if (page_ == 0 || info.windows.empty())
    return fail(Errc::invalid_argument, "IOVA arena: the '{}' domain reports no page sizes or no IOVA windows",
                info.backend);
  shift_ = static_cast<unsigned>(std::countr_zero(page_));
  if (cfg_.shards > 16 || (cfg_.shards & (cfg_.shards - 1)) != 0)
    return fail(Errc::invalid_argument, "IOVA arena: shards = {} is not 0 or a power of two up to 16", cfg_.shards);
  if (!(cfg_.large_share >= 0.0 && cfg_.large_share <= 0.9))
    return fail(Errc::invalid_argument, "IOVA arena: large_share = {} is outside 0..0.9", cfg_.large_share);
  if (cfg_.iova_end != 0 && cfg_.iova_end < cfg_.iova_start)
    return fail(Errc::invalid_argument, "IOVA arena: iova_end {:#x} is below iova_start {:#x}", cfg_.iova_end,
                cfg_.iova_start);
  if (cfg_.max_pages == 0) return fail(Errc::invalid_argument, "IOVA arena: max_pages is 0");
  if (cfg_.stale_max_age.count() < 0)
    return fail(Errc::invalid_argument, "IOVA arena: stale_max_age is negative");
  max_age_ns_ = static_cast<int64_t>(cfg_.stale_max_age.count()) * 1000000;

  // Whole pages of every window inside [iova_start, iova_end]. IOVA 0 is
  // left out: a zero bus address in a descriptor is then always a bug.
  const uint64_t narrow_last = cfg_.iova_end != 0 ? cfg_.iova_end : ~0ull;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // [first_pn, end_pn)
  for (const IovaWindow& w : info.windows) {
    const uint64_t s = std::max({w.start, cfg_.iova_start, page_});
    const uint64_t last = std::min(w.last, narrow_last);
    if (last < s || s > ~0ull - (page_ - 1)) continue;
    const uint64_t first_pn = (s + page_ - 1) >> shift_;
    const uint64_t end_pn = last == ~0ull ? (1ull << (64 - shift_)) : (last + 1) >> shift_;
    if (end_pn > first_pn) ranges.emplace_back(first_pn, end_pn);
  }
  if (ranges.empty())
    return fail(Errc::invalid_argument,
                "IOVA arena: no whole {:#x}-byte page of the domain's IOVA windows lies inside [{:#x}, {:#x}]",
                page_, cfg_.iova_start, narrow_last);
  lo_ = ranges.front().first;
  const uint64_t cap_end = cfg_.max_pages > (1ull << 63) - lo_ ? kNone : lo_ + cfg_.max_pages;
  hi_ = lo_;
  for (auto& [first, end] : ranges) {
    if (first >= cap_end) break;
    end = std::min(end, cap_end);
    if (first > hi_) holes_.emplace_back(hi_, first - hi_);
    total_pages_ += end - first;
    hi_ = end;
  }
  base_pn_ = lo_ & ~63ull;
  last_iova_ = ((hi_ - 1) << shift_) + (page_ - 1);
  auto bits = PageBits::create(lo_, hi_);
  if (!bits) return std::unexpected(bits.error());
  bits_ = std::move(*bits);

  // Shard layout: N equal power-of-two small shards from the bottom, the large
  // shard above them.
  uint32_t n = cfg_.shards;
  if (n == 0) n = std::bit_floor(std::clamp(std::thread::hardware_concurrency(), 1u, 16u));
  const uint64_t span = hi_ - lo_;
  uint64_t shard_pages = 0;
  for (;;) {
    const auto target =
        static_cast<uint64_t>(static_cast<double>(span) * (1.0 - cfg_.large_share)) / n;
    shard_pages = target != 0 ? std::bit_floor(target) : 0;
    if (shard_pages >= kMinShardPages || n == 1) break;
    n /= 2;
  }
  if (shard_pages < kMinShardPages) {
    nsmall_ = 1;  // a small space: one shard over all of it
    small_shift_ = 63;
    large_first_ = kNone;
    has_large_ = false;
  } else {
    nsmall_ = n;
    small_shift_ = static_cast<unsigned>(std::countr_zero(shard_pages));
    const uint64_t top = base_pn_ + uint64_t{n} * shard_pages;
    has_large_ = top < hi_ && hi_ - top >= kMinShardPages;
    large_first_ = has_large_ ? top : kNone;  // else the last small shard takes the rest
  }
  // 1-page requests start at the caller's small shard unless the large shard
  // takes every size; in strict mode every free goes the general way.
  fast_len_ = has_large_ && cfg_.large_threshold_pages == 0 ? 0 : page_;
  fast_free_len_ = cfg_.strict ? 0 : page_;
  last_shard_ = shard_count() - 1;
  shards_ = std::make_unique<Shard[]>(shard_count());
  for (uint32_t i = 0; i < shard_count(); ++i) {
    Shard& p = shards_[i];
    if (i == nsmall_) {
      p.first = large_first_;
      p.end = hi_;
    } else {
      p.first = i == 0 ? lo_ : base_pn_ + (uint64_t{i} << small_shift_);
      p.end = (i + 1 == nsmall_ && !has_large_) ? hi_ : base_pn_ + (uint64_t{i + 1} << small_shift_);
      if (small_shift_ == 63) p.end = hi_;
    }
    p.hint = p.first;
    p.seg = const_cast<WordGroup*>(detail::kZeroSegment.data());  // read before seg_no is compared: harmless
    p.flush_at = cfg_.stale_max_pages;
  }
  // Holes are permanently used and never a head, so they are never handed
  // out and never accepted by free().
  for (auto [pn, len] : holes_) {
    if (!bits_.mark_hole(pn, len))
      return fail(Errc::no_memory, "IOVA arena: no memory for the bitmap of the hole at IOVA {:#x} ({} pages)",
                  pn << shift_, len);
    for (uint64_t left = len, at = pn; left > 0;) {
      Shard& p = shards_[shard_of(at)];
      const uint64_t k = std::min(left, p.end - at);
      p.hole_pages += k;
      at += k;
      left -= k;
    }
  }
  base::log().debug("IOVA arena: {:#x}-{:#x}, {} pages of {:#x}, {} small shards of {} pages{}",
                    lo_ << shift_, (hi_ << shift_) - 1, total_pages_, page_, nsmall_,
                    small_shift_ == 63 ? span : 1ull << small_shift_,
                    has_large_ ? fmt::format(", large shard from {:#x}", large_first_ << shift_) : "");
  return ok();
}

ShardedArena::~ShardedArena() {
  if (!shards_) return;
  for (uint32_t i = 0; i < shard_count(); ++i) (void)flush_shard(shards_[i], false);
}

// First page of a free run of need.n pages aligned to need.align inside
// [from, to), or kNone. Caller holds the shard lock.
inline uint64_t ShardedArena::find(uint64_t from, uint64_t to, const Need& need) const {
  if (need.n == 1 && need.align == 1) {
    // Fast path: a free page in the hint's word; else scan on.
    const uint64_t free_bits = ~bits_.word(from).used & (~0ull << (from & 63));
    const uint64_t pn = free_bits != 0 ? (from & ~63ull) + static_cast<uint64_t>(std::countr_zero(free_bits))
                                       : bits_.next(kUsed, false, from, to);
    return pn < to ? pn : kNone;
  }
  uint64_t pos = from;
  for (;;) {
    pos = bits_.next(kUsed, false, pos, to);
    if (pos >= to) return kNone;
    const uint64_t cand = align_up(pos, need.align);
    if (cand >= to || to - cand < need.n) return kNone;
    const uint64_t busy = bits_.next(kUsed, true, cand, cand + need.n);
    if (busy == cand + need.n) return cand;
    pos = busy + 1;
  }
}

inline void ShardedArena::commit(Shard& p, uint64_t pn, uint64_t n) {
  if (n == 1) {
    bits_.set1(kUsed, pn);
  } else {
    bits_.assign(kUsed, pn, n, true);
  }
  bits_.set1(kHead, pn);
  bits_.set1(kTail, pn + n - 1);
  p.in_use.add(n);
  p.hint = pn + n < p.end ? pn + n : p.first;
}

inline void ShardedArena::mark_stale(Shard& p, uint64_t pn, uint64_t n) {
  if (n == 1) {
    bits_.set1(kStale, pn);
  } else {
    bits_.assign(kStale, pn, n, true);
  }
  if (p.stale.get() == 0) p.oldest_ns = coarse_now_ns();
  p.stale.add(n);
  p.stale_lo = std::min(p.stale_lo, pn);
  p.stale_hi = std::max(p.stale_hi, pn + n);
}

// The flush bounds, checked when a shard's countdown runs out. Re-arms the
// countdown to the next operation at which a bound can be reached: the age
// every kStaleAgeCheckEvery operations, the stale pages when they can reach
// stale_max_pages (a fast free adds one page, so the countdown never
// overshoots; the general path compares the count itself). Under the lock.
bool ShardedArena::check_bounds(Shard& p) {
  const uint64_t s = p.stale.get();
  const bool bounded = cfg_.stale_max_pages != 0;
  bool due = false;
  if (s != 0) {
    if (bounded && s >= p.flush_at) {
      due = true;
    } else if (max_age_ns_ != 0) {
      const int64_t now = coarse_now_ns();
      if (p.oldest_ns == 0) {
        p.oldest_ns = now;  // the first stale page since the last flush, freed just now
      } else {
        due = now - p.oldest_ns >= max_age_ns_;
      }
    }
  }
  uint64_t next = kStaleAgeCheckEvery;
  if (bounded && !due) next = std::min(next, p.flush_at - s);
  p.check_in = static_cast<uint32_t>(next);
  return due;
}

// One operation of the general path: counts down like the fast paths, and
// checks the stale-page bound directly because a free here adds many pages.
inline bool ShardedArena::tick(Shard& p) {
  if (--p.check_in == 0 || (cfg_.stale_max_pages != 0 && p.stale.get() >= p.flush_at)) return check_bounds(p);
  return false;
}

// After a flush: ranges whose unmap failed do not re-trigger a flush on
// every operation; they are retried once the bounds are reached again.
void ShardedArena::rearm(Shard& p) {
  p.flush_at = p.stale.get() + cfg_.stale_max_pages;
  p.oldest_ns = p.stale.get() != 0 ? coarse_now_ns() : 0;
  p.check_in = 1;
}

// Serves `need` from shard p: search from the hint; on failure flush the
// shard's stale pages (this is both "wrap-around" and "cannot serve") and
// search it whole. Returns the first page, kNone, or kBusy when !wait and
// the shard is locked.
uint64_t ShardedArena::take(Shard& p, const Need& need, bool wait, bool borrow) {
  if (wait) {
    p.lock.lock();
  } else if (!p.lock.try_lock()) {
    return kBusy;
  }
  return take_locked(p, need, borrow);
}

// take() once p.lock is held; releases it. Returns kNoMemory when the range
// found lies in untouched bitmap segments that could not be allocated
// (nothing changed then).
uint64_t ShardedArena::take_locked(Shard& p, const Need& need, bool borrow) {
  const uint64_t to = std::min(p.end, need.limit_end);
  uint64_t pn = kNone;
  for (;;) {
    const uint64_t from = p.hint >= p.first && p.hint < to ? p.hint : p.first;
    pn = find(from, to, need);
    if (pn == kNone) {
      // Waiting for a concurrent flush (unmapping != 0) also goes through
      // flush_shard: its mutex returns once that flush has finished.
      if (p.stale.get() != 0 || p.unmapping.get() != 0) {
        p.lock.unlock();
        (void)flush_shard(p, true);  // an error is logged and counted; the pages stay reserved
        p.lock.lock();
      }
      pn = find(p.first, to, need);
    }
    if (pn == kNone || bits_.ready(pn, need.n)) break;
    // First use of this part of the space: its bitmap segments are
    // allocated without the lock, then the search runs again (the shard
    // may have changed meanwhile).
    p.lock.unlock();
    if (!bits_.ensure(pn, need.n)) return kNoMemory;
    p.lock.lock();
  }
  bool due = false;
  if (pn != kNone) {
    commit(p, pn, need.n);
    // The fast paths write the segment of the page after this range
    // without a directory walk, once it exists.
    const uint64_t last = pn + need.n - 1;
    const uint64_t at = pn + need.n < p.end && !PageBits::is_sentinel(bits_.segment(pn + need.n)) ? pn + need.n : last;
    if (at >> kSegShift != p.seg_no) {
      p.seg_no = at >> kSegShift;
      p.seg = bits_.segment(at);
    }
    if (borrow) p.borrows.add(1);
    due = tick(p);
  }
  unlock_then_flush_if(p, due);
  return pn;
}

// Fast path, one page (page alignment, no DMA limit inside the space; about
// 40 instructions and one try-lock): the caller's home shard, the first free
// bit of the hint's word, used/head/tail set in that one group, the
// countdown to the next bounds check. Anything else (shard busy, word full,
// a bounds check due) continues out of line with no side effect repeated.
Result<IovaSpan> ShardedArena::alloc(const IovaRequest& req) {
#ifdef DMAKIT_FUZZ_HOOKS
  if (planted_) return alloc_planted(req);
#endif
  if (req.len - 1 < fast_len_ && req.align <= page_ && (req.align & (req.align - 1)) == 0 &&
      req.dma_limit >= last_iova_) [[likely]] {
    Shard& p = shards_[thread_number() & (nsmall_ - 1)];
    if (p.lock.try_lock()) [[likely]] {
      const uint64_t from = p.hint;  // always inside [first, end)
      WordGroup& g = p.seg[(from >> 6) & (kSegGroups - 1)];
      const uint64_t free_bits = ~g.used & (~0ull << (from & 63));
      const uint64_t pn = (from & ~63ull) + static_cast<uint64_t>(std::countr_zero(free_bits));
      if (from >> kSegShift == p.seg_no && free_bits != 0 && pn < p.end) [[likely]] {
        const uint64_t bit = free_bits & (0 - free_bits);
        g.used |= bit;
        g.head |= bit;
        g.tail |= bit;
        p.in_use.add(1);
        p.hint = pn + 1 < p.end ? pn + 1 : p.first;
        if (--p.check_in == 0) [[unlikely]]
          return alloc_checked(p, pn);
        p.lock.unlock();
        return IovaSpan{pn << shift_, page_};
      }
      return alloc_home_slow(p, req);
    }
  }
  return alloc_general(req);
}

#ifdef DMAKIT_FUZZ_HOOKS
Result<IovaSpan> ShardedArena::alloc_planted(const IovaRequest& req) {
  const uint64_t len = (req.len + page_ - 1) & ~(page_ - 1);
  const uint64_t align = std::max(req.align, page_);
  const IovaSpan last = planted_last_;
  // Every 8th request that the last range would satisfy gets it again.
  if (++planted_calls_ % 8 == 0 && last.len != 0 && last.len == len && last.iova % align == 0 && last.end() - 1 <= req.dma_limit)
    return last;
  auto r = alloc_general(req);
  if (r) planted_last_ = *r;
  return r;
}
#endif

// The fast alloc's page is taken and the countdown ran out: check the
// bounds, then flush if one was reached.
Result<IovaSpan> ShardedArena::alloc_checked(Shard& p, uint64_t pn) {
  unlock_then_flush_if(p, check_bounds(p));
  return IovaSpan{pn << shift_, page_};
}

// The home shard is locked but its hint's word is full: search the shard
// (flushing it if that is what it takes), else borrow on the general path.
Result<IovaSpan> ShardedArena::alloc_home_slow(Shard& p, const IovaRequest& req) {
  const uint64_t got = take_locked(p, Need{1, 1, hi_}, false);
  if (got < kNoMemory) return IovaSpan{got << shift_, page_};
  return alloc_general(req);
}

Result<IovaSpan> ShardedArena::alloc_general(const IovaRequest& req) {
  if (req.len == 0) return fail(Errc::invalid_argument, "IOVA request of 0 bytes");
  if ((req.align & (req.align - 1)) != 0)
    return fail(Errc::invalid_argument, "IOVA request of {:#x} bytes: alignment {:#x} is not a power of two",
                req.len, req.align);
  Need need{};
  need.n = (req.len >> shift_) + ((req.len & (page_ - 1)) != 0 ? 1 : 0);
  if (need.n > total_pages_)
    return fail(Errc::invalid_argument,
                "IOVA request of {:#x} bytes is larger than the arena's whole space of {} pages of {:#x}",
                req.len, total_pages_, page_);
  need.align = req.align > page_ ? req.align >> shift_ : 1;
  if (req.dma_limit < page_ - 1)
    return fail(Errc::invalid_argument, "IOVA request of {:#x} bytes: dma_limit {:#x} is below the first page",
                req.len, req.dma_limit);
  need.limit_end = std::min(hi_, ((req.dma_limit - (page_ - 1)) >> shift_) + 1);
  const uint64_t lowest = align_up(lo_, need.align);
  if (lowest < lo_ || lowest >= need.limit_end || need.limit_end - lowest < need.n)
    return fail(Errc::invalid_argument,
                "IOVA request of {:#x} bytes aligned to {:#x} can never fit below dma_limit {:#x}: the arena "
                "spans {:#x}-{:#x}",
                req.len, need.align << shift_, req.dma_limit, lo_ << shift_, (hi_ << shift_) - 1);

  const uint32_t slot = thread_number() & (nsmall_ - 1);
  const bool large = has_large_ && need.n > cfg_.large_threshold_pages;
  const uint32_t home = large ? nsmall_ : slot;
  const uint32_t count = shard_count();
  // Order of shards to try: home first; small requests borrow from the other
  // small shards, then the large shard; large requests from the small shards.
  auto shard_at = [&](uint32_t k) -> uint32_t {
    if (large) return k == 0 ? nsmall_ : (slot + k - 1) & (nsmall_ - 1);
    return k < nsmall_ ? (slot + k) & (nsmall_ - 1) : nsmall_;
  };
  uint32_t busy = 0;
  bool no_memory = false;  // a shard had room but its bitmap could not grow there
  for (uint32_t k = 0; k < count; ++k) {
    const uint32_t i = shard_at(k);
    if (shards_[i].first >= need.limit_end) continue;
    const uint64_t pn = take(shards_[i], need, false, i != home);
    if (pn == kBusy) {
      busy |= 1u << i;
    } else if (pn == kNoMemory) {
      no_memory = true;
    } else if (pn != kNone) {
      return IovaSpan{pn << shift_, need.n << shift_};
    }
  }
  // Every eligible shard was busy or full: wait for the busy ones.
  for (uint32_t k = 0; k < count && busy != 0; ++k) {
    const uint32_t i = shard_at(k);
    if ((busy & (1u << i)) == 0) continue;
    const uint64_t pn = take(shards_[i], need, true, i != home);
    if (pn == kNoMemory) no_memory = true;
    else if (pn != kNone) return IovaSpan{pn << shift_, need.n << shift_};
  }
  failures_.fetch_add(1, std::memory_order_relaxed);
  if (no_memory)
    return fail(Errc::no_memory,
                "IOVA request of {:#x} bytes: no memory to extend the arena's bitmaps over untouched IOVA space "
                "({} KiB of bookkeeping so far, {} KiB more per 512 MiB of 4K IOVAs)",
                req.len, bits_.committed_bytes() >> 10, (kSegGroups * sizeof(WordGroup)) >> 10);
  const ArenaStats s = stats();
  return fail(Errc::no_space,
              "no free IOVA range of {:#x} bytes (align {:#x}, dma_limit {:#x}) in the arena {:#x}-{:#x}: "
              "{} of {} pages in use, {} stale (unmap failed or in progress)",
              req.len, need.align << shift_, req.dma_limit, lo_ << shift_, (hi_ << shift_) - 1, s.pages_in_use,
              s.total_pages, s.stale_pages);
}

// Fast path, one page in lazy mode (about 40 instructions, one try-lock):
// validate (head and tail set in the page's group), mark stale, count down.
// Anything else - a busy shard, every refusal - takes the general path, which
// locks, validates again and reports; nothing has changed by then. No call
// but tail calls, so the fast path saves no registers.
Status ShardedArena::free(IovaSpan range) {
  const uint64_t pn = range.iova >> shift_;
  if (range.len - 1 < fast_free_len_ && (range.iova & (page_ - 1)) == 0 && pn - lo_ < hi_ - lo_) [[likely]] {
    Shard& p = shards_[shard_of(pn)];
    const uint64_t bit = 1ull << (pn & 63);
    if (p.lock.try_lock()) [[likely]] {
      // A page of a live allocation lies in a materialised segment; a
      // sentinel has no head or tail, so a bad free reads zeros and goes on.
      WordGroup* seg = pn >> kSegShift == p.seg_no ? p.seg : bits_.segment(pn);
      WordGroup& g = seg[(pn >> 6) & (kSegGroups - 1)];
      if ((g.head & g.tail & bit) != 0) [[likely]] {
        g.head &= ~bit;
        g.tail &= ~bit;
        g.stale |= bit;
        const uint64_t was_stale = p.stale.get();
        p.stale.add(1);
        p.in_use.sub(1);
        p.stale_lo = std::min(p.stale_lo, pn);
        p.stale_hi = std::max(p.stale_hi, pn + 1);
        ++p.pending_ranges;
        // The first stale page since the last flush starts the age clock now.
        if ((--p.check_in == 0) | (was_stale == 0)) [[unlikely]]
          return free_checked(p);
        p.lock.unlock();
        return ok();
      }
      p.lock.unlock();
    }
  }
  return free_general(range);
}

Status ShardedArena::free_checked(Shard& p) {
  unlock_then_flush_if(p, check_bounds(p));
  return ok();
}

Status ShardedArena::free_general(IovaSpan range) {
  if (range.len == 0 || (range.iova & (page_ - 1)) != 0)
    return fail(Errc::corrupted,
                "free of IOVA {:#x} len {:#x}: not a range from this arena (zero length or not page aligned)",
                range.iova, range.len);
  const uint64_t pn = range.iova >> shift_;
  const uint64_t n = (range.len >> shift_) + ((range.len & (page_ - 1)) != 0 ? 1 : 0);
  if (pn < lo_ || pn >= hi_ || n > hi_ - pn)
    return fail(Errc::corrupted, "free of IOVA {:#x} len {:#x}: outside the arena's space {:#x}-{:#x}",
                range.iova, range.len, lo_ << shift_, (hi_ << shift_) - 1);
  Shard& p = shards_[shard_of(pn)];
  if (n > p.end - pn)
    return fail(Errc::corrupted, "free of IOVA {:#x} len {:#x}: crosses a shard boundary, so it was never allocated",
                range.iova, range.len);
  const uint64_t last = pn + n - 1;
  p.lock.lock();
  if (!bits_.test(kHead, pn) || !bits_.test(kTail, last) || (n > 1 && bits_.next(kTail, true, pn, last) != last)) {
    p.lock.unlock();
    return fail(Errc::corrupted,
                "free of IOVA {:#x} len {:#x}: not an allocated range (double free, never allocated, or wrong "
                "length)",
                range.iova, range.len);
  }
  bits_.clear1(kHead, pn);
  bits_.clear1(kTail, last);
  p.in_use.sub(n);
  if (cfg_.strict) {
    p.unmapping.add(n);
    p.lock.unlock();
    return unmap_strict(p, pn, n);
  }
  mark_stale(p, pn, n);
  ++p.pending_ranges;
  unlock_then_flush_if(p, tick(p));
  return ok();
}

Status ShardedArena::unmap_strict(Shard& p, uint64_t pn, uint64_t n) {
  auto st = domain_.unmap(pn << shift_, n << shift_);
  // Report before the pages become allocatable: the owner of the memory
  // behind them hears of the unmap before anyone can be handed these IOVAs.
  const IovaSpan done{pn << shift_, n << shift_};
  if (st) notify({&done, 1});
  p.lock.lock();
  p.unmap_calls.add(1);
  p.unmapping.sub(n);
  if (st) {
    bits_.assign(kUsed, pn, n, false);
    p.ranges_flushed.add(1);
    if (pn < p.hint) p.hint = pn;
  } else {
    mark_stale(p, pn, n);
    ++p.pending_ranges;
    p.flush_errors.add(1);
    rearm(p);
  }
  p.lock.unlock();
  if (!st)
    return std::unexpected(with_context(
        st.error(), fmt::format("strict free of IOVA {:#x} len {:#x} (the range stays reserved until a flush "
                                "unmaps it)",
                                pn << shift_, n << shift_)));
  return ok();
}

Status ShardedArena::flush_shard(Shard& p, bool notify_listener) {
  std::vector<IovaSpan> done;
  Status first = ok();
  {
    std::lock_guard fl(p.flush_mu);
    p.runs.clear();
    // 1. Under the lock: take the stale runs (adjacent ranges merge by
    //    construction); their pages stay used, so nobody gets them yet.
    //    Out of host memory for the run list, the runs taken so far are
    //    flushed and the rest stays stale (no exception under the spin lock).
    p.lock.lock();
    uint64_t total = 0;
    uint64_t pn = p.stale_lo;
    bool complete = true;
    while (pn < p.stale_hi) {
      const uint64_t s = bits_.next(kStale, true, pn, p.stale_hi);
      if (s >= p.stale_hi) break;
      const uint64_t e = bits_.next(kStale, false, s, p.stale_hi);
      try {
        p.runs.push_back({s, e - s, true});
      } catch (const std::bad_alloc&) {
        complete = false;
        break;
      }
      bits_.assign(kStale, s, e - s, false);
      total += e - s;
      pn = e;
    }
    p.stale.sub(total);
    p.unmapping.add(total);
    const uint64_t taken_ranges = complete ? p.pending_ranges : 0;
    p.pending_ranges -= taken_ranges;
    if (complete) {
      p.stale_lo = kNone;
      p.stale_hi = 0;
    } else {
      p.stale_lo = pn;  // the rest waits for the next flush
    }
    if (p.runs.empty()) rearm(p);
    p.lock.unlock();
    if (!complete) {
      first = fail(Errc::no_memory, "flush of IOVA shard {:#x}: out of host memory for its run list after {} runs; "
                   "the rest stays stale", p.first << shift_, p.runs.size());
    }
    // The report of step 3 is allocated before anything is unmapped: once a
    // run is unmapped nothing may fail before its pages are freed.
    if (notify_listener && !p.runs.empty()) {
      try {
        done.reserve(p.runs.size());
      } catch (const std::bad_alloc&) {
        p.lock.lock();
        for (const Run& r : p.runs) mark_stale(p, r.pn, r.n);
        p.unmapping.sub(total);
        p.pending_ranges += taken_ranges;
        rearm(p);
        p.lock.unlock();
        p.runs.clear();
        if (first) first = fail(Errc::no_memory, "flush of IOVA shard {:#x}: out of host memory for the report of "
                                "its runs; they stay stale", p.first << shift_);
      }
    }
    if (p.runs.empty()) return first;

    // 2. Without the lock: one unmap per run.
    //    The first error is moved, not formatted, here: nothing may throw
    //    between an unmap and step 4.
    Run failed_run{};
    bool unmap_failed = false;
    for (Run& r : p.runs) {
      auto st = domain_.unmap(r.pn << shift_, r.n << shift_);
      if (!st) {
        r.ok = false;
        if (!unmap_failed) {
          unmap_failed = true;
          failed_run = r;
          first = std::unexpected(std::move(st).error());
        }
      }
    }

    // 3. Report the unmapped runs while their pages are still reserved, so
    //    the owner of the memory behind them hears of it before anyone can
    //    be handed these IOVAs again.
    if (notify_listener) {
      for (const Run& r : p.runs)
        if (r.ok) done.push_back({r.pn << shift_, r.n << shift_});
      if (!done.empty()) notify(done);
    }

    // 4. Under the lock: the unmapped pages become free; failed runs stay stale.
    p.lock.lock();
    uint64_t failed = 0;
    for (const Run& r : p.runs) {
      if (r.ok) {
        bits_.assign(kUsed, r.pn, r.n, false);
        if (r.pn < p.hint) p.hint = r.pn;  // reuse low, just-unmapped space first: keeps the working set small
      } else {
        ++failed;
        mark_stale(p, r.pn, r.n);
      }
    }
    p.unmapping.sub(total);
    p.unmap_calls.add(p.runs.size());
    if (failed < p.runs.size()) p.flushes.add(1);
    if (failed == 0) {
      p.ranges_flushed.add(taken_ranges);
    } else {
      p.pending_ranges += taken_ranges;
      p.flush_errors.add(failed);
    }
    rearm(p);
    p.lock.unlock();
    if (unmap_failed) {
      try {
        first = std::unexpected(with_context(std::move(first).error(),
                                             fmt::format("flush of stale IOVA run {:#x} len {:#x} (kept reserved)",
                                                         failed_run.pn << shift_, failed_run.n << shift_)));
      } catch (const std::bad_alloc&) {  // the unmap's own message still names the range
      }
    }
  }
  if (!first) {
    try {
      base::log().error("IOVA arena: {}", first.error().what());
    } catch (const std::bad_alloc&) {
    }
  }
  return first;
}

// Releases p.lock, then flushes p when a bound was reached (its unmap calls
// run without the lock; an error is logged and counted, the pages stay
// reserved).
void ShardedArena::unlock_then_flush_if(Shard& p, bool due) {
  p.lock.unlock();
  if (due) (void)flush_shard(p, true);
}

void ShardedArena::notify(std::span<const IovaSpan> done) {
  std::shared_lock lk(listeners_mu_);
  for (const auto& [id, listener] : listeners_) listener(done);
}

Result<IovaArena::ListenerId> ShardedArena::add_flush_listener(FlushListener listener) {
  if (!listener) return fail(Errc::invalid_argument, "IOVA arena: empty flush listener");
  std::unique_lock lk(listeners_mu_);
  try {
    listeners_.emplace_back(next_listener_, std::move(listener));
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_memory, "IOVA arena: out of host memory for a flush listener");
  }
  return next_listener_++;
}

void ShardedArena::remove_flush_listener(ListenerId id) {
  std::unique_lock lk(listeners_mu_);
  std::erase_if(listeners_, [id](const auto& l) { return l.first == id; });
}

Status ShardedArena::flush() {
  Status first = ok();
  for (uint32_t i = 0; i < shard_count(); ++i) {
    auto st = flush_shard(shards_[i], true);
    if (!st && first) first = st;
  }
  return first;
}

ArenaStats ShardedArena::stats() const {
  ArenaStats s;
  for (uint32_t i = 0; i < shard_count(); ++i) {
    const Shard& p = shards_[i];
    s.pages_in_use += p.in_use.get();
    s.stale_pages += p.stale.get() + p.unmapping.get();
    s.flushes += p.flushes.get();
    s.unmap_calls += p.unmap_calls.get();
    s.ranges_flushed += p.ranges_flushed.get();
    s.borrows += p.borrows.get();
    s.flush_errors += p.flush_errors.get();
  }
  s.failures = failures_.load(std::memory_order_relaxed);
  s.total_pages = total_pages_;
  s.bitmap_bytes = bits_.committed_bytes();
  s.shards = nsmall_;
  s.large_shard = has_large_;
  return s;
}

std::vector<IovaSpan> ShardedArena::shard_spans() const {
  std::vector<IovaSpan> out;
  for (uint32_t i = 0; i < shard_count(); ++i)
    out.push_back({shards_[i].first << shift_, (shards_[i].end - shards_[i].first) << shift_});
  return out;
}

Status ShardedArena::check_shard(const Shard& p) const {
  const uint64_t n = p.end - p.first;
  const uint64_t used = bits_.count(kUsed, p.first, n);
  const uint64_t stale = bits_.count(kStale, p.first, n);
  const uint64_t expect_used = p.in_use.get() + p.stale.get() + p.unmapping.get() + p.hole_pages;
  if (used != expect_used)
    return fail(Errc::internal, "IOVA arena shard {:#x}: {} used pages, counters say {}", p.first << shift_, used,
                expect_used);
  if (stale != p.stale.get())
    return fail(Errc::internal, "IOVA arena shard {:#x}: {} stale pages, counter says {}", p.first << shift_, stale,
                p.stale.get());
  for (uint64_t pn = bits_.next_real(p.first & ~63ull, p.end); pn < p.end;
       pn = bits_.next_real(pn + 64, p.end)) {
    const WordGroup& g = bits_.word(pn);
    if ((g.stale & ~g.used) != 0 || ((g.head | g.tail) & (~g.used | g.stale)) != 0)
      return fail(Errc::internal, "IOVA arena: inconsistent bits at IOVA {:#x}", pn << shift_);
  }
  // Heads and tails pair up, and the allocations they bound add up to in_use.
  uint64_t live = 0;
  for (uint64_t pn = p.first;;) {
    const uint64_t h = bits_.next(kHead, true, pn, p.end);
    if (h == p.end) {
      if (bits_.next(kTail, true, pn, p.end) != p.end)
        return fail(Errc::internal, "IOVA arena shard {:#x}: tail without head", p.first << shift_);
      break;
    }
    const uint64_t t = bits_.next(kTail, true, h, p.end);
    if (t == p.end || bits_.next(kHead, true, h + 1, p.end) <= t || bits_.next(kTail, true, pn, h) != h)
      return fail(Errc::internal, "IOVA arena: allocation at IOVA {:#x} has no matching end", h << shift_);
    if (bits_.count(kUsed, h, t - h + 1) != t - h + 1)
      return fail(Errc::internal, "IOVA arena: allocation at IOVA {:#x} has free pages", h << shift_);
    live += t - h + 1;
    pn = t + 1;
  }
  if (live != p.in_use.get())
    return fail(Errc::internal, "IOVA arena shard {:#x}: allocations cover {} pages, counter says {}",
                p.first << shift_, live, p.in_use.get());
  return ok();
}

Status ShardedArena::check() const {
  for (auto [pn, len] : holes_)
    if (bits_.count(kUsed, pn, len) != len || bits_.count(kHead, pn, len) != 0 || bits_.count(kStale, pn, len) != 0)
      return fail(Errc::internal, "IOVA arena: the hole at IOVA {:#x} is not reserved", pn << shift_);
  for (uint32_t i = 0; i < shard_count(); ++i) {
    Shard& p = shards_[i];
    std::lock_guard fl(p.flush_mu);
    p.lock.lock();
    auto st = check_shard(p);
    p.lock.unlock();
    if (!st) return st;
  }
  return ok();
}

}  // namespace

ArenaConfig ArenaConfig::from_settings(const ArenaSettings& s) {
  ArenaConfig c;
  c.shards = s.shards;
  c.large_share = s.large_share;
  c.large_threshold_pages = s.large_threshold_pages;
  c.strict = s.strict;
  c.stale_max_pages = s.stale_max_pages;
  c.stale_max_age = std::chrono::milliseconds(s.stale_max_age_ms);
  c.iova_start = s.iova_start;
  c.iova_end = s.iova_end;
  return c;
}

Result<std::unique_ptr<IovaArena>> IovaArena::create(Domain& domain, const ArenaConfig& cfg) {
  // Everything init() allocates is owned by the arena (RAII), so out of
  // host memory it all goes with it.
  try {
    auto arena = std::make_unique<ShardedArena>(domain, cfg);
    DMAKIT_TRY(arena->init());
    return std::unique_ptr<IovaArena>(std::move(arena));
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_memory, "IOVA arena on the '{}' domain: out of host memory for its shards and window "
                "list", domain.info().backend);
  }
}

}  // namespace dmakit::iommu
