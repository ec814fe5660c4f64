// Internals of IovaArena: the page bitmaps and the shard lock.
//
// PageBits holds a WordGroup (four 64-bit words: used, stale, head, tail) per
// 64 pages of the arena's space. Page numbers are absolute (iova >> page
// shift), so alignment tests on page numbers are alignment tests on IOVAs.
//
// Storage grows with use, not with the window: a radix of three levels.
//   top      one pointer per 2^29 pages (2 TiB of 4K pages), allocated at
//            create(): 128 entries for a 48-bit window, 64 Ki for a 57-bit one
//   middle   4096 segment pointers (32 KiB), allocated on first write below it
//   segment  2048 groups = 2^17 pages (64 KiB), allocated on first write
// Untouched parts point at shared read-only sentinels: an all-zero segment
// (all free) and a hole segment (all used, no heads), with middles made of
// them. So a read never allocates and never tests for null - three loads,
// no branch - and a hole of any size between IOVA windows costs nothing.
// Only ensure() allocates (new(nothrow), never under a shard lock; the
// caller drops it first); pointers are installed with a compare-exchange,
// so two threads materialising one segment keep one copy. Nothing is freed
// before the destructor: what was touched once stays (one segment covers
// 512 MiB of 4K IOVAs).
//
// Writes (set1, clear1, assign, word()) need the segments of their pages
// materialised (ready()); the arena only writes pages it found free and then
// ensured, or pages of live allocations. A write to a sentinel faults.
#pragma once

#include <array>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>

#include "base/error.hpp"

namespace dmakit::iommu::detail {

// The four bitmap words of one 64-page group (named apart from vfio::Group,
// a VFIO group fd).
struct WordGroup {
  uint64_t used;   // allocated, stale, being unmapped, or a hole
  uint64_t stale;  // freed; the IOMMU mapping may still be in place
  uint64_t head;   // first page of a live allocation
  uint64_t tail;   // last page of a live allocation
};

using Field = uint64_t WordGroup::*;

inline constexpr unsigned kSegShift = 17;                         // pages per segment: 2^17
inline constexpr unsigned kMidShift = 12;                         // segments per middle: 2^12
inline constexpr unsigned kTopShift = kSegShift + kMidShift;      // pages per top entry: 2^29
inline constexpr uint64_t kSegGroups = 1ull << (kSegShift - 6);   // 2048
inline constexpr uint64_t kSegPages = 1ull << kSegShift;

using Segment = WordGroup*;  // kSegGroups groups
struct Middle {
  std::atomic<WordGroup*> seg[1u << kMidShift];
};

// The shared read-only sentinels (defined in iova_arena.cpp).
extern const std::array<WordGroup, kSegGroups> kZeroSegment;  // all free
extern const std::array<WordGroup, kSegGroups> kHoleSegment;  // all used, no head or tail

bool is_sentinel_middle(const Middle* m);

class PageBits {
 public:
  // Covers pages [first_pn & ~63, end_pn): allocates the top level only.
  static Result<PageBits> create(uint64_t first_pn, uint64_t end_pn);
  PageBits() = default;
  PageBits(PageBits&& o) noexcept { swap(o); }
  PageBits& operator=(PageBits&& o) noexcept {
    PageBits t(std::move(o));
    swap(t);
    return *this;
  }
  PageBits(const PageBits&) = delete;
  PageBits& operator=(const PageBits&) = delete;
  ~PageBits();

  // The segment holding page pn: a real one or a sentinel. Three dependent
  // loads; acquire so a freshly installed segment is seen zeroed.
  [[gnu::always_inline]] WordGroup* segment(uint64_t pn) const {
    const Middle* m = top_[(pn >> kTopShift) - top_base_].load(std::memory_order_acquire);
    return m->seg[(pn >> kSegShift) & ((1u << kMidShift) - 1)].load(std::memory_order_acquire);
  }
  static bool is_sentinel(const WordGroup* s) { return s == kZeroSegment.data() || s == kHoleSegment.data(); }

  bool test(Field f, uint64_t pn) const { return (word(pn).*f >> (pn & 63)) & 1; }

