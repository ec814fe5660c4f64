// The parts of the NVMe specification this driver uses (NVM Express Base
// Specification 1.4: "Controller Registers", "Submission Queue Entry",
// "Completion Queue Entry", the admin and NVM command sets). Names follow
// the specification.
#pragma once

#include <cstddef>
#include <cstdint>

namespace nvme::spec {

// Controller registers: byte offsets in BAR0.
inline constexpr uint64_t kCap = 0x00;   // Controller Capabilities (64-bit)
inline constexpr uint64_t kVs = 0x08;    // Version
inline constexpr uint64_t kCc = 0x14;    // Controller Configuration
inline constexpr uint64_t kCsts = 0x1c;  // Controller Status
inline constexpr uint64_t kAqa = 0x24;   // Admin Queue Attributes
inline constexpr uint64_t kAsq = 0x28;   // Admin Submission Queue Base (64-bit)
inline constexpr uint64_t kAcq = 0x30;   // Admin Completion Queue Base (64-bit)
inline constexpr uint64_t kDoorbells = 0x1000;

// CAP fields.
constexpr uint32_t cap_mqes(uint64_t cap) { return static_cast<uint32_t>(cap & 0xffff) + 1; }  // entries, 1-based
constexpr uint32_t cap_to_ms(uint64_t cap) { return 500u * static_cast<uint32_t>((cap >> 24) & 0xff); }
constexpr uint32_t cap_doorbell_stride(uint64_t cap) { return 4u << ((cap >> 32) & 0xf); }
constexpr bool cap_nvm_command_set(uint64_t cap) { return ((cap >> 37) & 1) != 0; }
constexpr uint32_t cap_mpsmin(uint64_t cap) { return static_cast<uint32_t>((cap >> 48) & 0xf); }

// CC fields: enable, NVM command set (0), 4 KiB pages (MPS 0), round robin
// (AMS 0), shutdown notification, 64-byte SQ and 16-byte CQ entries.
inline constexpr uint32_t kCcEnable = 1u << 0;
inline constexpr uint32_t kCcShnNormal = 1u << 14;
inline constexpr uint32_t kCcShnMask = 3u << 14;
inline constexpr uint32_t kCcIosqes = 6u << 16;
inline constexpr uint32_t kCcIocqes = 4u << 20;

// CSTS fields.
inline constexpr uint32_t kCstsReady = 1u << 0;
inline constexpr uint32_t kCstsFatal = 1u << 1;
inline constexpr uint32_t kCstsShstMask = 3u << 2;
inline constexpr uint32_t kCstsShstComplete = 2u << 2;

// Memory page size (CC.MPS = 0) and what PRPs and queues are made of.
inline constexpr uint64_t kPage = 4096;
inline constexpr size_t kSqeSize = 64;
inline constexpr size_t kCqeSize = 16;
inline constexpr size_t kPrpPerPage = kPage / sizeof(uint64_t);

// Admin command opcodes.
inline constexpr uint8_t kDeleteIoSq = 0x00;
inline constexpr uint8_t kCreateIoSq = 0x01;
inline constexpr uint8_t kDeleteIoCq = 0x04;
inline constexpr uint8_t kCreateIoCq = 0x05;
inline constexpr uint8_t kIdentify = 0x06;
inline constexpr uint8_t kSetFeatures = 0x09;

// NVM command opcodes.
inline constexpr uint8_t kFlush = 0x00;
inline constexpr uint8_t kWrite = 0x01;
inline constexpr uint8_t kRead = 0x02;

// Identify CNS values and the Number of Queues feature.
inline constexpr uint32_t kCnsNamespace = 0;
inline constexpr uint32_t kCnsController = 1;
inline constexpr uint32_t kFeatureNumberOfQueues = 0x07;

// Create I/O CQ/SQ CDW11 bits: physically contiguous; interrupts enabled.
inline constexpr uint32_t kQueueContiguous = 1u << 0;
inline constexpr uint32_t kCqInterruptsEnabled = 1u << 1;

// Submission queue entry ("Common Command Format"), PRPs only (PSDT 0).
struct Sqe {
  uint32_t cdw0 = 0;  // opcode 7:0, CID 31:16
  uint32_t nsid = 0;
  uint32_t cdw2 = 0, cdw3 = 0;
  uint64_t mptr = 0;
  uint64_t prp1 = 0, prp2 = 0;
  uint32_t cdw10 = 0, cdw11 = 0, cdw12 = 0, cdw13 = 0, cdw14 = 0, cdw15 = 0;
};
static_assert(sizeof(Sqe) == kSqeSize);

// Completion queue entry dword 3: CID 15:0, phase tag 16, status 31:17.
inline constexpr size_t kCqeDw0 = 0;
inline constexpr size_t kCqeDw3 = 12;

// Identify Controller data structure: byte offsets.
inline constexpr size_t kIdCtrlVid = 0;    // 2 bytes
inline constexpr size_t kIdCtrlSn = 4;     // 20 ASCII bytes
inline constexpr size_t kIdCtrlMn = 24;    // 40 ASCII bytes
inline constexpr size_t kIdCtrlFr = 64;    // 8 ASCII bytes
inline constexpr size_t kIdCtrlMdts = 77;  // max transfer: 2^MDTS pages, 0 = no limit
inline constexpr size_t kIdCtrlCntlid = 78;
inline constexpr size_t kIdCtrlRtd3e = 88;  // shutdown latency in microseconds, 4 bytes
inline constexpr size_t kIdCtrlNn = 516;    // number of namespaces, 4 bytes

// Identify Namespace data structure: byte offsets.
inline constexpr size_t kIdNsNsze = 0;     // size in logical blocks, 8 bytes
inline constexpr size_t kIdNsFlbas = 26;   // bits 3:0 select the LBA format
inline constexpr size_t kIdNsLbaf = 128;   // LBA formats, 4 bytes each; LBADS in bits 23:16

}  // namespace nvme::spec
