// Fault injection at the library's external calls, for tests.
//
// Each place where dmakit asks the kernel or DPDK for something (an ioctl of
// the simulated backend, mmap, madvise, mprotect, eventfd, a memzone) is a
// named Point and asks inject(point) first: 0 means go on, anything else is
// the errno the call is to fail with, as the real call would. A test arms a
// point with fault::Arm (the nth call from now fails with errno E, for
// `times` calls). All of these are slow paths; disarmed, inject() costs one
// relaxed load of a flag that is false in production (predicted).
#pragma once

#include <atomic>
#include <cstdint>
#include <string_view>

namespace dmakit::base::fault {

enum class Point : uint32_t {
  sim_map,                // SimDomain::map, VFIO_IOMMU_MAP_DMA's model
  sim_unmap,              // SimDomain::unmap, VFIO_IOMMU_UNMAP_DMA's model
  anon_reserve_mmap,      // mmap(PROT_NONE) reserving an anonymous region
  anon_commit_mprotect,   // mprotect(PROT_READ|PROT_WRITE) committing anonymous memory
  anon_madvise_dontfork,  // madvise(MADV_DONTFORK) of committed memory
  anon_madvise_populate,  // madvise(MADV_POPULATE_WRITE) faulting it in
  anon_release_mmap,      // mmap(PROT_NONE, MAP_FIXED) giving committed memory back
  hugepage_memzone,       // rte_memzone_reserve_aligned for hugepage chunks
  eal_init,               // rte_eal_init
  allocator_eventfd,      // eventfd waking the buffer allocator's pressure thread
  device_eventfd,         // eventfd of an interrupt vector (core::Device)
  count
};

std::string_view name(Point p);

namespace detail {
extern std::atomic<bool> g_armed;
int fire(Point p);
}  // namespace detail

// 0, or the errno with which this call of `p` must fail.
inline int inject(Point p) {
  if (!detail::g_armed.load(std::memory_order_relaxed)) [[likely]] return 0;
  return detail::fire(p);
}

// While it lives, calls of `point` are counted from 0, and calls nth ..
// nth + times - 1 fail with `err`. One Arm per point at a time.
class Arm {
 public:
  static constexpr uint64_t kAlways = ~0ull;
  Arm(Point point, uint64_t nth, int err, uint64_t times = 1);
  ~Arm();
  Arm(const Arm&) = delete;
  Arm& operator=(const Arm&) = delete;

  uint64_t calls() const;  // calls of the point since armed
  uint64_t fired() const;  // of which failed
 private:
  Point point_;
};

}  // namespace dmakit::base::fault
