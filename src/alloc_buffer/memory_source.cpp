#include "alloc_buffer/memory_source.hpp"

#include <rte_errno.h>
#include <rte_memory.h>
#include <rte_memzone.h>
#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <map>
#include <optional>
#include <mutex>
#include <set>
#include <vector>

#include "alloc_buffer/host_memory.hpp"
#include "base/eal.hpp"
#include "base/fault_inject.hpp"
#include "base/log.hpp"

namespace dmakit::alloc_buffer {

std::string size_name(uint64_t bytes) {
  if (bytes != 0 && bytes % kPage1G == 0) return fmt::format("{}G", bytes / kPage1G);
  if (bytes != 0 && bytes % (1ull << 20) == 0) return fmt::format("{}M", bytes >> 20);
  if (bytes != 0 && bytes % 1024 == 0) return fmt::format("{}K", bytes >> 10);
  return fmt::format("{}B", bytes);
}

namespace {

using base::fault::Point;

// The system call `call` (0 or -1 with errno), unless the test armed `point`:
// then -1 with the injected errno.
template <class Call>
int fault_or(Point point, Call&& call) {
  if (const int e = base::fault::inject(point)) {
    errno = e;
    return -1;
  }
  return call();
}

bool pow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// An EAL memory list: the address range it reserves and its page size.
struct EalList {
  uintptr_t base = 0;
  uint64_t len = 0;
  uint64_t page = 0;
};

// The EAL's memory lists, lowest first; none when the EAL is not started.
std::vector<EalList> eal_lists() {
  std::vector<EalList> out;
  if (base::eal_info() == nullptr) return out;
  out.reserve(RTE_MAX_MEMSEG_LISTS);  // the walk below must not allocate (it runs inside C code)
  rte_memseg_list_walk(
      [](const rte_memseg_list* msl, void* arg) {
        static_cast<std::vector<EalList>*>(arg)->push_back(
            EalList{reinterpret_cast<uintptr_t>(msl->base_va), msl->len, msl->page_sz});
        return 0;
      },
      &out);
  std::sort(out.begin(), out.end(), [](const EalList& a, const EalList& b) { return a.base < b.base; });
  return out;
}

// ---------------------------------------------------------------------------
// AnonSource: anonymous memory committed inside regions of address space the
// source reserves for itself.
//
// Why not one mmap(NULL) per take: when the EAL cannot get a hugepage (the
// hugetlb mmap fails, or the first touch raises SIGBUS), DPDK 22.11's
// alloc_seg() is left with a one-page hole in its memory list - the failed
// MAP_FIXED mmap, or its own munmap, removed the reservation there - and then
// maps PROT_NONE over the same address again with MAP_FIXED. An mmap(NULL)
// from another thread in between can be placed in that hole, and the EAL's
// MAP_FIXED replaces it without a word: a live buffer turns PROT_NONE (SEGV)
// under its owner. The kernel picks such a hole whenever the memory lists sit
// among the process's other mappings (when the EAL's 4 GiB hint is taken, as
// under ASan), and hugepage exhaustion opens one at every failed attempt.
//
// So regions are reserved PROT_NONE by mmap(NULL), each strictly larger than
// the largest page the EAL may use, so that none fits in such a hole; a
// region the kernel placed over the edge of a memory list anyway (a hole next
// to a free gap) is given up where it covers the list. take() makes a piece
// of a region read-write with mprotect, which never unmaps anything, so even
// a failed commit leaves no hole; give() maps fresh PROT_NONE over the piece
// with MAP_FIXED, which replaces the mapping in one step and returns the
// pages to the kernel (the next commit reads zeros). A piece is never
// unmapped. Reservations are not MAP_NORESERVE: PROT_NONE private memory is
// not charged, and a commit is charged (and refused under strict overcommit)
// as any writable private mapping.
//
// Data structure: regions by base address; in each, its free ranges by start
// (coalesced). take is first fit - lowest region, lowest address, start
// aligned for the run (run_align) - so consecutive takes of one size are
// consecutive in VA; the scan
// is linear in the free ranges, fine for the slow path. Taken runs by start,
// so give() accepts exactly what take() returned. One mutex.
//
// A region that becomes wholly free is released (munmap of all of it: no
// piece lives there, so nothing can be lost in the hole), except the last
// one left, which stays so that a take/give cycle does not reserve and
// release a region each time. stats().reserved_bytes counts committed bytes:
// a reservation holds no memory.
class AnonSource final : public MemorySource {
 public:
  // Regions are this large unless the kernel refuses (RLIMIT_AS) or the EAL
  // uses larger pages.
  static constexpr uint64_t kRegionBytes = kPage1G;

