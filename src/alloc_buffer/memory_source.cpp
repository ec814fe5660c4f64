#include "alloc_buffer/memory_source.hpp"

#include <rte_errno.h>
#include <rte_memory.h>
#include <rte_memzone.h>
#include <sys/mman.h>

#include <bit>
#include <cstring>
#include <map>
#include <optional>
#include <mutex>
#include <set>
#include <vector>

#include "base/eal.hpp"
#include "base/log.hpp"

namespace dmakit::alloc_buffer {

std::string size_name(uint64_t bytes) {
  if (bytes != 0 && bytes % kPage1G == 0) return fmt::format("{}G", bytes / kPage1G);
  if (bytes != 0 && bytes % (1ull << 20) == 0) return fmt::format("{}M", bytes >> 20);
  if (bytes != 0 && bytes % 1024 == 0) return fmt::format("{}K", bytes >> 10);
  return fmt::format("{}B", bytes);
}

namespace {

bool pow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// ---------------------------------------------------------------------------
// AnonSource: one mmap per take. Orders above 4 KiB over-map by order - 4K
// and trim both ends so the run starts on an order boundary.
class AnonSource final : public MemorySource {
 public:
  AnonSource(uint64_t order, bool runs)
      : order_(order), runs_(runs), name_("anon-" + size_name(order)) {}

  ~AnonSource() override {
    if (uint64_t live = live_.load(); live != 0)
      base::log().warn("{}: destroyed with {} bytes still taken; leaving them mapped", name_, live);
  }

  std::string_view name() const override { return name_; }
  uint64_t order() const override { return order_; }
  uint64_t max_run() const override { return runs_ ? (~0ull >> 1) & ~(order_ - 1) : order_; }
  bool fresh_zero() const override { return true; }

  Result<void*> take(uint64_t len) override {
    if (len == 0 || len % order_ != 0 || len > max_run()) {
      failures_.fetch_add(1, std::memory_order_relaxed);
      return fail(Errc::invalid_argument, "{}: take of {} bytes is not a multiple of {} within one run",
                  name_, len, size_name(order_));
    }
    const uint64_t slack = order_ - kPage4K;
    void* raw = ::mmap(nullptr, len + slack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
      int err = errno;
      failures_.fetch_add(1, std::memory_order_relaxed);
      return fail_errno(err, "{}: mmap of {} bytes", name_, len + slack);
    }
    auto base = reinterpret_cast<uintptr_t>(raw);
    uintptr_t start = (base + order_ - 1) & ~(order_ - 1);
    if (start > base) ::munmap(raw, start - base);
    if (uintptr_t tail = base + len + slack - (start + len); tail != 0)
      ::munmap(reinterpret_cast<void*>(start + len), tail);
    live_.fetch_add(len, std::memory_order_relaxed);
    takes_.fetch_add(1, std::memory_order_relaxed);
    return reinterpret_cast<void*>(start);
  }

  void give(void* p, uint64_t len) override {
    if (::munmap(p, len) != 0) {
      base::log().error("{}: munmap({}, {}) failed: {}", name_, p, len, std::strerror(errno));
      return;
    }
    live_.fetch_sub(len, std::memory_order_relaxed);
  }

  SourceStats stats() const override {
    SourceStats s;
    s.live_bytes = live_.load(std::memory_order_relaxed);
    s.reserved_bytes = s.live_bytes;
    s.takes = takes_.load(std::memory_order_relaxed);
    s.failures = failures_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  const uint64_t order_;
  const bool runs_;
  const std::string name_;
  std::atomic<uint64_t> live_{0}, takes_{0}, failures_{0};
};

// ---------------------------------------------------------------------------
// PieceMap: the bookkeeping both slab-backed sources share. Slabs of equal
// pieces keyed by base address, each with a bitmap of taken pieces;
// `partial_` holds slabs with a free piece, lowest address first, so
// consecutive takes return consecutive pieces (one VA run, one mapping).
// Not thread-safe: the owning source holds its lock.
class PieceMap {
 public:
  explicit PieceMap(uint64_t piece) : piece_(piece) {}

