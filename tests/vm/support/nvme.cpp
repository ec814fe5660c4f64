#include "nvme.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <utility>

namespace dmakit::vmtest {

namespace {

using Clock = std::chrono::steady_clock;

// CC fields (NVMe base spec, Controller Configuration).
constexpr uint32_t kCcEnable = 1u << 0;
constexpr uint32_t kCcCssNvm = 0u << 4;     // NVM command set
constexpr uint32_t kCcMps4k = 0u << 7;      // memory page size 2^(12 + 0)
constexpr uint32_t kCcAmsRr = 0u << 11;     // round-robin arbitration
constexpr uint32_t kCcIosqes = 6u << 16;    // SQ entry 2^6 = 64 bytes
constexpr uint32_t kCcIocqes = 4u << 20;    // CQ entry 2^4 = 16 bytes

// CSTS bits.
constexpr uint32_t kCstsReady = 1u << 0;
constexpr uint32_t kCstsFatal = 1u << 1;

// Admin and NVM opcodes used here.
constexpr uint8_t kOpCreateIoSq = 0x01;
constexpr uint8_t kOpCreateIoCq = 0x05;
constexpr uint8_t kOpIdentify = 0x06;
constexpr uint8_t kOpRead = 0x02;

constexpr uint32_t kCnsController = 1;
constexpr uint64_t kPageMask = NvmeController::kPageSize - 1;

uint64_t cap_field(uint64_t cap, unsigned shift, uint64_t mask) { return (cap >> shift) & mask; }

// Plain stores into the SQ ring; the ring is device-readable memory, so each
// dword goes out through a volatile pointer (no merging, no elision).
void store32(volatile uint8_t* base, size_t off, uint32_t v) {
  *reinterpret_cast<volatile uint32_t*>(base + off) = v;
}
uint32_t load32(const volatile uint8_t* base, size_t off) {
  return *reinterpret_cast<const volatile uint32_t*>(base + off);
}

}  // namespace

std::string NvmeRegs::str() const {
  return fmt::format("CAP={:#018x} VS={:#010x} CC={:#010x} CSTS={:#010x} AQA={:#010x} ASQ={:#x} ACQ={:#x}",
                     cap, vs, cc, csts, aqa, asq, acq);
}

NvmeController::NvmeController(iommu::vfio::Device device, iommu::vfio::BarMapping bar)
    : device_(std::move(device)), bar_(std::move(bar)) {}

Result<NvmeController> NvmeController::attach(iommu::vfio::Device device) {
  auto bar = device.map_bar(0);
  if (!bar) return std::unexpected(with_context(bar.error(), fmt::format("nvme {}: map BAR0", device.bdf())));
  if (bar->size() < nvme_reg::kDoorbells + 8)
    return fail(Errc::unsupported, "nvme {}: BAR0 is {} bytes, too small for the doorbells",
                device.bdf(), bar->size());
  // Without memory space decode the BAR reads as all ones; without bus
  // mastering the controller cannot fetch commands or write data.
  if (auto st = device.enable_bus_master(); !st)
    return std::unexpected(with_context(st.error(), fmt::format("nvme {}: enable bus master", device.bdf())));

  NvmeController c(std::move(device), std::move(*bar));
  c.cap_ = c.bar_.read64(nvme_reg::kCap);
  c.vs_ = c.bar_.read32(nvme_reg::kVs);
  if (c.cap_ == ~uint64_t{0})
    return fail(Errc::io, "nvme {}: CAP reads all ones (device not responding)", c.bdf());
  // CAP.DSTRD (bits 35:32): doorbell stride 4 << DSTRD bytes.
  c.doorbell_stride_ = 4u << cap_field(c.cap_, 32, 0xf);
  // CAP.TO (bits 31:24): worst-case ready transition time in 500 ms units.
  c.ready_timeout_ = std::chrono::milliseconds(500 * std::max<uint64_t>(1, cap_field(c.cap_, 24, 0xff)));
  // CAP.MPSMIN (bits 51:48): smallest memory page 2^(12 + MPSMIN); this driver uses 4 KiB.
  if (cap_field(c.cap_, 48, 0xf) != 0)
    return fail(Errc::unsupported, "nvme {}: controller does not support 4 KiB pages (CAP={:#x})",
                c.bdf(), c.cap_);
  // CAP.CSS bit 37: the NVM command set.
  if (cap_field(c.cap_, 37, 1) == 0)
    return fail(Errc::unsupported, "nvme {}: controller lacks the NVM command set (CAP={:#x})",
                c.bdf(), c.cap_);
  return c;
}

NvmeRegs NvmeController::regs() const {
  NvmeRegs r;
  r.cap = bar_.read64(nvme_reg::kCap);
  r.vs = bar_.read32(nvme_reg::kVs);
  r.cc = bar_.read32(nvme_reg::kCc);
  r.csts = bar_.read32(nvme_reg::kCsts);
  r.aqa = bar_.read32(nvme_reg::kAqa);
  r.asq = bar_.read64(nvme_reg::kAsq);
  r.acq = bar_.read64(nvme_reg::kAcq);
  return r;
}

size_t NvmeController::sq_doorbell(uint16_t qid) const {
  // SQ y tail doorbell: 0x1000 + (2y) * stride.
  return nvme_reg::kDoorbells + (2u * qid) * doorbell_stride_;
}

size_t NvmeController::cq_doorbell(uint16_t qid) const {
  // CQ y head doorbell: 0x1000 + (2y + 1) * stride.
  return nvme_reg::kDoorbells + (2u * qid + 1u) * doorbell_stride_;
}

Status NvmeController::wait_ready(bool ready) {
  const auto deadline = Clock::now() + ready_timeout_;
  for (;;) {
    const uint32_t csts = bar_.read32(nvme_reg::kCsts);
    if (csts == ~uint32_t{0}) return fail(Errc::io, "nvme {}: CSTS reads all ones", bdf());
    // A fatal status while enabling will never turn into ready.
    if (ready && (csts & kCstsFatal) != 0)
      return fail(Errc::io, "nvme {}: controller fatal status while enabling ({})", bdf(), regs().str());
    if (((csts & kCstsReady) != 0) == ready) return ok();
    if (Clock::now() > deadline)
      return fail(Errc::timeout, "nvme {}: CSTS.RDY did not become {} within {} ms (CAP.TO) ({})", bdf(),
                  ready ? 1 : 0, ready_timeout_.count(), regs().str());
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

Status NvmeController::disable() {
  // Clearing CC.EN resets the controller: queues are deleted and it stops DMA.
  const uint32_t cc = bar_.read32(nvme_reg::kCc);
  if ((cc & kCcEnable) != 0) bar_.write32(nvme_reg::kCc, cc & ~kCcEnable);
  admin_.live = false;
  io_.live = false;
  return wait_ready(false);
}

Status NvmeController::check_queue_memory(const DmaRef& mem, size_t need, const char* what) {
  if (mem.host == nullptr) return fail(Errc::invalid_argument, "nvme: {} has no host memory", what);
  // Queue base addresses must be memory-page aligned (PC = 1: one contiguous run).
  if ((mem.iova & kPageMask) != 0 || (reinterpret_cast<uintptr_t>(mem.host) & kPageMask) != 0)
    return fail(Errc::invalid_argument, "nvme: {} at iova {:#x} / host {} is not 4 KiB aligned", what,
                mem.iova, mem.host);
  if (mem.len < need)
    return fail(Errc::invalid_argument, "nvme: {} is {} bytes, needs {}", what, mem.len, need);
  return ok();
}

Status NvmeController::enable(DmaRef asq, DmaRef acq, uint16_t entries) {
  // AQA holds 0-based 12-bit sizes; a queue needs at least two entries.
  if (entries < 2 || entries > 4096)
    return fail(Errc::invalid_argument, "nvme {}: {} admin queue entries, want 2..4096", bdf(), entries);
  DMAKIT_TRY(check_queue_memory(asq, size_t{entries} * kSqEntrySize, "admin SQ"));
  DMAKIT_TRY(check_queue_memory(acq, size_t{entries} * kCqEntrySize, "admin CQ"));
  DMAKIT_TRY(disable());

  // A zeroed CQ has phase 0 everywhere, so the first pass's entries (phase 1) stand out.
  std::memset(acq.host, 0, size_t{entries} * kCqEntrySize);
  std::memset(asq.host, 0, size_t{entries} * kSqEntrySize);

  // AQA: ACQS in bits 27:16, ASQS in bits 11:0, both 0-based.
  const uint32_t size0 = entries - 1u;
  bar_.write32(nvme_reg::kAqa, (size0 << 16) | size0);
  // ASQ/ACQ: the IOVAs the controller fetches commands from and posts completions to.
  bar_.write64(nvme_reg::kAsq, asq.iova);
  bar_.write64(nvme_reg::kAcq, acq.iova);
  // Enable with the NVM command set, 4 KiB pages, round robin, 64/16-byte entries.
  bar_.write32(nvme_reg::kCc, kCcEnable | kCcCssNvm | kCcMps4k | kCcAmsRr | kCcIosqes | kCcIocqes);
  DMAKIT_TRY(wait_ready(true));

  admin_ = QueuePair{};
  admin_.id = 0;
  admin_.entries = entries;
  admin_.sq = static_cast<volatile uint8_t*>(asq.host);
  admin_.cq = static_cast<volatile uint8_t*>(acq.host);
  admin_.live = true;
  return ok();
}

Result<NvmeCompletion> NvmeController::submit(QueuePair& q, NvmeCommand cmd) {
  if (!q.live)
    return fail(Errc::invalid_argument, "nvme {}: queue {} is not set up", bdf(), q.id);
  const uint16_t cid = next_cid_++;
  volatile uint8_t* e = q.sq + size_t{q.sq_tail} * kSqEntrySize;
  // CDW0: opcode (7:0), FUSE = 0, PSDT = 0 (PRPs), CID (31:16).
  store32(e, 0, uint32_t{cmd.opcode} | (uint32_t{cid} << 16));
  store32(e, 4, cmd.nsid);
  for (size_t off = 8; off < 24; off += 4) store32(e, off, 0);  // CDW2-3 and MPTR unused
  store32(e, 24, static_cast<uint32_t>(cmd.prp1));
  store32(e, 28, static_cast<uint32_t>(cmd.prp1 >> 32));
  store32(e, 32, static_cast<uint32_t>(cmd.prp2));
  store32(e, 36, static_cast<uint32_t>(cmd.prp2 >> 32));
  store32(e, 40, cmd.cdw10);
  store32(e, 44, cmd.cdw11);
  store32(e, 48, cmd.cdw12);
  store32(e, 52, cmd.cdw13);
  store32(e, 56, cmd.cdw14);
  store32(e, 60, cmd.cdw15);
  q.sq_tail = static_cast<uint16_t>((q.sq_tail + 1u) % q.entries);
  // The entry must be in memory before the doorbell tells the device to fetch it.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  bar_.write32(sq_doorbell(q.id), q.sq_tail);
  return poll_completion(q, cid);
}

Result<NvmeCompletion> NvmeController::poll_completion(QueuePair& q, uint16_t cid) {
  const auto deadline = Clock::now() + kCommandTimeout;
  volatile uint8_t* e = q.cq + size_t{q.cq_head} * kCqEntrySize;
  for (;;) {
    // DW3: CID (15:0), phase tag (16), status (31:17). The device writes the
    // entry, so read it only through volatile loads.
    const uint32_t dw3 = load32(e, 12);
    if (((dw3 >> 16) & 1u) == q.phase) {
      std::atomic_thread_fence(std::memory_order_acquire);
      NvmeCompletion c;
      c.dw0 = load32(e, 0);
      const uint32_t dw2 = load32(e, 8);
      c.sq_head = static_cast<uint16_t>(dw2 & 0xffff);
      c.cid = static_cast<uint16_t>(dw3 & 0xffff);
      c.status = static_cast<uint16_t>(dw3 >> 17);
      q.cq_head = static_cast<uint16_t>((q.cq_head + 1u) % q.entries);
      if (q.cq_head == 0) q.phase ^= 1u;  // wrapped: new entries carry the other phase
      // Tell the controller this CQ slot is free again.
      bar_.write32(cq_doorbell(q.id), q.cq_head);
      if (c.cid != cid)
        return fail(Errc::io, "nvme {}: queue {} completed CID {} while waiting for CID {}", bdf(), q.id,
                    c.cid, cid);
      return c;
    }
    if (Clock::now() > deadline)
      return fail(Errc::timeout, "nvme {}: no completion for CID {} on queue {} within {} ms ({})", bdf(), cid,
                  q.id, kCommandTimeout.count(), regs().str());
    std::this_thread::yield();
  }
}

Result<NvmeCompletion> NvmeController::submit_admin(NvmeCommand cmd) { return submit(admin_, cmd); }

Result<NvmeCompletion> NvmeController::submit_io(NvmeCommand cmd) { return submit(io_, cmd); }

Result<NvmeCompletion> NvmeController::identify_controller(uint64_t buffer_iova) {
  NvmeCommand cmd;
  cmd.opcode = kOpIdentify;
  cmd.prp1 = buffer_iova;  // 4 KiB, page aligned: one PRP entry covers it
  cmd.cdw10 = kCnsController;
  return submit_admin(cmd);
}

Status NvmeController::create_io_queues(DmaRef sq, DmaRef cq, uint16_t entries) {
  // CAP.MQES (bits 15:0) is the largest queue, 0-based.
  const uint64_t mqes = cap_field(cap_, 0, 0xffff) + 1;
  if (entries < 2 || entries > mqes)
    return fail(Errc::invalid_argument, "nvme {}: {} I/O queue entries, controller allows 2..{}", bdf(),
                entries, mqes);
  DMAKIT_TRY(check_queue_memory(sq, size_t{entries} * kSqEntrySize, "I/O SQ"));
  DMAKIT_TRY(check_queue_memory(cq, size_t{entries} * kCqEntrySize, "I/O CQ"));
  std::memset(cq.host, 0, size_t{entries} * kCqEntrySize);
  std::memset(sq.host, 0, size_t{entries} * kSqEntrySize);

  const uint32_t size_qid = (uint32_t{entries - 1u} << 16) | kIoQueueId;
  // The CQ first: an SQ names the CQ its completions go to.
  NvmeCommand create_cq;
  create_cq.opcode = kOpCreateIoCq;
  create_cq.prp1 = cq.iova;
  create_cq.cdw10 = size_qid;
  create_cq.cdw11 = 1u;  // PC = 1 (contiguous), IEN = 0: polled
  auto c = DMAKIT_TRY(submit_admin(create_cq));
  if (!c.ok()) return fail(Errc::io, "nvme {}: Create I/O CQ failed, status {:#x}", bdf(), c.status);

  NvmeCommand create_sq;
  create_sq.opcode = kOpCreateIoSq;
  create_sq.prp1 = sq.iova;
  create_sq.cdw10 = size_qid;
  create_sq.cdw11 = (uint32_t{kIoQueueId} << 16) | 1u;  // CQID, PC = 1
  c = DMAKIT_TRY(submit_admin(create_sq));
  if (!c.ok()) return fail(Errc::io, "nvme {}: Create I/O SQ failed, status {:#x}", bdf(), c.status);

  io_ = QueuePair{};
  io_.id = kIoQueueId;
  io_.entries = entries;
  io_.sq = static_cast<volatile uint8_t*>(sq.host);
  io_.cq = static_cast<volatile uint8_t*>(cq.host);
  io_.live = true;
  return ok();
}

Result<NvmeCompletion> NvmeController::read(uint64_t lba, uint16_t blocks, uint64_t data_iova, size_t bytes,
                                            std::optional<DmaRef> prp_list) {
  if (blocks == 0) return fail(Errc::invalid_argument, "nvme {}: read of 0 blocks", bdf());
  if ((data_iova & 3) != 0)
    return fail(Errc::invalid_argument, "nvme {}: PRP1 {:#x} is not dword aligned", bdf(), data_iova);
  NvmeCommand cmd;
  cmd.opcode = kOpRead;
  cmd.nsid = kNsid;
  cmd.prp1 = data_iova;
  // PRP1 covers up to the end of its page; the rest is whole pages.
  const uint64_t first = kPageSize - (data_iova & kPageMask);
  const uint64_t rest = bytes > first ? bytes - first : 0;
  const uint64_t more_pages = (rest + kPageMask) / kPageSize;
  const uint64_t second_page = (data_iova & ~kPageMask) + kPageSize;
  if (more_pages == 1) {
    cmd.prp2 = second_page;
  } else if (more_pages > 1) {
    if (!prp_list)
      return fail(Errc::invalid_argument, "nvme {}: a {}-byte read at {:#x} needs a PRP list", bdf(), bytes,
                  data_iova);
    // One list page holds 512 entries; chaining lists is not needed for tests.
    if (more_pages * 8 > std::min<size_t>(prp_list->len, kPageSize) || (prp_list->iova & kPageMask) != 0)
      return fail(Errc::invalid_argument,
                  "nvme {}: PRP list at {:#x} ({} bytes) must be page aligned and hold {} entries in one page",
                  bdf(), prp_list->iova, prp_list->len, more_pages);
    auto* list = static_cast<volatile uint64_t*>(prp_list->host);
    for (uint64_t i = 0; i < more_pages; ++i) list[i] = second_page + i * kPageSize;
    cmd.prp2 = prp_list->iova;
  }
  cmd.cdw10 = static_cast<uint32_t>(lba);        // SLBA low
  cmd.cdw11 = static_cast<uint32_t>(lba >> 32);  // SLBA high
  cmd.cdw12 = blocks - 1u;                       // NLB, 0-based
  return submit_io(cmd);
}

Result<NvmeController> start_nvme(iommu::vfio::VfioDomain& domain, std::string_view bdf, const NvmeQueues& q) {
  auto dev = domain.open_device(bdf);
  if (!dev) return std::unexpected(std::move(dev).error());
  auto ctrl = NvmeController::attach(std::move(*dev));
  if (!ctrl) return ctrl;
  DMAKIT_TRY(ctrl->enable(q.asq, q.acq, q.entries));
  if (q.io_sq && q.io_cq) DMAKIT_TRY(ctrl->create_io_queues(*q.io_sq, *q.io_cq, q.entries));
  return ctrl;
}

}  // namespace dmakit::vmtest