  AnonSource(uint64_t order, bool runs)
      : order_(order), runs_(runs), name_("anon-" + size_name(order)) {}

  ~AnonSource() override {
    std::lock_guard lock(mu_);
    if (live_ != 0)
      base::log().warn("{}: destroyed with {} bytes still taken; leaving their regions mapped", name_, live_);
    for (const auto& [base, r] : regions_)
      if (r.used == 0) ::munmap(reinterpret_cast<void*>(base), r.len);
  }

  std::string_view name() const override { return name_; }
  uint64_t order() const override { return order_; }
  uint64_t max_run() const override { return runs_ ? (~0ull >> 1) & ~(order_ - 1) : order_; }
  bool fresh_zero() const override { return true; }

  Result<void*> take(uint64_t len) override {
    std::lock_guard lock(mu_);
    // Everything take_locked allocates comes before it commits memory (the
    // map nodes it needs afterwards are made up front), so out of host
    // memory nothing is committed or recorded.
    try {
      return take_locked(len);
    } catch (const std::bad_alloc&) {
      ++failures_;
      return fail(Errc::no_memory, "{}: out of host memory for the records of a take of {} bytes", name_, len);
    }
  }

  Result<void*> take_locked(uint64_t len) {
    if (len == 0 || len % order_ != 0 || len > max_run()) {
      ++failures_;
      return fail(Errc::invalid_argument, "{}: take of {} bytes is not a multiple of {} within one run",
                  name_, len, size_name(order_));
    }
    uintptr_t region = 0, at = 0;
    for (const auto& [base, r] : regions_) {
      if ((at = fit(r, len)) != 0) {
        region = base;
        break;
      }
    }
    if (at == 0) {
      auto fresh = reserve_region(len + run_align(len) - kPage4K);  // room to align the start
      if (!fresh) {
        ++failures_;
        return std::unexpected(std::move(fresh).error());
      }
      region = *fresh;
      at = fit(regions_.at(region), len);
      if (at == 0) {  // the region was sized for this take
        ++failures_;
        return fail(Errc::internal, "{}: a new region at {:#x} has no room for {}", name_, region, size_name(len));
      }
    }
    Region& r = regions_.at(region);
    void* p = reinterpret_cast<void*>(at);
    Node spare_free = spare_node(), taken_node = spare_node();
    // Committed pages the host cannot back end in the OOM killer at first
    // touch; refuse them now instead.
    if (auto st = HostMemoryGuard::process().admit(len, name_); !st) {
      ++failures_;
      release_if_idle(region);
      return std::unexpected(std::move(st).error());
    }
    if (fault_or(Point::anon_commit_mprotect, [&] { return ::mprotect(p, len, PROT_READ | PROT_WRITE); }) != 0) {
      HostMemoryGuard::process().give_back(len);
      const int err = errno;
      ++failures_;
      // mprotect may have changed part of the range; put all of it back to
      // a fresh reservation (best effort: it is not handed out either way).
      ::mmap(p, len, PROT_NONE, kReserveFlags | MAP_FIXED, -1, 0);
      release_if_idle(region);
      return fail_errno(err, "{}: committing {} at {}", name_, size_name(len), p);
    }
    // Pinned DMA memory must stay the parent's across fork(): a private page
    // shared copy-on-write with a child is replaced by a copy at the parent's
    // next write, while the device keeps the old one. The child does not get
    // the piece at all (as DPDK and SPDK do for theirs).
    if (fault_or(Point::anon_madvise_dontfork, [&] { return ::madvise(p, len, MADV_DONTFORK); }) != 0) {
      const int err = errno;
      HostMemoryGuard::process().give_back(len);
      ++failures_;
      ::mmap(p, len, PROT_NONE, kReserveFlags | MAP_FIXED, -1, 0);
      release_if_idle(region);
      return fail_errno(err, "{}: madvise(MADV_DONTFORK) of {} at {}", name_, size_name(len), p);
    }
    // The pages are faulted in now, so what the guard admitted shows in the
    // host's MemAvailable at its next reading (an untouched commit would be
    // counted twice as free), and a shortfall is an error here rather than
    // a kill at first touch. Kernels before 5.14 lack it (EINVAL): the
    // pages then come at first touch, as before.
    if (fault_or(Point::anon_madvise_populate, [&] { return ::madvise(p, len, MADV_POPULATE_WRITE); }) != 0 &&
        errno != EINVAL) {
      const int err = errno;
      HostMemoryGuard::process().give_back(len);
      ++failures_;
      ::mmap(p, len, PROT_NONE, kReserveFlags | MAP_FIXED, -1, 0);
      release_if_idle(region);
      return fail(Errc::no_memory, "{}: populating {} at {}: {}", name_, size_name(len), p, std::strerror(err));
    }
    carve(r, at, len, std::move(spare_free));
    taken_node.key() = at;
    taken_node.mapped() = len;
    taken_.insert(std::move(taken_node));
    live_ += len;
    ++takes_;
    return p;
  }