  // A new slab of `pieces` free pieces at `base`.
  void add(uintptr_t base, uint32_t pieces) {
    slabs_.emplace(base, Slab{pieces, 0, std::vector<uint64_t>((pieces + 63) / 64, 0)});
    partial_.insert(base);
  }

  bool has_free() const { return !partial_.empty(); }

  // Lowest free piece of the lowest partial slab; has_free() must hold.
  uintptr_t take() {
    const uintptr_t base = *partial_.begin();
    Slab& slab = slabs_.at(base);
    uint64_t idx = 0;
    for (size_t w = 0; w < slab.bits.size(); ++w) {
      if (~slab.bits[w] == 0) continue;
      idx = w * 64 + static_cast<uint64_t>(std::countr_one(slab.bits[w]));
      slab.bits[w] |= 1ull << (idx % 64);
      break;
    }
    if (++slab.used == slab.pieces) partial_.erase(partial_.begin());
    return base + idx * piece_;
  }

  // Frees a taken piece. Returns the base of its slab, or nullopt (nothing
  // changed) when `addr` is not a taken piece; `now_empty` tells whether
  // the slab has no taken piece left (the caller then removes it).
  std::optional<uintptr_t> give(uintptr_t addr, bool& now_empty) {
    auto it = slabs_.upper_bound(addr);
    if (it == slabs_.begin()) return std::nullopt;
    --it;
    Slab& slab = it->second;
    const uint64_t off = addr - it->first;
    const uint64_t idx = off / piece_;
    if (off % piece_ != 0 || idx >= slab.pieces || (slab.bits[idx / 64] & (1ull << (idx % 64))) == 0)
      return std::nullopt;
    slab.bits[idx / 64] &= ~(1ull << (idx % 64));
    --slab.used;
    partial_.insert(it->first);
    now_empty = slab.used == 0;
    return it->first;
  }

  // Forgets a wholly free slab.
  void remove(uintptr_t base) {
    partial_.erase(base);
    slabs_.erase(base);
  }

  // fn(base, taken pieces) for every slab.
  template <class Fn>
  void for_each(Fn&& fn) const {
    for (const auto& [base, slab] : slabs_) fn(base, slab.used);
  }

 private:
  struct Slab {
    uint32_t pieces = 0;
    uint32_t used = 0;
    std::vector<uint64_t> bits;  // bit i: piece i taken
  };

  const uint64_t piece_;
  std::map<uintptr_t, Slab> slabs_;
  std::set<uintptr_t> partial_;
};

// ---------------------------------------------------------------------------
// HugepageSource. Data structure: a PieceMap of slabs, each a page-size-
// strict memzone of up to 64 pages, plus the memzone behind each slab.
// take: lowest free page of the lowest partial slab, else reserve a slab; a
// slab goes back to the EAL when all its pages are free.
class HugepageSource final : public MemorySource {
 public:
  HugepageSource(uint64_t page, uint32_t slab_pages)
      : page_(page), slab_pages_(slab_pages), name_("hugepage-" + size_name(page)), pages_(page) {}

  ~HugepageSource() override {
    std::lock_guard lock(mu_);
    pages_.for_each([&](uintptr_t base, uint32_t used) {
      const rte_memzone* mz = zones_.at(base);
      if (used != 0) {
        base::log().warn("{}: slab {} destroyed with {} pages still taken; leaving it reserved", name_, mz->name,
                         used);
        return;
      }
      rte_memzone_free(mz);
    });
  }

  std::string_view name() const override { return name_; }
  uint64_t order() const override { return page_; }

  Result<void*> take(uint64_t len) override {
    std::lock_guard lock(mu_);
    if (len != page_) {
      ++failures_;
      return fail(Errc::invalid_argument, "{}: take of {} bytes, expected one {} page", name_, len,
                  size_name(page_));
    }
    if (!pages_.has_free()) {
      if (auto st = reserve_slab(); !st) {
        ++failures_;
        return std::unexpected(st.error());
      }
    }
    live_ += page_;
    ++takes_;
    return reinterpret_cast<void*>(pages_.take());
  }

