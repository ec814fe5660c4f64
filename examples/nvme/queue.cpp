// The fast path: one queue pair's submit, completion polling and waiting.
#include <atomic>
#include <cinttypes>
#include <cstring>
#include <thread>

#include "errors.hpp"
#include "nvme.hpp"
#include "prp.hpp"
#include "spec.hpp"

namespace nvme {

namespace {
// The controller writes completion entries at any time: read them through
// volatile loads so every check sees memory, not a cached value.
uint32_t load32(const std::byte* p) { return *reinterpret_cast<const volatile uint32_t*>(p); }
}  // namespace

Queue::~Queue() = default;

Result<uint16_t> Queue::submit(uint8_t opcode, uint32_t nsid, uint64_t lba, uint32_t blocks, const DataRef& data) {
  // NLB is a 0-based 16-bit count.
  if (blocks == 0 || blocks > 0x10000)
    return fail(Errc::invalid_argument, strf("nvme %s: %u blocks in one command, want 1..65536", bdf_.c_str(), blocks));
  RawCommand cmd;
  cmd.opcode = opcode;
  cmd.nsid = nsid;
  cmd.cdw10 = static_cast<uint32_t>(lba);
  cmd.cdw11 = static_cast<uint32_t>(lba >> 32);
  cmd.cdw12 = blocks - 1;
  return submit(cmd, data);
}

Result<uint16_t> Queue::submit(const RawCommand& cmd, const DataRef& data) {
  if (full())
    return fail(Errc::busy, strf("nvme %s: queue %u is full (%u commands in flight)", bdf_.c_str(), id_, in_flight_));
  const uint16_t cid = free_.back();
  Slot& slot = slots_[cid];
  spec::Sqe e;
  if (data.bytes != 0) {
    auto prp = build_prp(data, *prp_pool_, slot.prp_lists);
    if (!prp) return fail(prp.error(), strf("nvme %s: queue %u, opcode %#x", bdf_.c_str(), id_, cmd.opcode));
    e.prp1 = prp->prp1;
    e.prp2 = prp->prp2;
  } else {
    e.prp1 = cmd.prp1;
  }
  free_.pop_back();
  e.cdw0 = uint32_t{cmd.opcode} | (uint32_t{cid} << 16);
  e.nsid = cmd.nsid;
  e.cdw10 = cmd.cdw10;
  e.cdw11 = cmd.cdw11;
  e.cdw12 = cmd.cdw12;
  e.cdw13 = cmd.cdw13;
  e.cdw14 = cmd.cdw14;
  e.cdw15 = cmd.cdw15;
  std::memcpy(sq_ + size_t{sq_tail_} * spec::kSqeSize, &e, sizeof e);
  sq_tail_ = static_cast<uint16_t>((sq_tail_ + 1u) % entries_);
  slot.busy = true;
  slot.done = false;
  ++in_flight_;
  // The entry and its PRP list must be in memory before the doorbell tells
  // the controller to fetch them.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  bar_.write32(sq_doorbell_, sq_tail_);
  return cid;
}

uint32_t Queue::poll() {
  uint32_t n = 0;
  for (;;) {
    const std::byte* e = cq_ + size_t{cq_head_} * spec::kCqeSize;
    const uint32_t dw3 = load32(e + spec::kCqeDw3);
    if (((dw3 >> 16) & 1u) != phase_) break;  // not written in this pass yet
    std::atomic_thread_fence(std::memory_order_acquire);
    const auto cid = static_cast<uint16_t>(dw3 & 0xffff);
    const uint32_t result = load32(e + spec::kCqeDw0);
    if (++cq_head_ == entries_) {
      cq_head_ = 0;
      phase_ ^= 1u;
    }
    ++n;
    if (cid >= slots_.size() || !slots_[cid].busy || slots_[cid].done) continue;  // no command of ours
    Slot& s = slots_[cid];
    s.completion = Completion{cid, static_cast<uint16_t>(dw3 >> 17), result};
    s.done = true;
    // The controller is done with the PRP list pages.
    for (const auto& b : s.prp_lists) (void)prp_pool_->free(b);
    s.prp_lists.clear();
  }
  // Hand the consumed entries back to the controller.
  if (n != 0) bar_.write32(cq_doorbell_, cq_head_);
  return n;
}

Result<Completion> Queue::wait(uint16_t cid) {
  if (cid >= slots_.size() || !slots_[cid].busy)
    return fail(Errc::invalid_argument, strf("nvme %s: queue %u has no command with CID %u in flight", bdf_.c_str(),
                                             id_, cid));
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + timeout_;
  for (;;) {
    Slot& s = slots_[cid];
    if (s.done) {
      s.busy = s.done = false;
      free_.push_back(cid);
      --in_flight_;
      return s.completion;
    }
    if (poll() != 0) continue;
    const auto now = Clock::now();
    // A timed-out command keeps its slot and PRP pages: the controller may
    // still use them.
    if (now >= deadline) return std::unexpected(timeout_error(cid));
    if (vector_) {
      // The eventfd counts interrupts raised since the last wait, so one
      // that came after the poll above is not lost.
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - now).count();
      auto got = dev_->irq_wait(dmakit::IrqType::msix, *vector_, static_cast<int>(left));
      if (got)
        interrupts_ += *got;
      else if (got.error().code != Errc::timeout)
        return fail(got.error(), strf("nvme %s: queue %u: wait for MSI-X vector %u", bdf_.c_str(), id_, *vector_));
    } else {
      std::this_thread::yield();
    }
  }
}

Result<uint64_t> Queue::wait_interrupt(int timeout_ms) {
  if (!vector_)
    return fail(Errc::invalid_argument, strf("nvme %s: queue %u is polled, it has no interrupt", bdf_.c_str(), id_));
  auto got = dev_->irq_wait(dmakit::IrqType::msix, *vector_, timeout_ms);
  if (!got) return std::unexpected(got.error());
  interrupts_ += *got;
  return *got;
}

Error Queue::timeout_error(uint16_t cid) const {
  return Error{Errc::timeout, 0,
               strf("nvme %s: no completion for CID %u on queue %u within %lld ms (%s)", bdf_.c_str(), cid, id_,
                    static_cast<long long>(timeout_.count()), read_registers(bar_).str().c_str())};
}

}  // namespace nvme
