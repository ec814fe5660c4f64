// Controller bring-up, admin commands, whole transfers and shutdown.
#include <algorithm>
#include <cinttypes>
#include <cstring>
#include <thread>
#include <utility>

#include "errors.hpp"
#include "nvme.hpp"
#include "spec.hpp"

namespace nvme {

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr uint16_t kAdminEntries = 32;

template <class T>
T field(const std::byte* base, size_t off) {
  T v{};
  std::memcpy(&v, base + off, sizeof v);
  return v;
}

// A space padded ASCII field of Identify data, without the padding.
std::string ascii(const std::byte* base, size_t off, size_t len) {
  std::string s(reinterpret_cast<const char*>(base + off), len);
  s.erase(s.find_last_not_of(" \0", std::string::npos, 2) + 1);
  return s;
}

const char* opcode_name(uint8_t op) {
  switch (op) {
    case spec::kRead: return "Read";
    case spec::kWrite: return "Write";
    case spec::kFlush: return "Flush";
  }
  return "command";
}

}  // namespace

std::string Registers::str() const {
  return strf("CAP=%#018" PRIx64 " VS=%#010x CC=%#010x CSTS=%#010x AQA=%#010x ASQ=%#" PRIx64 " ACQ=%#" PRIx64, cap,
              vs, cc, csts, aqa, asq, acq);
}

Registers read_registers(const dmakit::Bar& bar0) {
  Registers r;
  r.cap = bar0.read64(spec::kCap);
  r.vs = bar0.read32(spec::kVs);
  r.cc = bar0.read32(spec::kCc);
  r.csts = bar0.read32(spec::kCsts);
  r.aqa = bar0.read32(spec::kAqa);
  r.asq = bar0.read64(spec::kAsq);
  r.acq = bar0.read64(spec::kAcq);
  return r;
}

Result<std::vector<dmakit_segment>> mapped_segments(const dmakit::Context& ctx, const void* vaddr, uint64_t len) {
  std::vector<dmakit_segment> segs;
  const auto* p = static_cast<const std::byte*>(vaddr);
  for (uint64_t done = 0; done < len;) {
    auto t = ctx.vtophys(p + done);
    if (!t) return fail(t.error(), strf("byte %" PRIu64 " of %p (+%" PRIu64 ")", done, vaddr, len));
    const uint64_t n = std::min(t->len, len - done);
    auto* host = const_cast<std::byte*>(p + done);  // dmakit_segment names writable memory
    if (!segs.empty() && segs.back().iova + segs.back().len == t->iova &&
        static_cast<std::byte*>(segs.back().vaddr) + segs.back().len == host)
      segs.back().len += n;
    else
      segs.push_back(dmakit_segment{host, t->iova, n});
    done += n;
  }
  return segs;
}

struct Controller::State {
  std::string bdf;
  Options opt;
  uint64_t cap = 0;
  milliseconds ready_timeout{500};  // CAP.TO
  milliseconds shutdown_timeout{500};
  ControllerInfo info;
  NamespaceInfo ns;
  bool enabled = false;  // CC.EN set here and not shut down since
  bool msix = false;
  dmakit::Context* ctx = nullptr;
  dmakit::Pool prp_pool;
  std::unique_ptr<Queue> admin;
  std::vector<std::unique_ptr<Queue>> io;
  dmakit::Bar bar;
  // Last, so destroyed first: interrupts and bus mastering are off before
  // any queue or PRP memory is freed.
  dmakit::Device dev;

  Registers regs() const { return read_registers(bar); }

