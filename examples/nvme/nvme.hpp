// dmakit_nvme: a small user-space NVMe driver on dmakit's public C++ API.
//
// A Controller is one NVMe function opened in a dmakit::Context: the
// context's IOMMU domain holds its queues, PRP lists and every data buffer,
// so several controllers of one context can move data to and from the same
// buffers. Open resets and enables the controller, identifies it and its
// namespace and creates the I/O queue pairs; close (or the destructor)
// deletes them and shuts the controller down (CC.SHN, CSTS.SHST).
//
// Memory: queues are dmakit buffers, PRP lists are blocks of a dmakit pool
// (4096-byte blocks, 4096 aligned), data is any memory the context maps,
// described by its segments (DataRef). Every wait is bounded; a timeout is
// Errc::timeout with the controller's registers in the message. Nothing
// throws. A Controller and its queues are used from one thread at a time;
// the Context must outlive them.
#pragma once

#include <dmakit/dmakit.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace nvme {

using dmakit::Errc;
using dmakit::Error;
using dmakit::Result;
using dmakit::Status;

// The controller registers at one moment, for error messages.
struct Registers {
  uint64_t cap = 0;
  uint32_t vs = 0, cc = 0, csts = 0, aqa = 0;
  uint64_t asq = 0, acq = 0;
  std::string str() const;
};
Registers read_registers(const dmakit::Bar& bar0);

// What Identify Controller said.
struct ControllerInfo {
  uint16_t vid = 0;
  uint16_t cntlid = 0;
  std::string serial, model, firmware;
  uint64_t max_transfer = 0;  // bytes per command (MDTS); 0 = no limit
  uint32_t namespaces = 0;
};

// What Identify Namespace said about the namespace in use.
struct NamespaceInfo {
  uint32_t nsid = 0;
  uint64_t blocks = 0;
  uint32_t block_size = 0;
  uint64_t bytes() const { return blocks * block_size; }
};

// How a queue learns that its commands completed.
enum class Completions { poll, msix };

struct Options {
  uint16_t io_queues = 1;       // I/O queue pairs, each with its own SQ and CQ
  uint16_t queue_entries = 64;  // per I/O queue, at most CAP.MQES
  Completions completions = Completions::poll;
  uint32_t nsid = 1;
  std::chrono::milliseconds command_timeout{5000};
};

// A finished command. status is the completion's status field: SC in bits
// 7:0, SCT in 10:8, CRD, More and DNR above (0 = success).
struct Completion {
  uint16_t cid = 0;
  uint16_t status = 0;
  uint32_t result = 0;  // command specific (DW0)
  bool ok() const { return status == 0; }
};

// The bytes [offset, offset + bytes) of DMA memory, given as the pieces that
// are contiguous in IOVA (dmakit::Buffer::segments(), or mapped_segments()
// for caller memory). Only the IOVAs are used: the driver never touches data.
struct DataRef {
  std::span<const dmakit_segment> segments;
  uint64_t offset = 0;
  uint64_t bytes = 0;
};

// The segments of caller memory the context maps (dmakit_mem_map), found
// with vtophys.
Result<std::vector<dmakit_segment>> mapped_segments(const dmakit::Context& ctx, const void* vaddr, uint64_t len);

// A command as the caller fills it (the submission queue entry without CID and PRPs).
struct RawCommand {
  uint8_t opcode = 0;
  uint32_t nsid = 0;
  uint64_t prp1 = 0;  // used as is when the command has no data (queue base addresses)
  uint32_t cdw10 = 0, cdw11 = 0, cdw12 = 0, cdw13 = 0, cdw14 = 0, cdw15 = 0;
};

// One submission/completion queue pair (the admin pair has id 0).
class Queue {
 public:
  Queue(const Queue&) = delete;
  Queue& operator=(const Queue&) = delete;
  ~Queue();

