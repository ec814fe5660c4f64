// MemorySource: where the BufferAllocator gets host memory, one order each.
//
// A source hands out chunks of exactly order() bytes, aligned to order()
// (so 2 MiB chunks can sit on 2 MiB IOVAs and the IOMMU can use large pages),
// or - when max_run() > order() - a virtually contiguous run of several
// chunks from one call, so one Domain::map covers it. take() is the only
// place memory is obtained; give() returns exactly what take() returned.
// Every source is thread-safe.
//
// The real sources:
//   HugepageSource  2 MiB (or 1 GiB) pages of EAL hugepage memory. Memory is
//                   reserved in slabs (rte_memzone, page-aligned, page-size
//                   strict) and pages are carved from them; a slab is released
//                   when all its pages are back. One slab per reservation
//                   because an aligned DPDK allocation of exactly one page
//                   costs two pages (the element header sits before it).
//   CarvedSource    1 MiB / 64 KiB pieces split from the pages of a parent
//                   source (the 2 MiB hugepage source); a parent page goes
//                   back to the parent when all its pieces are back.
//   AnonSource      ordinary anonymous memory, any multiple of its order in
//                   one run, committed inside address-space regions the
//                   source reserves for itself (never placed by mmap(NULL),
//                   where the EAL may map over it); VFIO pins it when it is
//                   mapped.
// (bench/fault_source.hpp adds a source that fails on command, for the
// benchmarks and the tests; the library never uses it.)
//
// Sources never free memory that is still taken: destroying a source with
// live chunks logs them and leaves the memory in place (a device may still
// reach it).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.hpp"

namespace dmakit::alloc_buffer {

inline constexpr uint64_t kPage4K = 4096;
inline constexpr uint64_t kPage2M = 2ull << 20;
inline constexpr uint64_t kPage1G = 1ull << 30;

struct SourceStats {
  uint64_t live_bytes = 0;      // taken and not given back
  uint64_t reserved_bytes = 0;  // held from the system (slabs, parent pages), >= live
  uint64_t takes = 0;           // successful take() calls
  uint64_t failures = 0;        // failed take() calls
};

struct AddressRange {
  uintptr_t base = 0;
  uint64_t len = 0;
};

class MemorySource {
 public:
  virtual ~MemorySource() = default;
  MemorySource() = default;
  MemorySource(const MemorySource&) = delete;
  MemorySource& operator=(const MemorySource&) = delete;

  virtual std::string_view name() const = 0;
  // Chunk size and alignment (power of two).
  virtual uint64_t order() const = 0;
  // Largest length one take() serves as one virtually contiguous run.
  virtual uint64_t max_run() const { return order(); }
  // Memory fresh from take() reads as zeros (anonymous pages do).
  virtual bool fresh_zero() const { return false; }
  // len: a multiple of order() and at most max_run(). Errc::no_memory when exhausted.
  virtual Result<void*> take(uint64_t len) = 0;
  // Returns memory from take(), same pointer and length.
  virtual void give(void* p, uint64_t len) = 0;
  virtual SourceStats stats() const = 0;
  // The address-space regions the source holds reserved for its pieces,
  // lowest first (anonymous memory); empty for sources that reserve none.
  virtual std::vector<AddressRange> regions() const { return {}; }
};

// Anonymous private memory. order >= 4 KiB; chunks are aligned to order.
// runs: serve any multiple of order as one virtually contiguous run.
Result<std::unique_ptr<MemorySource>> make_anon_source(uint64_t order, bool runs = true);


// EAL hugepage memory of page size page_size (2 MiB or 1 GiB), reserved in
// slabs of slab_pages pages (fewer when a slab cannot be had). Fails with
// Errc::unsupported when the EAL is not started or runs without hugepages.
Result<std::unique_ptr<MemorySource>> make_hugepage_source(uint64_t page_size, uint32_t slab_pages);

// Pieces of `order` bytes split from parent's chunks; parent must outlive it.
Result<std::unique_ptr<MemorySource>> make_carved_source(MemorySource& parent, uint64_t order);

// The EAL is started in hugepage mode and has memory lists of this page size.
bool eal_has_page_size(uint64_t page_size);

// The address ranges the EAL's memory lists reserve, lowest first; empty
// when the EAL is not started. The EAL maps pages (and, when a page cannot
// be had, PROT_NONE) with MAP_FIXED anywhere inside them.
std::vector<AddressRange> eal_memory_lists();

// Formats 4096 as "4K", 2097152 as "2M".
std::string size_name(uint64_t bytes);

}  // namespace dmakit::alloc_buffer