  void give(void* p, uint64_t len) override {
    std::lock_guard lock(mu_);
    const auto at = reinterpret_cast<uintptr_t>(p);
    auto t = taken_.find(at);
    if (t == taken_.end() || t->second != len) {
      base::log().error("{}: give of {} bytes at {}: not a run it handed out", name_, len, p);
      return;
    }
    // Fresh PROT_NONE over the piece in one step: its pages go back to the
    // kernel and its addresses stay reserved.
    if (fault_or(Point::anon_release_mmap,
                 [&] { return ::mmap(p, len, PROT_NONE, kReserveFlags | MAP_FIXED, -1, 0) == MAP_FAILED ? -1 : 0; }) !=
        0) {
      base::log().error("{}: give of {} at {}: mapping PROT_NONE over it failed: {}; it stays committed", name_,
                        size_name(len), p, std::strerror(errno));
      return;
    }
    Node node = taken_.extract(t);  // reused by unmark: a give never allocates
    HostMemoryGuard::process().give_back(len);
    auto region = std::prev(regions_.upper_bound(at));
    unmark(region->second, at, len, std::move(node));
    live_ -= len;
    release_if_idle(region->first);
  }

  SourceStats stats() const override {
    std::lock_guard lock(mu_);
    return SourceStats{live_, live_, takes_, failures_};
  }

  std::vector<AddressRange> regions() const override {
    std::lock_guard lock(mu_);
    std::vector<AddressRange> out;
    for (const auto& [base, r] : regions_) out.push_back({base, r.len});
    return out;
  }

 private:
  static constexpr int kReserveFlags = MAP_PRIVATE | MAP_ANONYMOUS;

  using RangeMap = std::map<uintptr_t, uint64_t>;
  using Node = RangeMap::node_type;
  struct Region {
    uint64_t len = 0;
    uint64_t used = 0;  // bytes taken
    RangeMap free;      // start -> end of each free range, coalesced
  };

  // A detached map node, so that a later insert allocates nothing.
  static Node spare_node() {
    RangeMap m;
    m.emplace(0, 0);
    return m.extract(m.begin());
  }

  // Where a run of len bytes starts: on a multiple of its largest power of
  // two up to 2 MiB (at least the order). A buffer's IOVA is aligned the same
  // way, so host address and IOVA agree modulo every alignment up to there
  // (what a DMA pool of aligned blocks needs from a chunk); the cost is
  // address space between runs, never memory.
  uint64_t run_align(uint64_t len) const { return std::max(order_, std::min(std::bit_floor(len), kPage2M)); }

  // First fit inside r: the lowest start aligned for a run of len with len
  // free bytes behind it, or 0.
  uintptr_t fit(const Region& r, uint64_t len) const {
    const uint64_t align = run_align(len);
    for (const auto& [start, end] : r.free) {
      const uintptr_t at = (start + align - 1) & ~(align - 1);
      if (at < end && end - at >= len) return at;
    }
    return 0;
  }

  // [at, at + len), inside one free range of r, becomes taken.
  // Allocates nothing: the range's own node and `spare` hold the remainders.
  static void carve(Region& r, uintptr_t at, uint64_t len, Node spare) {
    auto it = std::prev(r.free.upper_bound(at));
    const uintptr_t start = it->first, end = it->second;
    Node own = r.free.extract(it);
    if (start < at) {
      own.key() = start;
      own.mapped() = at;
      r.free.insert(std::move(own));
    }
    if (at + len < end) {
      Node& n = own.empty() ? spare : own;
      n.key() = at + len;
      n.mapped() = end;
      r.free.insert(std::move(n));
    }
    r.used += len;
  }

  // [at, at + len) becomes free again, merged with free neighbours.
  // Allocates nothing: the merged range goes into `node`.
  static void unmark(Region& r, uintptr_t at, uint64_t len, Node node) {
    uintptr_t start = at, end = at + len;
    auto next = r.free.lower_bound(end);
    if (next != r.free.end() && next->first == end) {
      end = next->second;
      next = r.free.erase(next);
    }
    if (next != r.free.begin()) {
      if (auto prev = std::prev(next); prev->second == start) {
        start = prev->first;
        r.free.erase(prev);
      }
    }
    node.key() = start;
    node.mapped() = end;
    r.free.insert(std::move(node));
    r.used -= len;
  }