  // First page in [from, to) whose bit in f equals `set`, or `to`. Skips a
  // sentinel segment whole when its value cannot match.
  uint64_t next(Field f, bool set, uint64_t from, uint64_t to) const;

  // Sets or clears f over [pn, pn + n). The segments must be ready().
  void assign(Field f, uint64_t pn, uint64_t n, bool on) {
    while (n > 0) {
      const uint64_t bit = pn & 63;
      const uint64_t k = n < 64 - bit ? n : 64 - bit;
      const uint64_t mask = (k == 64 ? ~0ull : ((1ull << k) - 1)) << bit;
      uint64_t& w = word(pn).*f;
      w = on ? (w | mask) : (w & ~mask);
      pn += k;
      n -= k;
    }
  }
  void set1(Field f, uint64_t pn) { word(pn).*f |= 1ull << (pn & 63); }
  void clear1(Field f, uint64_t pn) { word(pn).*f &= ~(1ull << (pn & 63)); }

  // Bits set in f over [pn, pn + n).
  uint64_t count(Field f, uint64_t pn, uint64_t n) const;

  WordGroup& word(uint64_t pn) { return segment(pn)[(pn >> 6) & (kSegGroups - 1)]; }
  const WordGroup& word(uint64_t pn) const { return segment(pn)[(pn >> 6) & (kSegGroups - 1)]; }

  // True when every page of [pn, pn + n) lies in a materialised segment.
  bool ready(uint64_t pn, uint64_t n) const;
  // Materialises the segments of [pn, pn + n) (and their middles). False
  // when memory ran out; what was installed stays, nothing else changed.
  // Never call it under a shard lock.
  bool ensure(uint64_t pn, uint64_t n);
  // Marks [pn, pn + n) as a hole (used, never a head): whole segments and
  // middles point at the hole sentinels, edges are materialised. Before any
  // other use; false when memory ran out.
  bool mark_hole(uint64_t pn, uint64_t n);
  // First page >= pn, below `to`, that lies in a materialised segment, or `to`.
  uint64_t next_real(uint64_t pn, uint64_t to) const;

  // Bytes of bookkeeping allocated so far (top, middles, segments).
  uint64_t committed_bytes() const { return committed_.load(std::memory_order_relaxed); }

 private:
  uint64_t sentinel_end(uint64_t pn) const;
  // Returns the middle for pn, materialising it; nullptr when out of memory.
  Middle* ensure_middle(uint64_t pn);
  void swap(PageBits& o) noexcept {
    std::swap(top_, o.top_);
    std::swap(top_len_, o.top_len_);
    std::swap(top_base_, o.top_base_);
    const uint64_t c = committed_.load();
    committed_.store(o.committed_.load());
    o.committed_.store(c);
  }

  std::unique_ptr<std::atomic<Middle*>[]> top_;
  uint64_t top_len_ = 0;
  uint64_t top_base_ = 0;  // first_pn >> kTopShift
  std::atomic<uint64_t> committed_{0};
};

// Test-and-test-and-set lock. Shard critical sections are a few word
// operations (a flush drops the lock around its unmap calls), so spinning
// beats a futex round trip; a long wait yields the CPU.
class SpinLock {
 public:
  bool try_lock() noexcept {
    return !held_.load(std::memory_order_relaxed) && !held_.exchange(true, std::memory_order_acquire);
  }
  void lock() noexcept {
    if (!try_lock()) lock_slow();
  }
  void unlock() noexcept { held_.store(false, std::memory_order_release); }

 private:
  [[gnu::noinline]] void lock_slow() noexcept {
    for (unsigned spins = 0; !try_lock(); ++spins) {
      if (spins < 128) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

  std::atomic<bool> held_{false};
};

// A counter written only under its shard's lock and read without it.
class Counter {
 public:
  [[gnu::always_inline]] void add(uint64_t d) {
    v_.store(v_.load(std::memory_order_relaxed) + d, std::memory_order_relaxed);
  }
  [[gnu::always_inline]] void sub(uint64_t d) {
    v_.store(v_.load(std::memory_order_relaxed) - d, std::memory_order_relaxed);
  }
  [[gnu::always_inline]] uint64_t get() const { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> v_{0};
};

}  // namespace dmakit::iommu::detail
