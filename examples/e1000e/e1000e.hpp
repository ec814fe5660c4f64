// A small polled driver for the Intel 82574L (e1000e) NIC on dmakit's
// public API: the device through dmakit::Device (BAR0, bus mastering),
// descriptor rings and packet buffers from dmakit pools.
//
// It does what a loopback round trip needs and nothing more: reset, all
// interrupts masked (the driver polls), link up with MAC or PHY loopback,
// one legacy receive ring and one legacy transmit ring, 2048-byte buffers,
// one frame per descriptor. Every wait is bounded; a timeout is
// Errc::timeout with the registers that explain it in the message.
//
// Register offsets and bits are those of the 82574 datasheet
// ("Register Descriptions" and "Legacy Receive/Transmit Descriptor Format").
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <dmakit/dmakit.hpp>

namespace dmakit::e1000e {

// Register offsets in BAR0.
namespace reg {
inline constexpr uint64_t kCtrl = 0x0000;    // Device Control
inline constexpr uint64_t kStatus = 0x0008;  // Device Status
inline constexpr uint64_t kEecd = 0x0010;    // EEPROM/Flash Control
inline constexpr uint64_t kMdic = 0x0020;    // MDI Control (PHY registers)
inline constexpr uint64_t kIcr = 0x00c0;     // Interrupt Cause Read (clears on read)
inline constexpr uint64_t kImc = 0x00d8;     // Interrupt Mask Clear
inline constexpr uint64_t kRctl = 0x0100;    // Receive Control
inline constexpr uint64_t kTctl = 0x0400;    // Transmit Control
inline constexpr uint64_t kTipg = 0x0410;    // Transmit Inter Packet Gap
inline constexpr uint64_t kRdbal = 0x2800;   // Receive ring base, low / high
inline constexpr uint64_t kRdbah = 0x2804;
inline constexpr uint64_t kRdlen = 0x2808;   // Receive ring length in bytes
inline constexpr uint64_t kRdh = 0x2810;     // Receive head (the device's next descriptor)
inline constexpr uint64_t kRdt = 0x2818;     // Receive tail (one past the last one the driver gave)
inline constexpr uint64_t kRdtr = 0x2820;    // Receive interrupt delay timer
inline constexpr uint64_t kTdbal = 0x3800;   // Transmit ring base, low / high
inline constexpr uint64_t kTdbah = 0x3804;
inline constexpr uint64_t kTdlen = 0x3808;
inline constexpr uint64_t kTdh = 0x3810;
inline constexpr uint64_t kTdt = 0x3818;
inline constexpr uint64_t kTarc0 = 0x3840;   // Transmit arbitration count, queue 0
inline constexpr uint64_t kMta = 0x5200;     // Multicast table, 128 dwords
inline constexpr uint64_t kRal0 = 0x5400;    // Receive address 0, low / high
inline constexpr uint64_t kRah0 = 0x5404;
inline constexpr uint64_t kBar0MinSize = 0x5800;  // every register above lies below this
}  // namespace reg

// Where transmitted frames come back.
enum class Loopback {
  none,  // normal operation: frames go to the wire
  mac,   // RCTL.LBM = 01b: the MAC turns frames around before the PHY
  phy,   // PHY control register (MII register 0) bit 14, written through MDIC
};

struct Config {
  Loopback loopback = Loopback::phy;
  uint16_t rx_entries = 64;  // descriptors per ring: a multiple of 8 (the ring is
  uint16_t tx_entries = 64;  // a multiple of 128 bytes), 8..4096
  // The receive ring is filled at start and each buffer given back after
  // receive(). Off: the caller posts every receive buffer with post_rx().
  bool auto_rx = true;
  std::chrono::milliseconds reset_timeout{1000};  // CTRL.RST and the NVM auto-read
  std::chrono::milliseconds link_timeout{5000};   // STATUS.LU after link setup
  std::chrono::milliseconds io_timeout{2000};     // a descriptor's DD bit
};

// Registers at one instant, for error messages and diagnostics.
struct Regs {
  uint32_t ctrl = 0, status = 0, rctl = 0, tctl = 0;
  uint32_t rdh = 0, rdt = 0, tdh = 0, tdt = 0;
  std::string str() const;
};

// What the device wrote back into a transmit descriptor.
struct TxDone {
  uint16_t index = 0;   // the descriptor
  uint16_t length = 0;  // bytes sent (the descriptor's length field)
  uint8_t status = 0;   // STA: bit 0 DD (descriptor done)
};

// What the device wrote back into a receive descriptor.
struct RxDone {
  uint16_t index = 0;   // the descriptor
  uint16_t length = 0;  // bytes the device wrote into the buffer
  uint8_t status = 0;   // bit 0 DD (descriptor done), bit 1 EOP (end of packet)
  uint8_t errors = 0;   // 0 = none
};

inline constexpr uint8_t kDescDone = 0x01;    // DD in both descriptor kinds
inline constexpr uint8_t kRxEndOfPacket = 0x02;
inline constexpr size_t kBufferSize = 2048;   // RCTL.BSIZE = 00b, BSEX = 0
inline constexpr size_t kMinFrame = 60;       // without FCS: shorter frames are padded on the way
inline constexpr size_t kMaxFrame = 1514;     // without FCS, no VLAN tag, no jumbo frames

using MacAddress = std::array<uint8_t, 6>;
std::string to_string(const MacAddress& mac);

// One 82574L. Destroy it before the Context it was opened in.
class Nic {
 public:
  // The 82574L's PCI IDs; open() refuses any other function.
  static constexpr uint16_t kVendorId = 0x8086;
  static constexpr uint16_t kDeviceId = 0x10d3;