  // A wholly free region goes back to the kernel unless it is the last one.
  void release_if_idle(uintptr_t base) {
    auto it = regions_.find(base);
    if (it == regions_.end() || it->second.used != 0 || regions_.size() == 1) return;
    ::munmap(reinterpret_cast<void*>(base), it->second.len);
    regions_.erase(it);
  }

  // Slow path: a new region of at least `need` bytes. The preferred size
  // first, halved when the kernel refuses (RLIMIT_AS), but never down to the
  // largest EAL page: a region must not fit in a hole of one page.
  Result<uintptr_t> reserve_region(uint64_t need) {
    const std::vector<EalList> lists = eal_lists();
    uint64_t eal_page = kPage2M;  // the EAL may start later: assume 2 MiB pages at least
    for (const EalList& l : lists) eal_page = std::max(eal_page, l.page);
    const uint64_t smallest = std::max(need, eal_page + kPage4K);
    uint64_t size = std::max({kRegionBytes, 2 * eal_page, round_up(need, kRegionBytes)});
    int err = 0;
    for (int over_eal = 0;;) {
      void* p = MAP_FAILED;
      if (const int e = base::fault::inject(Point::anon_reserve_mmap))
        errno = e;
      else
        p = ::mmap(nullptr, size, PROT_NONE, kReserveFlags, -1, 0);
      if (p != MAP_FAILED) {
        const auto base = reinterpret_cast<uintptr_t>(p);
        if (!give_up_eal_parts(base, size, lists)) {
          try {
            Region r;
            r.len = size;
            r.free.emplace(base, base + size);
            regions_.emplace(base, std::move(r));
          } catch (const std::bad_alloc&) {
            ::munmap(p, size);
            throw;  // to take(), which refuses the request
          }
          return base;
        }
        if (++over_eal < 4) continue;
        return fail(Errc::no_memory, "{}: {} regions of {} in a row were placed over EAL memory lists", name_,
                    over_eal, size_name(size));
      }
      err = errno;
      if (size <= smallest) break;
      size = std::max(smallest, (size / 2) & ~(kPage4K - 1));
    }
    return fail_errno(err, "{}: reserving {} of address space (down from {})", name_, size_name(size),
                      size_name(std::max({kRegionBytes, 2 * eal_page, round_up(need, kRegionBytes)})));
  }

  // A region the kernel placed in an EAL hole at the edge of a memory list
  // overlaps the list: the EAL maps over that part at any time. Unmaps the
  // rest and leaves that part to the EAL; false when there is no overlap.
  bool give_up_eal_parts(uintptr_t base, uint64_t len, const std::vector<EalList>& lists) {
    const uintptr_t end = base + len;
    uintptr_t cursor = base;
    bool overlap = false;
    for (const EalList& l : lists) {
      const uintptr_t lo = std::max(base, l.base), hi = std::min(end, l.base + l.len);
      if (lo >= hi) continue;
      base::log().warn("{}: region {:#x}+{} overlaps the EAL memory list at {:#x} by {}; leaving that part to the EAL",
                       name_, base, size_name(len), l.base, size_name(hi - lo));
      overlap = true;
      if (cursor < lo) ::munmap(reinterpret_cast<void*>(cursor), lo - cursor);
      cursor = hi;
    }
    if (overlap && cursor < end) ::munmap(reinterpret_cast<void*>(cursor), end - cursor);
    return overlap;
  }

  const uint64_t order_;
  const bool runs_;
  const std::string name_;
  mutable std::mutex mu_;
  std::map<uintptr_t, Region> regions_;  // by base
  RangeMap taken_;  // start -> length of each run handed out
  uint64_t live_ = 0, takes_ = 0, failures_ = 0;
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
      const rte_memzone* mz = nullptr;
      if (const int e = base::fault::inject(Point::hugepage_memzone))
        rte_errno = e;
      else
        mz = rte_memzone_reserve_aligned(zname.c_str(), n * page_, SOCKET_ID_ANY, flag, static_cast<unsigned>(page_));
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

std::vector<AddressRange> eal_memory_lists() {
  std::vector<AddressRange> out;
  for (const EalList& l : eal_lists()) out.push_back({l.base, l.len});
  return out;
}

}  // namespace dmakit::alloc_buffer
