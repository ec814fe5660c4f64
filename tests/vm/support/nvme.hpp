// A minimal NVMe driver for guest tests, built only on dmakit's VFIO layer.
//
// It exists to make a real device do DMA at IOVAs a test chose, so the test
// can check where bytes land (and where they must not). It polls, uses one
// admin queue pair and one I/O queue pair, 4 KiB memory pages and PRPs, and
// nothing else: no interrupts, no SGLs, no namespaces but NSID 1.
//
// Every piece of memory the controller touches (queues, data buffers, PRP
// lists) is given by the caller as host address + IOVA; the caller maps it
// through its Domain first. Every wait is bounded (CAP.TO for enable and
// disable, a fixed limit for commands) and a timeout is Errc::timeout with
// the controller's registers in the message, so a test never hangs.
//
// Tests of what a driver on the public API sees use examples/nvme instead;
// this one stays for tests that map memory through a raw VfioDomain at
// IOVAs they choose, below the public API.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "base/error.hpp"
#include "nvme/spec.hpp"
#include "iommu/vfio.hpp"

namespace dmakit::vmtest {

// Memory the controller reaches: where the CPU sees it and the IOVA the
// device uses. len is what the caller mapped.
struct DmaRef {
  void* host = nullptr;
  uint64_t iova = 0;
  size_t len = 0;
};

// One 64-byte submission queue entry (NVMe base spec, "Common Command Format").
struct NvmeCommand {
  uint8_t opcode = 0;
  uint32_t nsid = 0;
  uint64_t prp1 = 0;
  uint64_t prp2 = 0;
  uint32_t cdw10 = 0, cdw11 = 0, cdw12 = 0, cdw13 = 0, cdw14 = 0, cdw15 = 0;
};

// What the completion queue entry said.
struct NvmeCompletion {
  uint32_t dw0 = 0;      // command specific result
  uint16_t sq_head = 0;  // how far the controller consumed the SQ
  uint16_t cid = 0;      // the command it completes
  uint16_t status = 0;   // status field without the phase bit: SCT << 8 | SC (0 = success)

  bool ok() const { return status == 0; }
};

// Registers of a controller at one instant, for error messages and tests.
struct NvmeRegs {
  uint64_t cap = 0;
  uint32_t vs = 0, cc = 0, csts = 0, aqa = 0;
  uint64_t asq = 0, acq = 0;
  std::string str() const;
};

class NvmeController {
 public:
  static constexpr size_t kPageSize = 4096;      // MPS = 0: 4 KiB memory pages
  static constexpr size_t kSqEntrySize = 64;     // IOSQES = 6
  static constexpr size_t kCqEntrySize = 16;     // IOCQES = 4
  static constexpr uint16_t kIoQueueId = 1;
  static constexpr uint32_t kNsid = 1;
  static constexpr std::chrono::milliseconds kCommandTimeout{5000};

  // Takes the device, mmaps BAR0 and turns on memory space + bus mastering.
  // Does not touch the controller's registers beyond reading CAP and VS.
  static Result<NvmeController> attach(iommu::vfio::Device device);

  NvmeController(NvmeController&&) noexcept = default;
  NvmeController& operator=(NvmeController&&) noexcept = default;
  ~NvmeController() = default;

  const std::string& bdf() const { return device_.bdf(); }
  uint64_t cap() const { return cap_; }
  uint32_t version() const { return vs_; }
  NvmeRegs regs() const;

  // CC.EN = 0 and wait for CSTS.RDY = 0: the controller drops all queues and
  // stops touching host memory. Bounded by CAP.TO.
  Status disable();

  // Disables, points the admin queues at asq/acq (entries each, 2..4096,
  // each queue page aligned and large enough), enables with 4 KiB pages and
  // 64/16-byte queue entries, and waits for CSTS.RDY = 1 (bounded by CAP.TO).
  Status enable(DmaRef asq, DmaRef acq, uint16_t entries);

  // Identify (opcode 0x06) with CNS = 1: the 4 KiB controller data structure
  // lands at buffer_iova.
  Result<NvmeCompletion> identify_controller(uint64_t buffer_iova);

  // Create I/O Completion Queue then I/O Submission Queue (id 1), physically
  // contiguous, polled (no interrupt vector).
  Status create_io_queues(DmaRef sq, DmaRef cq, uint16_t entries);

  // Read (opcode 0x02) of `blocks` LBAs from NSID 1 into the IOVA-contiguous
  // range starting at data_iova, of which `bytes` are transferred (blocks x
  // LBA size). PRP1 is data_iova; a transfer that ends in the next page
  // uses PRP2 as that page; a longer one needs prp_list: the entries for
  // every page after the first are written there and PRP2 points to it.
  Result<NvmeCompletion> read(uint64_t lba, uint16_t blocks, uint64_t data_iova, size_t bytes,
                              std::optional<DmaRef> prp_list = std::nullopt);

  // Submits any command on the admin (qid 0) or I/O (qid 1) queue and polls
  // for its completion. The CID is assigned here.
  Result<NvmeCompletion> submit_admin(NvmeCommand cmd);
  Result<NvmeCompletion> submit_io(NvmeCommand cmd);

 private:
  // One submission/completion queue pair as the driver tracks it.
  struct QueuePair {
    uint16_t id = 0;
    uint16_t entries = 0;
    volatile uint8_t* sq = nullptr;  // host view of the SQ ring
    volatile uint8_t* cq = nullptr;  // host view of the CQ ring
    uint16_t sq_tail = 0;
    uint16_t cq_head = 0;
    uint32_t phase = 1;              // phase tag that marks a new CQ entry
    bool live = false;
  };

  NvmeController(iommu::vfio::Device device, iommu::vfio::BarMapping bar);

  size_t sq_doorbell(uint16_t qid) const;
  size_t cq_doorbell(uint16_t qid) const;
  Status wait_ready(bool ready);
  Result<NvmeCompletion> submit(QueuePair& q, NvmeCommand cmd);
  Result<NvmeCompletion> poll_completion(QueuePair& q, uint16_t cid);
  static Status check_queue_memory(const DmaRef& mem, size_t need, const char* what);

  iommu::vfio::Device device_;
  iommu::vfio::BarMapping bar_;
  uint64_t cap_ = 0;
  uint32_t vs_ = 0;
  uint32_t doorbell_stride_ = 4;  // bytes between doorbells: 4 << CAP.DSTRD
  std::chrono::milliseconds ready_timeout_{500};
  uint16_t next_cid_ = 0;
  QueuePair admin_;
  QueuePair io_;
};

// The NVMe register offsets in BAR0: the example driver's (its spec.hpp
// is the one statement of the specification in the tree).
namespace nvme_reg = ::nvme::spec;

// Queue memory for start_nvme: the admin pair, and the I/O pair when a test
// wants it created at once; entries per queue.
struct NvmeQueues {
  DmaRef asq, acq;
  std::optional<DmaRef> io_sq, io_cq;
  uint16_t entries = 16;
};

// The bring-up every guest test repeats: opens bdf's device in domain,
// attaches the controller, enables it on the admin queues and, if given,
// creates the I/O queue pair. The queue memory must be mapped already.
Result<NvmeController> start_nvme(iommu::vfio::VfioDomain& domain, std::string_view bdf, const NvmeQueues& q);

}  // namespace dmakit::vmtest