  // Bounded wait until CSTS & mask == want.
  Status wait_csts(uint32_t mask, uint32_t want, milliseconds limit, const char* what) const {
    const auto deadline = Clock::now() + limit;
    for (;;) {
      const uint32_t csts = bar.read32(spec::kCsts);
      if (csts == ~0u) return fail(Errc::io, strf("nvme %s: CSTS reads all ones (device gone?)", bdf.c_str()));
      if ((csts & mask) == want) return {};
      // A fatal status never turns into ready.
      if ((want & spec::kCstsReady) != 0 && (csts & spec::kCstsFatal) != 0)
        return fail(Errc::io, strf("nvme %s: controller fatal status while %s (%s)", bdf.c_str(), what,
                                   regs().str().c_str()));
      if (Clock::now() > deadline)
        return fail(Errc::timeout, strf("nvme %s: %s: not done within %lld ms (%s)", bdf.c_str(), what,
                                        static_cast<long long>(limit.count()), regs().str().c_str()));
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }

  // CC.EN = 0 resets the controller: queues gone, no more DMA.
  Status disable() {
    const uint32_t cc = bar.read32(spec::kCc);
    if ((cc & spec::kCcEnable) != 0) bar.write32(spec::kCc, cc & ~spec::kCcEnable);
    return wait_csts(spec::kCstsReady, 0, ready_timeout, "disable (CSTS.RDY = 0)");
  }

  // A queue pair's rings: zeroed buffers, page aligned, each one host run
  // (the driver writes entries through one pointer).
  Result<std::unique_ptr<Queue>> make_queue(uint16_t id, uint16_t entries, std::optional<uint32_t> vector) {
    std::unique_ptr<Queue> q(new Queue());
    const uint64_t sizes[2] = {uint64_t{entries} * spec::kSqeSize, uint64_t{entries} * spec::kCqeSize};
    dmakit::Buffer* mem[2] = {&q->sq_mem_, &q->cq_mem_};
    for (int i = 0; i < 2; ++i) {
      const uint64_t len = (sizes[i] + spec::kPage - 1) & ~(spec::kPage - 1);
      auto b = ctx->alloc_buffer(len, {.align = spec::kPage, .zeroed = true});
      if (!b) return fail(b.error(), strf("nvme %s: queue %u ring of %" PRIu64 " bytes", bdf.c_str(), id, len));
      auto segs = b->segments();
      if (!segs) return fail(segs.error(), strf("nvme %s: queue %u ring segments", bdf.c_str(), id));
      if (segs->size() != 1)
        return fail(Errc::unsupported, strf("nvme %s: queue %u ring of %" PRIu64 " bytes is %zu host runs, want one",
                                            bdf.c_str(), id, len, segs->size()));
      *mem[i] = std::move(*b);
    }
    q->id_ = id;
    q->entries_ = entries;
    q->vector_ = vector;
    q->timeout_ = opt.command_timeout;
    q->sq_ = static_cast<std::byte*>(q->sq_mem_.vaddr());
    q->cq_ = static_cast<const std::byte*>(q->cq_mem_.vaddr());
    // Doorbells: SQ y tail at 0x1000 + 2y * stride, CQ y head one stride later.
    const uint32_t stride = spec::cap_doorbell_stride(cap);
    q->sq_doorbell_ = spec::kDoorbells + 2u * id * stride;
    q->cq_doorbell_ = q->sq_doorbell_ + stride;
    q->slots_.resize(entries);
    for (uint16_t cid = entries; cid > 0; --cid) q->free_.push_back(static_cast<uint16_t>(cid - 1));
    q->bar_ = bar;
    q->dev_ = &dev;
    q->prp_pool_ = &prp_pool;
    q->bdf_ = bdf;
    return q;
  }

  Result<Completion> admin_command(const RawCommand& cmd, const DataRef& data) {
    auto cid = admin->submit(cmd, data);
    if (!cid) return std::unexpected(cid.error());
    return admin->wait(*cid);
  }

  // An admin command that must succeed; what names it in the error.
  Result<Completion> admin_ok(const RawCommand& cmd, const DataRef& data, const char* what) {
    auto c = admin_command(cmd, data);
    if (!c) return fail(c.error(), strf("nvme %s: %s", bdf.c_str(), what));
    if (!c->ok()) return fail(Errc::io, strf("nvme %s: %s failed, status %#x", bdf.c_str(), what, c->status));
    return c;
  }
};

Controller::Controller(std::unique_ptr<State> s) : s_(std::move(s)) {}
Controller::Controller(Controller&&) noexcept = default;
Controller& Controller::operator=(Controller&& o) noexcept {
  if (this != &o) {
    (void)close();
    s_ = std::move(o.s_);
  }
  return *this;
}
Controller::~Controller() { (void)close(); }

const std::string& Controller::bdf() const { return s_->bdf; }
const ControllerInfo& Controller::info() const { return s_->info; }
const NamespaceInfo& Controller::ns() const { return s_->ns; }
Registers Controller::registers() const { return s_->regs(); }
size_t Controller::queue_count() const { return s_->io.size(); }
Queue& Controller::queue(size_t index) { return *s_->io[index]; }
Queue& Controller::admin() { return *s_->admin; }

Result<Controller> Controller::open(dmakit::Context& ctx, const std::string& bdf, const Options& opt) {
  if (opt.io_queues == 0)
    return fail(Errc::invalid_argument, strf("nvme %s: Options.io_queues is 0, want at least 1", bdf.c_str()));
  if (opt.queue_entries < 2)
    return fail(Errc::invalid_argument, strf("nvme %s: Options.queue_entries %u, want at least 2", bdf.c_str(),
                                             opt.queue_entries));
  if (opt.nsid == 0 || opt.nsid == ~0u)
    return fail(Errc::invalid_argument, strf("nvme %s: Options.nsid %#x is not a namespace", bdf.c_str(), opt.nsid));
  auto s = std::make_unique<State>();
  s->bdf = bdf;
  s->opt = opt;
  s->ctx = &ctx;
  auto dev = ctx.open_device(bdf);
  if (!dev) return fail(dev.error(), strf("nvme %s: open", bdf.c_str()));
  s->dev = std::move(*dev);
  Controller c(std::move(s));
  if (auto st = c.start(); !st) return std::unexpected(st.error());
  return c;
}

Status Controller::start() {
  State& s = *s_;
  const char* bdf = s.bdf.c_str();
  // A function reset first: an earlier user may have left the controller
  // enabled, with queues at IOVAs that mean something else now.
  if (auto st = s.dev.reset(); !st && st.error().code != Errc::unsupported)
    return fail(st.error(), strf("nvme %s: function reset", bdf));
  // Memory decoding before the first BAR access, bus mastering for DMA.
  if (auto st = s.dev.set_bus_master(true); !st) return fail(st.error(), strf("nvme %s: bus master", bdf));
  auto bar = s.dev.map_bar(0);
  if (!bar) return fail(bar.error(), strf("nvme %s: map BAR0", bdf));
  s.bar = *bar;
  if (s.bar.size() < spec::kDoorbells)
    return fail(Errc::unsupported, strf("nvme %s: BAR0 is %" PRIu64 " bytes, too small for the registers", bdf,
                                        s.bar.size()));
  s.cap = s.bar.read64(spec::kCap);
  if (s.cap == ~uint64_t{0}) return fail(Errc::io, strf("nvme %s: CAP reads all ones (device not responding)", bdf));
  // Doorbells of the admin and every I/O queue pair.
  const uint64_t doorbells = 2u * (s.opt.io_queues + 1u) * uint64_t{spec::cap_doorbell_stride(s.cap)};
  if (s.bar.size() < spec::kDoorbells + doorbells)
    return fail(Errc::unsupported, strf("nvme %s: BAR0 is %" PRIu64 " bytes, too small for %u queues' doorbells", bdf,
                                        s.bar.size(), s.opt.io_queues + 1u));
  if (spec::cap_mpsmin(s.cap) != 0)
    return fail(Errc::unsupported, strf("nvme %s: no 4 KiB memory pages (%s)", bdf, s.regs().str().c_str()));
  if (!spec::cap_nvm_command_set(s.cap))
    return fail(Errc::unsupported, strf("nvme %s: no NVM command set (%s)", bdf, s.regs().str().c_str()));
  s.ready_timeout = milliseconds(std::max(500u, spec::cap_to_ms(s.cap)));
  const uint32_t mqes = spec::cap_mqes(s.cap);
  if (s.opt.queue_entries > mqes)
    return fail(Errc::invalid_argument, strf("nvme %s: Options.queue_entries %u exceeds CAP.MQES (%u entries)", bdf,
                                             s.opt.queue_entries, mqes));

  // PRP list pages: one pool per controller, named after it (pool names are
  // unique in a context).
  auto pool = s.ctx->create_pool("nvme-prp-" + s.bdf, spec::kPage, spec::kPage);
  if (!pool) return fail(pool.error(), strf("nvme %s: PRP list pool", bdf));
  s.prp_pool = std::move(*pool);

  if (auto st = s.disable(); !st) return st;
  const uint16_t aq = static_cast<uint16_t>(std::min<uint32_t>(kAdminEntries, mqes));
  auto admin = s.make_queue(0, aq, std::nullopt);
  if (!admin) return std::unexpected(admin.error());
  s.admin = std::move(*admin);
  // AQA: 0-based sizes, ACQS in 27:16 and ASQS in 11:0.
  s.bar.write32(spec::kAqa, (uint32_t{aq - 1u} << 16) | (aq - 1u));
  s.bar.write64(spec::kAsq, s.admin->sq_mem_.iova());
  s.bar.write64(spec::kAcq, s.admin->cq_mem_.iova());
  s.bar.write32(spec::kCc, spec::kCcEnable | spec::kCcIosqes | spec::kCcIocqes);
  s.enabled = true;
  if (auto st = s.wait_csts(spec::kCstsReady, spec::kCstsReady, s.ready_timeout, "enable (CSTS.RDY = 1)"); !st)
    return st;

  // Identify Controller, then the namespace in use.
  auto id = s.ctx->alloc_buffer(spec::kPage, {.zeroed = true});
  if (!id) return fail(id.error(), strf("nvme %s: identify buffer", bdf));
  auto id_segs = id->segments();
  if (!id_segs) return fail(id_segs.error(), strf("nvme %s: identify buffer segments", bdf));
  const DataRef id_ref{*id_segs, 0, spec::kPage};
  const auto* d = static_cast<const std::byte*>(id->vaddr());
  RawCommand ident{.opcode = spec::kIdentify, .cdw10 = spec::kCnsController};
  if (auto c = s.admin_ok(ident, id_ref, "Identify Controller"); !c) return std::unexpected(c.error());
  s.info.vid = field<uint16_t>(d, spec::kIdCtrlVid);
  s.info.cntlid = field<uint16_t>(d, spec::kIdCtrlCntlid);
  s.info.serial = ascii(d, spec::kIdCtrlSn, 20);
  s.info.model = ascii(d, spec::kIdCtrlMn, 40);
  s.info.firmware = ascii(d, spec::kIdCtrlFr, 8);
  s.info.namespaces = field<uint32_t>(d, spec::kIdCtrlNn);
  const auto mdts = field<uint8_t>(d, spec::kIdCtrlMdts);
  s.info.max_transfer = mdts == 0 ? 0 : spec::kPage << mdts;
  const auto rtd3e_us = field<uint32_t>(d, spec::kIdCtrlRtd3e);
  s.shutdown_timeout = std::max(s.ready_timeout, milliseconds(rtd3e_us / 1000));

  ident = RawCommand{.opcode = spec::kIdentify, .nsid = s.opt.nsid, .cdw10 = spec::kCnsNamespace};
  if (auto c = s.admin_ok(ident, id_ref, "Identify Namespace"); !c) return std::unexpected(c.error());
  const auto flbas = field<uint8_t>(d, spec::kIdNsFlbas) & 0xfu;
  const auto lbaf = field<uint32_t>(d, spec::kIdNsLbaf + 4u * flbas);
  s.ns.nsid = s.opt.nsid;
  s.ns.blocks = field<uint64_t>(d, spec::kIdNsNsze);
  const uint32_t lbads = (lbaf >> 16) & 0xff;
  if (s.ns.blocks == 0 || lbads < 9 || lbads > 16)
    return fail(Errc::not_found, strf("nvme %s: namespace %u is not usable (%" PRIu64 " blocks, LBADS %u)", bdf,
                                      s.opt.nsid, s.ns.blocks, lbads));
  s.ns.block_size = 1u << lbads;

  // Number of Queues: 0-based counts asked in CDW11, granted in DW0.
  const uint32_t nq = s.opt.io_queues;
  auto granted = s.admin_ok({.opcode = spec::kSetFeatures,
                             .cdw10 = spec::kFeatureNumberOfQueues,
                             .cdw11 = ((nq - 1) << 16) | (nq - 1)},
                            {}, "Set Features (Number of Queues)");
  if (!granted) return std::unexpected(granted.error());
  const uint32_t got = std::min(granted->result & 0xffff, granted->result >> 16) + 1;
  if (got < nq)
    return fail(Errc::unsupported, strf("nvme %s: %u I/O queue pairs asked, the controller grants %u", bdf, nq, got));

  // MSI-X: vector 0 belongs to the admin queue (polled here), the I/O
  // queues share vectors 1.. when there are fewer than queues.
  uint32_t vectors = 0;
  if (s.opt.completions == Completions::msix) {
    auto count = s.dev.irq_count(dmakit::IrqType::msix);
    if (!count) return fail(count.error(), strf("nvme %s: MSI-X vectors", bdf));
    if (*count < 2)
      return fail(Errc::unsupported, strf("nvme %s: %u MSI-X vectors, want at least 2", bdf, *count));
    vectors = std::min(*count, nq + 1);
    if (auto fds = s.dev.irq_enable(dmakit::IrqType::msix, vectors); !fds)
      return fail(fds.error(), strf("nvme %s: enable %u MSI-X vectors", bdf, vectors));
    s.msix = true;
  }

  for (uint16_t i = 0; i < nq; ++i) {
    const auto qid = static_cast<uint16_t>(i + 1);
    std::optional<uint32_t> vector;
    if (vectors != 0) vector = 1 + i % (vectors - 1);
    auto q = s.make_queue(qid, s.opt.queue_entries, vector);
    if (!q) return std::unexpected(q.error());
    // The CQ first: the SQ names the CQ it completes into.
    const uint32_t size_qid = (uint32_t{s.opt.queue_entries - 1u} << 16) | qid;
    uint32_t cq_flags = spec::kQueueContiguous;
    if (vector) cq_flags |= spec::kCqInterruptsEnabled | (*vector << 16);
    const std::string what = strf("Create I/O CQ %u", qid);
    auto c = s.admin_ok({.opcode = spec::kCreateIoCq, .prp1 = (*q)->cq_mem_.iova(), .cdw10 = size_qid,
                         .cdw11 = cq_flags},
                        {}, what.c_str());
    if (!c) return std::unexpected(c.error());
    const std::string what_sq = strf("Create I/O SQ %u", qid);
    c = s.admin_ok({.opcode = spec::kCreateIoSq, .prp1 = (*q)->sq_mem_.iova(), .cdw10 = size_qid,
                    .cdw11 = (uint32_t{qid} << 16) | spec::kQueueContiguous},
                   {}, what_sq.c_str());
    if (!c) {
      // The CQ exists on the controller: keep the queue so close() deletes it.
      s.io.push_back(std::move(*q));
      return std::unexpected(c.error());
    }
    s.io.push_back(std::move(*q));
  }
  return {};
}

Status Controller::close() {
  if (!s_ || !s_->enabled) return {};
  State& s = *s_;
  Status first;
  auto keep = [&](Status st) {
    if (!st && first) first = std::move(st);
  };
  // SQs before CQs: a CQ may go only when no SQ completes into it. Stop at
  // the first failure: a controller that does not answer will not answer
  // the next command either.
  for (const uint8_t op : {spec::kDeleteIoSq, spec::kDeleteIoCq}) {
    for (auto it = s.io.rbegin(); first && it != s.io.rend(); ++it) {
      const std::string what = strf("%s %u", op == spec::kDeleteIoSq ? "Delete I/O SQ" : "Delete I/O CQ", (*it)->id());
      auto c = s.admin_ok({.opcode = op, .cdw10 = (*it)->id()}, {}, what.c_str());
      if (!c) keep(std::unexpected(c.error()));
    }
  }
  // Normal shutdown: the controller finishes its work and reports it.
  const uint32_t cc = s.bar.read32(spec::kCc);
  s.bar.write32(spec::kCc, (cc & ~spec::kCcShnMask) | spec::kCcShnNormal);
  keep(s.wait_csts(spec::kCstsShstMask, spec::kCstsShstComplete, s.shutdown_timeout,
                   "shutdown (CSTS.SHST = complete)"));
  s.enabled = false;
  if (s.msix) {
    keep(s.dev.irq_disable(dmakit::IrqType::msix));
    s.msix = false;
  }
  return first;
}

Result<Completion> Controller::admin_command(const RawCommand& cmd, const DataRef& data) {
  if (!s_ || !s_->enabled) return fail(Errc::invalid_argument, "nvme: admin command on a closed controller");
  return s_->admin_command(cmd, data);
}

Status Controller::read(size_t q, uint64_t lba, uint64_t blocks, const DataRef& data) {
  return transfer(spec::kRead, q, lba, blocks, data);
}
Status Controller::write(size_t q, uint64_t lba, uint64_t blocks, const DataRef& data) {
  return transfer(spec::kWrite, q, lba, blocks, data);
}

Status Controller::flush(size_t q) {
  if (!s_ || !s_->enabled) return fail(Errc::invalid_argument, "nvme: Flush on a closed controller");
  State& s = *s_;
  if (q >= s.io.size())
    return fail(Errc::invalid_argument, strf("nvme %s: I/O queue %zu, the controller has %zu", s.bdf.c_str(), q,
                                             s.io.size()));
  auto cid = s.io[q]->submit({.opcode = spec::kFlush, .nsid = s.ns.nsid}, {});
  if (!cid) return std::unexpected(cid.error());
  auto c = s.io[q]->wait(*cid);
  if (!c) return std::unexpected(c.error());
  if (!c->ok()) return fail(Errc::io, strf("nvme %s: Flush failed, status %#x", s.bdf.c_str(), c->status));
  return {};
}

Status Controller::transfer(uint8_t opcode, size_t q, uint64_t lba, uint64_t blocks, const DataRef& data) {
  if (!s_ || !s_->enabled) return fail(Errc::invalid_argument, "nvme: I/O on a closed controller");
  State& s = *s_;
  const char* bdf = s.bdf.c_str();
  const char* op = opcode_name(opcode);
  if (q >= s.io.size())
    return fail(Errc::invalid_argument, strf("nvme %s: I/O queue %zu, the controller has %zu", bdf, q, s.io.size()));
  const uint32_t bs = s.ns.block_size;
  if (blocks == 0 || data.bytes / bs != blocks || data.bytes % bs != 0)
    return fail(Errc::invalid_argument, strf("nvme %s: %s of %" PRIu64 " blocks of %u bytes with %" PRIu64
                                             " bytes of data",
                                             bdf, op, blocks, bs, data.bytes));
  if (lba > s.ns.blocks || blocks > s.ns.blocks - lba)
    return fail(Errc::invalid_argument, strf("nvme %s: %s of LBAs [%" PRIu64 ", %" PRIu64
                                             ") beyond the namespace's %" PRIu64 " blocks",
                                             bdf, op, lba, lba + blocks, s.ns.blocks));
  // Commands of at most MDTS bytes and 65536 blocks each.
  uint64_t per = 0x10000;
  if (s.info.max_transfer != 0) per = std::min<uint64_t>(per, s.info.max_transfer / bs);
  Queue& qu = *s.io[q];

  struct Pending {
    uint16_t cid;
    uint64_t lba, blocks;
  };
  std::vector<Pending> pending;
  size_t oldest = 0;
  Status first;
  auto reap = [&](const Pending& p) {
    auto c = qu.wait(p.cid);
    if (!first) return;
    if (!c)
      first = std::unexpected(c.error());
    else if (!c->ok())
      first = fail(Errc::io, strf("nvme %s: %s of LBAs [%" PRIu64 ", +%" PRIu64 ") failed, status %#x", bdf, op,
                                  p.lba, p.blocks, c->status));
  };
  for (uint64_t done = 0; done < blocks && first;) {
    if (qu.full() && oldest < pending.size()) reap(pending[oldest++]);
    const uint64_t n = std::min(per, blocks - done);
    const DataRef piece{data.segments, data.offset + done * bs, n * bs};
    auto cid = qu.submit(opcode, s.ns.nsid, lba + done, static_cast<uint32_t>(n), piece);
    if (!cid) {
      first = std::unexpected(cid.error());
      break;
    }
    pending.push_back({*cid, lba + done, n});
    done += n;
  }
  while (oldest < pending.size()) reap(pending[oldest++]);
  return first;
}

}  // namespace nvme
