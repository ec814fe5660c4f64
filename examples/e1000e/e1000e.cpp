#include "e1000e.hpp"

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <thread>
#include <utility>

namespace dmakit::e1000e {

namespace {

using Clock = std::chrono::steady_clock;

// CTRL bits.
constexpr uint32_t kCtrlFd = 1u << 0;          // full duplex
constexpr uint32_t kCtrlAsde = 1u << 5;        // auto speed detection
constexpr uint32_t kCtrlSlu = 1u << 6;         // set link up
constexpr uint32_t kCtrlSpeed1000 = 2u << 8;   // SPEED = 10b
constexpr uint32_t kCtrlSpeedMask = 3u << 8;
constexpr uint32_t kCtrlFrcSpd = 1u << 11;     // force speed
constexpr uint32_t kCtrlFrcDpx = 1u << 12;     // force duplex
constexpr uint32_t kCtrlRst = 1u << 26;        // software reset, self-clearing
constexpr uint32_t kCtrlPhyRst = 1u << 31;

constexpr uint32_t kStatusLu = 1u << 1;        // link up
constexpr uint32_t kEecdAutoRd = 1u << 9;      // NVM auto-read done

// MDIC fields: data 15:0, register 20:16, PHY address 25:21, op 27:26.
constexpr uint32_t kMdicPhyAddr = 1u << 21;    // the 82574's internal PHY is address 1
constexpr uint32_t kMdicOpWrite = 1u << 26;
constexpr uint32_t kMdicOpRead = 2u << 26;
constexpr uint32_t kMdicReady = 1u << 28;
constexpr uint32_t kMdicError = 1u << 30;

// PHY control register (MII register 0).
constexpr uint32_t kPhyControl = 0;
constexpr uint16_t kPhyLoopback = 1u << 14;
constexpr uint16_t kPhySpeedMsb = 1u << 6;     // with bit 13 clear: 1000 Mb/s
constexpr uint16_t kPhyFullDuplex = 1u << 8;
constexpr uint16_t kPhyRestartAutoNeg = 1u << 9;
constexpr uint16_t kPhyAutoNeg = 1u << 12;

constexpr uint32_t kRctlEn = 1u << 1;
constexpr uint32_t kRctlLbmMac = 1u << 6;      // LBM = 01b
constexpr uint32_t kRctlBam = 1u << 15;        // accept broadcast
constexpr uint32_t kRctlSecrc = 1u << 26;      // strip the CRC: lengths are the frame's own
// BSIZE = 00b with BSEX = 0 is 2048 bytes; DTYP = 00b legacy descriptors.

constexpr uint32_t kTctlEn = 1u << 1;
constexpr uint32_t kTctlPsp = 1u << 3;         // pad short packets
constexpr uint32_t kTctlCt = 0x0fu << 4;       // collision threshold (datasheet value)
constexpr uint32_t kTctlCold = 0x3fu << 12;    // collision distance for full duplex
constexpr uint32_t kTctlRtlc = 1u << 24;       // retransmit on late collision
constexpr uint32_t kTipg = 8u | (8u << 10) | (6u << 20);  // IPGT 8, IPGR1 8, IPGR2 6
constexpr uint32_t kTarcEnable = 1u << 10;     // queue 0 takes part in transmit arbitration

constexpr uint32_t kRahAv = 1u << 31;          // address valid

// Legacy transmit descriptor command bits.
constexpr uint8_t kTxCmdEop = 1u << 0;         // end of packet
constexpr uint8_t kTxCmdIfcs = 1u << 1;        // insert FCS
constexpr uint8_t kTxCmdRs = 1u << 3;          // report status: write DD back

// The legacy descriptors, 16 bytes each, little-endian like the host.
struct RxDesc {
  uint64_t addr;
  uint16_t length;
  uint16_t checksum;
  uint8_t status;
  uint8_t errors;
  uint16_t special;
};
struct TxDesc {
  uint64_t addr;
  uint16_t length;
  uint8_t cso;
  uint8_t cmd;
  uint8_t status;
  uint8_t css;
  uint16_t special;
};
static_assert(sizeof(RxDesc) == 16 && sizeof(TxDesc) == 16);
constexpr size_t kDescSize = 16;
constexpr size_t kRingAlign = 128;  // RDBAL/TDBAL: 128-byte aligned base, length a multiple of 128

// The device writes descriptors behind the compiler's back: volatile access only.
volatile RxDesc* rx_desc(const Block& ring, uint16_t i) { return static_cast<volatile RxDesc*>(ring.vaddr) + i; }
volatile TxDesc* tx_desc(const Block& ring, uint16_t i) { return static_cast<volatile TxDesc*>(ring.vaddr) + i; }

[[gnu::format(printf, 1, 2)]] std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char buf[512];
  const int n = std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return n < 0 ? std::string(fmt) : std::string(buf, std::min<size_t>(static_cast<size_t>(n), sizeof buf - 1));
}

// Polls done() until it holds or limit passed; checks once more at the end
// so a slow scheduler cannot turn a finished step into a timeout.
template <class F>
bool wait_for(std::chrono::milliseconds limit, F done) {
  const auto deadline = Clock::now() + limit;
  while (!done()) {
    if (Clock::now() > deadline) return done();
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  return true;
}

Error with_context(const Error& e, const std::string& what) {
  return Error{e.code, e.sys_errno, what + ": " + e.message};
}

Status check_entries(uint16_t n, const char* which) {
  if (n < 8 || n > 4096 || n % 8 != 0)
    return std::unexpected(Error{Errc::invalid_argument, 0,
                                 format("e1000e: %s = %u: want a multiple of 8 in 8..4096 (the ring must be a "
                                        "multiple of 128 bytes)",
                                        which, n)});
  return {};
}

}  // namespace

std::string Regs::str() const {
  return format("CTRL=%#010x STATUS=%#010x RCTL=%#010x TCTL=%#010x RDH=%u RDT=%u TDH=%u TDT=%u", ctrl, status, rctl,
                tctl, rdh, rdt, tdh, tdt);
}

std::string to_string(const MacAddress& m) {
  return format("%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
}

Nic::Nic(Device device, Bar bar, const Config& cfg) : device_(std::move(device)), bar_(bar), cfg_(cfg) {}

Nic::~Nic() {
  if (!device_) return;  // moved from
  // Quiesce first: no descriptor fetch and no buffer write may follow the frees below.
  bar_.write32(reg::kRctl, 0);
  bar_.write32(reg::kTctl, 0);
  bar_.write32(reg::kImc, ~0u);
  (void)bar_.read32(reg::kStatus);  // flushes the posted writes
  (void)device_.set_bus_master(false);
  for (auto* slots : {&rx_slots_, &tx_slots_})
    for (const Slot& s : *slots) (void)buffer_pool_.free(s.block);
  for (const Block* ring : {&rx_ring_, &tx_ring_})
    if (ring->vaddr != nullptr) (void)ring_pool_.free(*ring);
}

Error Nic::error(Errc code, const std::string& what, bool with_regs) const {
  std::string msg = "e1000e " + bdf() + ": " + what;
  if (with_regs) msg += " (" + regs().str() + ")";
  return Error{code, 0, std::move(msg)};
}

Regs Nic::regs() const {
  Regs r;
  r.ctrl = bar_.read32(reg::kCtrl);
  r.status = bar_.read32(reg::kStatus);
  r.rctl = bar_.read32(reg::kRctl);
  r.tctl = bar_.read32(reg::kTctl);
  r.rdh = bar_.read32(reg::kRdh);
  r.rdt = bar_.read32(reg::kRdt);
  r.tdh = bar_.read32(reg::kTdh);
  r.tdt = bar_.read32(reg::kTdt);
  return r;
}

Result<Nic> Nic::open(Context& ctx, const std::string& bdf, const Config& cfg) {
  if (bdf.empty()) return std::unexpected(Error{Errc::invalid_argument, 0, "e1000e: no PCI address given"});
  if (auto st = check_entries(cfg.rx_entries, "rx_entries"); !st) return std::unexpected(st.error());
  if (auto st = check_entries(cfg.tx_entries, "tx_entries"); !st) return std::unexpected(st.error());
  if (cfg.reset_timeout.count() <= 0 || cfg.link_timeout.count() <= 0 || cfg.io_timeout.count() <= 0)
    return std::unexpected(Error{Errc::invalid_argument, 0, "e1000e: every timeout must be positive"});

  const std::string where = "e1000e " + bdf;
  auto dev = ctx.open_device(bdf);
  if (!dev) return std::unexpected(with_context(dev.error(), where + ": open"));
  // Another function (the NVMe next to it, say) would take our register writes as its own.
  auto vendor = dev->config_read<uint16_t>(0x00);
  auto device = dev->config_read<uint16_t>(0x02);
  if (!vendor || !device)
    return std::unexpected(with_context(vendor ? device.error() : vendor.error(), where + ": read the PCI IDs"));
  if (*vendor != kVendorId || *device != kDeviceId)
    return std::unexpected(Error{Errc::unsupported, 0,
                                 format("%s: PCI ID %04x:%04x is not an 82574L (%04x:%04x)", where.c_str(), *vendor,
                                        *device, kVendorId, kDeviceId)});
  auto bar = dev->map_bar(0);
  if (!bar) return std::unexpected(with_context(bar.error(), where + ": map BAR0"));
  if (bar->size() < reg::kBar0MinSize)
    return std::unexpected(Error{Errc::unsupported, 0,
                                 format("%s: BAR0 is %llu bytes, the registers need %#llx", where.c_str(),
                                        static_cast<unsigned long long>(bar->size()),
                                        static_cast<unsigned long long>(reg::kBar0MinSize))});
  // Memory decoding for the registers, bus mastering for descriptor and buffer DMA.
  if (auto st = dev->set_bus_master(true); !st)
    return std::unexpected(with_context(st.error(), where + ": enable bus mastering"));

  Nic nic(std::move(*dev), *bar, cfg);
  if (auto st = nic.reset(); !st) return std::unexpected(st.error());
  if (auto st = nic.read_mac(); !st) return std::unexpected(st.error());
  if (auto st = nic.setup_link(); !st) return std::unexpected(st.error());
  if (auto st = nic.setup_rings(ctx); !st) return std::unexpected(st.error());
  return nic;
}

Status Nic::reset() {
  if (bar_.read32(reg::kStatus) == ~0u)
    return std::unexpected(error(Errc::io, "STATUS reads all ones: the device does not answer", false));
  // Nothing may be in flight when the MAC resets: interrupts off, receive
  // and transmit stopped, and a moment for a DMA already started.
  bar_.write32(reg::kImc, ~0u);
  bar_.write32(reg::kRctl, 0);
  bar_.write32(reg::kTctl, kTctlPsp);
  (void)bar_.read32(reg::kStatus);
  std::this_thread::sleep_for(std::chrono::milliseconds(10));

  bar_.write32(reg::kCtrl, bar_.read32(reg::kCtrl) | kCtrlRst);
  // The datasheet asks for a pause before the first access after a reset.
  std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (!wait_for(cfg_.reset_timeout, [&] { return (bar_.read32(reg::kCtrl) & kCtrlRst) == 0; }))
    return std::unexpected(error(Errc::timeout, format("CTRL.RST did not clear within %lld ms",
                                                       static_cast<long long>(cfg_.reset_timeout.count()))));
  // The reset reloads the MAC address from the NVM; RAL/RAH are valid once that is done.
  if (!wait_for(cfg_.reset_timeout, [&] { return (bar_.read32(reg::kEecd) & kEecdAutoRd) != 0; }))
    return std::unexpected(error(Errc::timeout, format("EECD.AUTO_RD (NVM read done) not set within %lld ms, EECD=%#x",
                                                       static_cast<long long>(cfg_.reset_timeout.count()),
                                                       bar_.read32(reg::kEecd))));
  // The reset unmasks nothing on this part, but mask again and clear what is pending: this driver polls.
  bar_.write32(reg::kImc, ~0u);
  (void)bar_.read32(reg::kIcr);
  return {};
}

Status Nic::read_mac() {
  const uint32_t ral = bar_.read32(reg::kRal0);
  const uint32_t rah = bar_.read32(reg::kRah0);
  if ((rah & kRahAv) == 0)
    return std::unexpected(error(Errc::io, format("receive address 0 is not valid (RAL0=%#x RAH0=%#x)", ral, rah)));
  for (unsigned i = 0; i < 4; ++i) mac_[i] = static_cast<uint8_t>(ral >> (8 * i));
  mac_[4] = static_cast<uint8_t>(rah);
  mac_[5] = static_cast<uint8_t>(rah >> 8);
  if (std::all_of(mac_.begin(), mac_.end(), [](uint8_t b) { return b == 0; }) || (mac_[0] & 1) != 0)
    return std::unexpected(error(Errc::io, "receive address 0 holds no unicast address: " + to_string(mac_)));
  return {};
}

Result<uint32_t> Nic::mdic(uint32_t command) {
  bar_.write32(reg::kMdic, command);
  uint32_t v = 0;
  if (!wait_for(cfg_.reset_timeout, [&] { return ((v = bar_.read32(reg::kMdic)) & kMdicReady) != 0; }))
    return std::unexpected(error(Errc::timeout, format("MDIC not ready within %lld ms (MDIC=%#x)",
                                                       static_cast<long long>(cfg_.reset_timeout.count()), v)));
  if ((v & kMdicError) != 0) return std::unexpected(error(Errc::io, format("MDIC reports an error (MDIC=%#x)", v)));
  return v;
}

Result<uint16_t> Nic::phy_read(uint32_t phy_reg) {
  auto v = mdic(kMdicOpRead | kMdicPhyAddr | (phy_reg << 16));
  if (!v) return std::unexpected(v.error());
  return static_cast<uint16_t>(*v & 0xffff);
}

Status Nic::phy_write(uint32_t phy_reg, uint16_t value) {
  auto v = mdic(kMdicOpWrite | kMdicPhyAddr | (phy_reg << 16) | value);
  if (!v) return std::unexpected(v.error());
  return {};
}

Status Nic::setup_link() {
  uint32_t ctrl = bar_.read32(reg::kCtrl) & ~(kCtrlPhyRst | kCtrlSpeedMask | kCtrlFrcSpd | kCtrlFrcDpx);
  ctrl |= kCtrlSlu;  // the MAC follows the PHY's link instead of waiting for a driver decision
  if (cfg_.loopback == Loopback::none) {
    ctrl |= kCtrlAsde;
  } else {
    // Loopback has no partner to negotiate with: force 1000 Mb/s full duplex.
    ctrl = (ctrl & ~kCtrlAsde) | kCtrlFrcSpd | kCtrlFrcDpx | kCtrlSpeed1000 | kCtrlFd;
  }
  bar_.write32(reg::kCtrl, ctrl);

  // The MAC's reset leaves the PHY alone: a loopback set by an earlier user
  // stays until it is cleared here.
  auto bmcr = phy_read(kPhyControl);
  if (!bmcr) return std::unexpected(with_context(bmcr.error(), "read the PHY control register"));
  uint16_t want = *bmcr;
  if (cfg_.loopback == Loopback::phy)
    want = kPhyLoopback | kPhySpeedMsb | kPhyFullDuplex;
  else if ((*bmcr & kPhyLoopback) != 0)
    want = kPhyAutoNeg | kPhyRestartAutoNeg | kPhySpeedMsb | kPhyFullDuplex;
  if (want != *bmcr) {
    if (auto st = phy_write(kPhyControl, want); !st)
      return std::unexpected(with_context(st.error(), "write the PHY control register"));
    auto got = phy_read(kPhyControl);
    if (!got) return std::unexpected(with_context(got.error(), "read the PHY control register"));
    if (((*got ^ want) & kPhyLoopback) != 0)
      return std::unexpected(error(Errc::unsupported, format("the PHY did not take its loopback bit: wrote %#x to "
                                                             "its control register, read back %#x",
                                                             want, *got)));
  }
  if (!wait_for(cfg_.link_timeout, [&] { return (bar_.read32(reg::kStatus) & kStatusLu) != 0; }))
    return std::unexpected(error(Errc::timeout, format("no link (STATUS.LU) within %lld ms",
                                                       static_cast<long long>(cfg_.link_timeout.count()))));
  return {};
}

Status Nic::setup_rings(Context& ctx) {
  const size_t rx_bytes = size_t{cfg_.rx_entries} * kDescSize;
  const size_t tx_bytes = size_t{cfg_.tx_entries} * kDescSize;
  // Pool names are unique within a context; the BDF keeps two NICs apart.
  auto rings = ctx.create_pool("e1000e-rings-" + bdf(), std::max(rx_bytes, tx_bytes), kRingAlign);
  if (!rings) return std::unexpected(with_context(rings.error(), "e1000e " + bdf() + ": ring pool"));
  ring_pool_ = std::move(*rings);
  auto buffers = ctx.create_pool("e1000e-buffers-" + bdf(), kBufferSize, kBufferSize);
  if (!buffers) return std::unexpected(with_context(buffers.error(), "e1000e " + bdf() + ": buffer pool"));
  buffer_pool_ = std::move(*buffers);

  // Zeroed rings: no descriptor shows DD before the device wrote it.
  for (Block* ring : {&rx_ring_, &tx_ring_}) {
    auto b = ring_pool_.alloc_zeroed();
    if (!b) return std::unexpected(with_context(b.error(), "e1000e " + bdf() + ": ring"));
    *ring = *b;
  }
  for (auto [slots, n] : {std::pair{&rx_slots_, cfg_.rx_entries}, std::pair{&tx_slots_, cfg_.tx_entries}}) {
    slots->reserve(n);
    for (uint16_t i = 0; i < n; ++i) {
      auto b = buffer_pool_.alloc();
      if (!b) return std::unexpected(with_context(b.error(), "e1000e " + bdf() + ": packet buffer"));
      slots->push_back(Slot{*b, b->vaddr, b->iova});
    }
  }

  bar_.write32(reg::kTdbal, static_cast<uint32_t>(tx_ring_.iova));
  bar_.write32(reg::kTdbah, static_cast<uint32_t>(tx_ring_.iova >> 32));
  bar_.write32(reg::kTdlen, static_cast<uint32_t>(tx_bytes));
  bar_.write32(reg::kTdh, 0);
  bar_.write32(reg::kTdt, 0);
  bar_.write32(reg::kTipg, kTipg);
  // Set after reset, but a queue without it never fetches: make sure.
  bar_.write32(reg::kTarc0, bar_.read32(reg::kTarc0) | kTarcEnable);
  bar_.write32(reg::kTctl, kTctlEn | kTctlPsp | kTctlCt | kTctlCold | kTctlRtlc);

  bar_.write32(reg::kRdbal, static_cast<uint32_t>(rx_ring_.iova));
  bar_.write32(reg::kRdbah, static_cast<uint32_t>(rx_ring_.iova >> 32));
  bar_.write32(reg::kRdlen, static_cast<uint32_t>(rx_bytes));
  bar_.write32(reg::kRdh, 0);
  bar_.write32(reg::kRdt, 0);
  bar_.write32(reg::kRdtr, 0);  // write each descriptor back at once
  for (uint64_t i = 0; i < 128; ++i) bar_.write32(reg::kMta + 4 * i, 0);  // no multicast
  // Unicast to RAL0/RAH0 and broadcast; legacy descriptors, 2048-byte buffers.
  const uint32_t lbm = cfg_.loopback == Loopback::mac ? kRctlLbmMac : 0;
  bar_.write32(reg::kRctl, kRctlEn | kRctlBam | kRctlSecrc | lbm);

  if (cfg_.auto_rx) {
    // One descriptor stays unposted: RDH == RDT means "ring empty" to the device.
    while (rx_posted_ < cfg_.rx_entries - 1) {
      const Slot& s = rx_slots_[rx_tail_];
      if (auto st = post_slot(s.host, s.iova); !st) return st;
    }
  }
  return {};
}

Status Nic::post_slot(void* host, uint64_t iova) {
  if (rx_posted_ >= cfg_.rx_entries - 1)
    return std::unexpected(error(Errc::busy, format("receive ring full: %u descriptors posted", rx_posted_), false));
  const uint16_t i = rx_tail_;
  rx_slots_[i].host = host;
  rx_slots_[i].iova = iova;
  volatile RxDesc* d = rx_desc(rx_ring_, i);
  d->addr = iova;
  d->length = 0;
  d->checksum = 0;
  d->errors = 0;
  d->special = 0;
  d->status = 0;
  rx_tail_ = static_cast<uint16_t>((i + 1u) % cfg_.rx_entries);
  ++rx_posted_;
  // The descriptor must be in memory before the tail tells the device about it.
  std::atomic_thread_fence(std::memory_order_release);
  bar_.write32(reg::kRdt, rx_tail_);
  return {};
}

Status Nic::post_rx() {
  if (cfg_.auto_rx)
    return std::unexpected(error(Errc::invalid_argument, "post_rx: auto_rx is on, the driver posts buffers", false));
  const Slot& s = rx_slots_[rx_tail_];
  return post_slot(s.block.vaddr, s.block.iova);
}

Status Nic::post_rx(void* host, uint64_t iova) {
  if (cfg_.auto_rx)
    return std::unexpected(error(Errc::invalid_argument, "post_rx: auto_rx is on, the driver posts buffers", false));
  if (host == nullptr || iova == 0)
    return std::unexpected(error(Errc::invalid_argument, "post_rx: a buffer needs a host address and an IOVA", false));
  return post_slot(host, iova);
}

Result<TxDone> Nic::transmit(std::span<const std::byte> frame) {
  if (frame.size() < kMinFrame || frame.size() > kMaxFrame)
    return std::unexpected(error(Errc::invalid_argument,
                                 format("transmit: a frame of %zu bytes, want %zu..%zu (without FCS)", frame.size(),
                                        kMinFrame, kMaxFrame),
                                 false));
  const uint16_t i = tx_tail_;
  const Slot& s = tx_slots_[i];
  std::memcpy(s.host, frame.data(), frame.size());
  volatile TxDesc* d = tx_desc(tx_ring_, i);
  d->addr = s.iova;
  d->length = static_cast<uint16_t>(frame.size());
  d->cso = 0;
  d->css = 0;
  d->special = 0;
  d->status = 0;
  d->cmd = kTxCmdEop | kTxCmdIfcs | kTxCmdRs;
  tx_tail_ = static_cast<uint16_t>((i + 1u) % cfg_.tx_entries);
  std::atomic_thread_fence(std::memory_order_release);
  bar_.write32(reg::kTdt, tx_tail_);
  // One frame in flight at a time: the slot is free again once DD is set.
  if (!wait_for(cfg_.io_timeout, [&] { return (d->status & kDescDone) != 0; }))
    return std::unexpected(error(Errc::timeout, format("transmit: descriptor %u not done within %lld ms", i,
                                                       static_cast<long long>(cfg_.io_timeout.count()))));
  std::atomic_thread_fence(std::memory_order_acquire);
  return TxDone{i, d->length, d->status};
}

Result<RxDone> Nic::receive(std::span<std::byte> out) {
  if (rx_posted_ == 0)
    return std::unexpected(error(Errc::invalid_argument, "receive: no receive buffer posted (see post_rx)", false));
  const uint16_t i = rx_next_;
  volatile RxDesc* d = rx_desc(rx_ring_, i);
  if (!wait_for(cfg_.io_timeout, [&] { return (d->status & kDescDone) != 0; }))
    return std::unexpected(error(Errc::timeout, format("receive: no frame in descriptor %u within %lld ms", i,
                                                       static_cast<long long>(cfg_.io_timeout.count()))));
  // Read the rest of the descriptor, and the data, only after DD.
  std::atomic_thread_fence(std::memory_order_acquire);
  const RxDone r{i, d->length, d->status, d->errors};
  Slot& s = rx_slots_[i];
  const bool fits = r.length <= out.size() && r.length <= kBufferSize;
  const bool whole = (r.status & kRxEndOfPacket) != 0;
  if (fits && whole) std::memcpy(out.data(), s.host, r.length);
  // The slot goes back to its own block whatever buffer this frame used.
  s.host = s.block.vaddr;
  s.iova = s.block.iova;
  d->status = 0;
  rx_next_ = static_cast<uint16_t>((i + 1u) % cfg_.rx_entries);
  --rx_posted_;
  if (cfg_.auto_rx) {
    const Slot& next = rx_slots_[rx_tail_];
    if (auto st = post_slot(next.block.vaddr, next.block.iova); !st) return std::unexpected(st.error());
  }
  if (!whole)
    return std::unexpected(error(Errc::io, format("receive: descriptor %u holds part of a frame (status %#x, "
                                                  "%u bytes); frames larger than a buffer are not enabled",
                                                  i, r.status, r.length)));
  if (!fits)
    return std::unexpected(error(Errc::invalid_argument,
                                 format("receive: a frame of %u bytes does not fit the %zu-byte output", r.length,
                                        out.size()),
                                 false));
  return r;
}

}  // namespace dmakit::e1000e