  void give(void* p, uint64_t len) override {
    std::lock_guard lock(mu_);
    bool empty = false;
    auto base = len == page_ ? pages_.give(reinterpret_cast<uintptr_t>(p), empty) : std::nullopt;
    if (!base) {
      base::log().error("{}: give of {} bytes at {}: not a page it handed out", name_, len, p);
      return;
    }
    live_ -= page_;
    if (empty) {
      // Wholly free: back to the EAL (and from there to the kernel).
      const rte_memzone* mz = zones_.at(*base);
      reserved_ -= mz->len;
      rte_memzone_free(mz);
      zones_.erase(*base);
      pages_.remove(*base);
    }
  }

  SourceStats stats() const override {
    std::lock_guard lock(mu_);
    return SourceStats{live_, reserved_, takes_, failures_};
  }

 private:
  // Slow path: a new slab, halving its size until the EAL can give one.
  Status reserve_slab() {
    const base::EalInfo* eal = base::eal_info();
    if (eal == nullptr || !eal->hugepages)
      return fail(Errc::unsupported, "{}: the EAL {}", name_,
                  eal == nullptr ? "is not started" : "runs without hugepages (--no-huge)");
    const unsigned flag = page_ == kPage1G ? RTE_MEMZONE_1GB : RTE_MEMZONE_2MB;
    int last_err = 0;
    for (uint32_t n = slab_pages_; n >= 1; n /= 2) {
      std::string zname = fmt::format("dmakit-{}-{}", size_name(page_), serial_++);
      rte_errno = 0;
      const rte_memzone* mz = rte_memzone_reserve_aligned(zname.c_str(), n * page_, SOCKET_ID_ANY, flag,
                                                          static_cast<unsigned>(page_));
      if (mz == nullptr) {
        last_err = rte_errno;
        continue;
      }
      if (mz->hugepage_sz != page_) {
        uint64_t got = mz->hugepage_sz;
        rte_memzone_free(mz);
        return fail(Errc::unsupported, "{}: EAL gave memory on {} pages, not {}", name_, size_name(got),
                    size_name(page_));
      }
      auto base = reinterpret_cast<uintptr_t>(mz->addr);
      zones_.emplace(base, mz);
      pages_.add(base, n);
      reserved_ += mz->len;
      return ok();
    }
    return fail_errno(last_err != 0 ? last_err : ENOMEM, "{}: rte_memzone_reserve_aligned of {} down to 1 page",
                      name_, size_name(uint64_t{slab_pages_} * page_));
  }

  const uint64_t page_;
  const uint32_t slab_pages_;
  const std::string name_;
  mutable std::mutex mu_;
  PieceMap pages_;                                  // slabs of pages, by base
  std::map<uintptr_t, const rte_memzone*> zones_;  // the memzone behind each slab
  uint64_t live_ = 0, reserved_ = 0, takes_ = 0, failures_ = 0, serial_ = 0;
};

// ---------------------------------------------------------------------------
// CarvedSource. Data structure: a PieceMap of the parent chunks it holds.
// take: first free piece of the lowest partial parent, else one more parent
// chunk. A parent chunk goes back when all its pieces are.
class CarvedSource final : public MemorySource {
 public:
  CarvedSource(MemorySource& parent, uint64_t order)
      : parent_(parent),
        order_(order),
        pieces_per_parent_(static_cast<uint32_t>(parent.order() / order)),
        name_(fmt::format("carved-{}", size_name(order))),
        pieces_(order) {}

  ~CarvedSource() override {
    std::lock_guard lock(mu_);
    pieces_.for_each([&](uintptr_t base, uint32_t used) {
      if (used != 0) {
        base::log().warn("{}: destroyed with {} pieces of {} still taken; leaving its parent chunk", name_, used,
                         reinterpret_cast<void*>(base));
        return;
      }
      parent_.give(reinterpret_cast<void*>(base), parent_.order());
    });
  }

  std::string_view name() const override { return name_; }
  uint64_t order() const override { return order_; }

  Result<void*> take(uint64_t len) override {
    std::lock_guard lock(mu_);
    if (len != order_) {
      ++failures_;
      return fail(Errc::invalid_argument, "{}: take of {} bytes, expected {}", name_, len, size_name(order_));
    }
    if (!pieces_.has_free()) {
      auto p = parent_.take(parent_.order());
      if (!p) {
        ++failures_;
        return std::unexpected(with_context(std::move(p).error(), fmt::format("{}: parent page", name_)));
      }
      pieces_.add(reinterpret_cast<uintptr_t>(*p), pieces_per_parent_);
      reserved_ += parent_.order();
    }
    live_ += order_;
    ++takes_;
    return reinterpret_cast<void*>(pieces_.take());
  }