  // Opens bdf in ctx, resets the controller, masks its interrupts, reads
  // the MAC address, sets the link up (with cfg.loopback), allocates and
  // programs both rings and enables receive and transmit.
  static Result<Nic> open(Context& ctx, const std::string& bdf, const Config& cfg = {});

  Nic(Nic&&) noexcept = default;
  Nic& operator=(Nic&&) = delete;  // the old device would have to stop first
  Nic(const Nic&) = delete;
  Nic& operator=(const Nic&) = delete;
  // Stops receive and transmit, turns bus mastering off, frees the blocks.
  ~Nic();

  std::string bdf() const { return std::string(device_.bdf()); }
  const MacAddress& mac() const { return mac_; }
  Regs regs() const;
  const Config& config() const { return cfg_; }

  // Sends one frame (kMinFrame..kMaxFrame bytes, FCS added by the device)
  // and waits until the device has written its descriptor back.
  Result<TxDone> transmit(std::span<const std::byte> frame);

  // Waits for the next received frame and copies it into out, which must
  // hold it (else Errc::invalid_argument; the frame is dropped). With
  // auto_rx the buffer goes back to the device at once.
  Result<RxDone> receive(std::span<std::byte> out);

  // Without auto_rx: gives the next receive descriptor to the device with
  // its own pool buffer, or with the caller's memory (host address + IOVA,
  // kBufferSize bytes; receive() then copies from host). The caller's
  // memory is used for this one frame only.
  Status post_rx();
  Status post_rx(void* host, uint64_t iova);

  // Receive descriptors the device owns now.
  uint16_t rx_posted() const { return rx_posted_; }

 private:
  // A receive or transmit slot: the buffer its descriptor points at.
  struct Slot {
    Block block;          // the pool block the slot owns
    void* host = nullptr;  // where the data is for the current use
    uint64_t iova = 0;
  };

  Nic(Device device, Bar bar, const Config& cfg);
  Status reset();
  Status read_mac();
  Status setup_link();
  Result<uint16_t> phy_read(uint32_t reg);
  Status phy_write(uint32_t reg, uint16_t value);
  Result<uint32_t> mdic(uint32_t command);
  Status setup_rings(Context& ctx);
  Status post_slot(void* host, uint64_t iova);
  // An error about this NIC: its BDF, what failed, and (with_regs) the registers.
  Error error(Errc code, const std::string& what, bool with_regs = true) const;

  // Declared first: destroyed after the pools, so the device is closed last.
  Device device_;
  Bar bar_;
  Config cfg_;
  MacAddress mac_{};
  Pool ring_pool_;    // one block per ring, the larger ring's size, 128-byte aligned
  Pool buffer_pool_;  // kBufferSize blocks: one per descriptor of either ring
  Block rx_ring_, tx_ring_;
  std::vector<Slot> rx_slots_, tx_slots_;
  uint16_t rx_next_ = 0;  // next descriptor receive() looks at
  uint16_t rx_tail_ = 0;  // next descriptor post_rx() gives (RDT)
  uint16_t rx_posted_ = 0;
  uint16_t tx_tail_ = 0;  // next descriptor transmit() uses (TDT)
};

}  // namespace dmakit::e1000e
