// Internals of IovaArena: the page bitmaps and the shard lock.
//
// PageBits owns one anonymous mapping holding a WordGroup (four 64-bit words:
// used, stale, head, tail) per 64 pages of the arena's space. Page numbers
// are absolute (iova >> page shift), so alignment tests on page numbers are
// alignment tests on IOVAs. The mapping is reserved, not committed: untouched
// groups read as zero and cost no memory.
#pragma once

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
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

class PageBits {
 public:
  // Covers pages [first_pn & ~63, end_pn).
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

  bool test(Field f, uint64_t pn) const { return (word(pn).*f >> (pn & 63)) & 1; }

  // First page in [from, to) whose bit in f equals `set`, or `to`.
  uint64_t next(Field f, bool set, uint64_t from, uint64_t to) const {
    if (from >= to) return to;
    uint64_t wi = from >> 6;
    const uint64_t wlast = (to - 1) >> 6;
    uint64_t w = set ? word_at(wi).*f : ~(word_at(wi).*f);
    w &= ~0ull << (from & 63);
    for (;;) {
      if (w != 0) {
        const uint64_t pn = (wi << 6) + static_cast<uint64_t>(std::countr_zero(w));
        return pn < to ? pn : to;
      }
      if (++wi > wlast) return to;
      w = set ? word_at(wi).*f : ~(word_at(wi).*f);
    }
  }

  // Sets or clears f over [pn, pn + n).
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

  WordGroup& word(uint64_t pn) { return groups_[(pn >> 6) - base_word_]; }
  const WordGroup& word(uint64_t pn) const { return groups_[(pn >> 6) - base_word_]; }

 private:
  const WordGroup& word_at(uint64_t wi) const { return groups_[wi - base_word_]; }
  void swap(PageBits& o) noexcept {
    std::swap(groups_, o.groups_);
    std::swap(bytes_, o.bytes_);
    std::swap(base_word_, o.base_word_);
  }

  WordGroup* groups_ = nullptr;
  size_t bytes_ = 0;
  uint64_t base_word_ = 0;
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