  uint16_t id() const { return id_; }
  // The MSI-X vector its completions raise; none when polled.
  std::optional<uint32_t> vector() const { return vector_; }
  uint32_t in_flight() const { return in_flight_; }
  bool full() const { return in_flight_ + 1u >= entries_; }
  // Interrupts consumed while waiting so far.
  uint64_t interrupts() const { return interrupts_; }

  // Queues an NVM Read or Write of blocks LBAs from lba of namespace nsid
  // and rings the doorbell; returns its CID for wait().
  Result<uint16_t> submit(uint8_t opcode, uint32_t nsid, uint64_t lba, uint32_t blocks, const DataRef& data);
  // Any command: the CID and the PRPs of data are filled in here.
  Result<uint16_t> submit(const RawCommand& cmd, const DataRef& data);

  // Takes every completion the controller posted; returns how many.
  uint32_t poll();
  // Waits for cid (polling, or sleeping on the MSI-X eventfd), bounded by
  // the command timeout, and releases it.
  Result<Completion> wait(uint16_t cid);
  // Sleeps up to timeout_ms for the queue's MSI-X vector; the interrupts
  // that came since the last wait. Errc::timeout when none came.
  Result<uint64_t> wait_interrupt(int timeout_ms);

 private:
  friend class Controller;
  struct Slot {
    bool busy = false, done = false;
    Completion completion;
    std::vector<dmakit::Block> prp_lists;  // returned to the pool at completion
  };

  Queue() = default;
  Error timeout_error(uint16_t cid) const;

  uint16_t id_ = 0;
  uint16_t entries_ = 0;
  std::optional<uint32_t> vector_;
  std::chrono::milliseconds timeout_{};
  dmakit::Buffer sq_mem_, cq_mem_;
  std::byte* sq_ = nullptr;
  const std::byte* cq_ = nullptr;
  uint16_t sq_tail_ = 0, cq_head_ = 0;
  uint8_t phase_ = 1;  // phase tag of new entries; flips at each wrap
  uint64_t sq_doorbell_ = 0, cq_doorbell_ = 0;
  uint32_t in_flight_ = 0;
  uint64_t interrupts_ = 0;
  std::vector<Slot> slots_;     // by CID
  std::vector<uint16_t> free_;  // free CIDs
  dmakit::Bar bar_;
  dmakit::Device* dev_ = nullptr;
  dmakit::Pool* prp_pool_ = nullptr;
  std::string bdf_;
};

class Controller {
 public:
  // Opens bdf in ctx (its IOMMU group is attached if it is not yet), resets
  // it, enables it and creates the I/O queues the options ask for.
  static Result<Controller> open(dmakit::Context& ctx, const std::string& bdf, const Options& options = {});

  Controller(Controller&&) noexcept;
  Controller& operator=(Controller&&) noexcept;
  ~Controller();  // close(), its result dropped

  // Deletes the I/O queues, then a normal shutdown: CC.SHN = 1 and a bounded
  // wait for CSTS.SHST = complete. The device closes with the Controller.
  Status close();

  const std::string& bdf() const;
  const ControllerInfo& info() const;
  const NamespaceInfo& ns() const;
  Registers registers() const;
  size_t queue_count() const;
  Queue& queue(size_t index);  // index < queue_count()
  Queue& admin();

  // Whole transfers on I/O queue q: split into commands of at most the
  // controller's transfer size, up to the queue's depth in flight, and
  // waited for. data.bytes must be blocks x the LBA size.
  Status read(size_t q, uint64_t lba, uint64_t blocks, const DataRef& data);
  Status write(size_t q, uint64_t lba, uint64_t blocks, const DataRef& data);
  Status flush(size_t q);

  // An admin command, waited for.
  Result<Completion> admin_command(const RawCommand& cmd, const DataRef& data = {});

 private:
  struct State;
  explicit Controller(std::unique_ptr<State> s);
  Status start();
  Status transfer(uint8_t opcode, size_t q, uint64_t lba, uint64_t blocks, const DataRef& data);
  std::unique_ptr<State> s_;
};

}  // namespace nvme