  void give(void* p, uint64_t len) override {
    std::lock_guard lock(mu_);
    bool empty = false;
    auto base = len == order_ ? pieces_.give(reinterpret_cast<uintptr_t>(p), empty) : std::nullopt;
    if (!base) {
      base::log().error("{}: give of {} bytes at {}: not a taken piece", name_, len, p);
      return;
    }
    live_ -= order_;
    if (empty) {
      pieces_.remove(*base);
      reserved_ -= parent_.order();
      parent_.give(reinterpret_cast<void*>(*base), parent_.order());
    }
  }

  SourceStats stats() const override {
    std::lock_guard lock(mu_);
    return SourceStats{live_, reserved_, takes_, failures_};
  }

 private:
  MemorySource& parent_;
  const uint64_t order_;
  const uint32_t pieces_per_parent_;
  const std::string name_;
  mutable std::mutex mu_;
  PieceMap pieces_;  // the parent chunks held, by base
  uint64_t live_ = 0, reserved_ = 0, takes_ = 0, failures_ = 0;
};

}  // namespace

Result<std::unique_ptr<MemorySource>> make_anon_source(uint64_t order, bool runs) {
  if (!pow2(order) || order < kPage4K)
    return fail(Errc::invalid_argument, "anonymous source: order {} is not a power of two >= 4K", order);
  return std::make_unique<AnonSource>(order, runs);
}

Result<std::unique_ptr<MemorySource>> make_hugepage_source(uint64_t page_size, uint32_t slab_pages) {
  if (page_size != kPage2M && page_size != kPage1G)
    return fail(Errc::invalid_argument, "hugepage source: page size {} is neither 2M nor 1G",
                size_name(page_size));
  if (slab_pages == 0 || slab_pages > 64)
    return fail(Errc::invalid_argument, "hugepage source: slab of {} pages is outside 1..64", slab_pages);
  const base::EalInfo* eal = base::eal_info();
  if (eal == nullptr) return fail(Errc::unsupported, "hugepage source: the EAL is not started");
  if (!eal->hugepages)
    return fail(Errc::unsupported, "hugepage source {}: the EAL runs without hugepages",
                size_name(page_size));
  return std::make_unique<HugepageSource>(page_size, slab_pages);
}

Result<std::unique_ptr<MemorySource>> make_carved_source(MemorySource& parent, uint64_t order) {
  if (!pow2(order) || order < kPage4K || order >= parent.order() || parent.order() / order > 4096)
    return fail(Errc::invalid_argument, "carved source: order {} cannot be split from {} chunks of {}",
                size_name(order), size_name(parent.order()), parent.name());
  return std::make_unique<CarvedSource>(parent, order);
}

bool eal_has_page_size(uint64_t page_size) {
  const base::EalInfo* eal = base::eal_info();
  if (eal == nullptr || !eal->hugepages) return false;
  uint64_t want = page_size;
  return rte_memseg_list_walk(
             [](const rte_memseg_list* msl, void* arg) {
               return msl->page_sz == *static_cast<uint64_t*>(arg) ? 1 : 0;
             },
             &want) == 1;
}

FaultSource::FaultSource(std::unique_ptr<MemorySource> inner)
    : inner_(std::move(inner)), name_(fmt::format("fault({})", inner_->name())) {}

Result<void*> FaultSource::take(uint64_t len) {
  attempts_.fetch_add(1, std::memory_order_relaxed);
  uint64_t b = budget_.load(std::memory_order_relaxed);
  while (b != kNever) {
    if (b == 0) {
      injected_.fetch_add(1, std::memory_order_relaxed);
      return fail(Errc::no_memory, "{}: injected failure", name_);
    }
    if (budget_.compare_exchange_weak(b, b - 1, std::memory_order_relaxed)) break;
  }
  return inner_->take(len);
}

}  // namespace dmakit::alloc_buffer
