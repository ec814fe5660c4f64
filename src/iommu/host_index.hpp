// HostIndex: which host memory is mapped at which IOVA, looked up by host
// address (what SPDK's vtophys answers). Every Domain backend records its
// successful map() and unmap() here, so any memory dmakit mapped - buffers,
// the chunks DMA pools carve, memory a caller registered - translates, and
// memory that is no longer mapped does not.
//
// Data structure: two ordered maps of the live mappings, one by host address
// and one by IOVA (unmap() names IOVA ranges), under one reader-writer lock;
// lookups take it shared. dmakit maps each host page at most once; VFIO
// itself allows aliases, and a mapping whose host range overlaps a recorded
// one is left out of the index (its host pages already translate).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <shared_mutex>


namespace dmakit::iommu {

struct HostRun {
  uint64_t iova = 0;  // IOVA of the looked-up address
  uint64_t len = 0;   // bytes from there to the end of its mapping (contiguous in VA and IOVA)
};

class HostIndex {
 public:
  enum class Added { yes, overlap, no_memory };
  // Records a mapping that map() is making: overlap (nothing recorded) when
  // its host range overlaps a recorded one; no_memory (nothing recorded)
  // when host memory for the record ran out - the backend then refuses the
  // map, so every mapping dmakit made translates.
  Added add(const void* vaddr, uint64_t iova, uint64_t len);
  // Forgets the record add() made at vaddr (a map the kernel then refused).
  void remove(const void* vaddr);
  // Forgets the mappings wholly inside [iova, iova + len), as unmap() removes them.
  void remove_inside(uint64_t iova, uint64_t len);
  std::optional<HostRun> lookup(const void* vaddr) const;

 private:
  struct ByHost {
    uint64_t iova, len;
  };
  struct ByIova {
    uintptr_t vaddr;
    uint64_t len;
  };
  mutable std::shared_mutex mu_;
  std::map<uintptr_t, ByHost> by_host_;
  std::map<uint64_t, ByIova> by_iova_;
};

}  // namespace dmakit::iommu
