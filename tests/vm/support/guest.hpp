// Helpers for tests that run inside the QEMU guest (see tests/vm/README.md):
// the devices the guest has, plain DMA memory, the disk pattern, and the
// kernel log lines that prove the IOMMU blocked an access.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/fd.hpp"
#include "base/error.hpp"

namespace dmakit::vmtest {

// Fixed PCI addresses (run-guest.sh gives the devices fixed slots); the
// guest's init binds both to vfio-pci before the test starts.
inline constexpr const char* kNvmeBdf = "0000:00:03.0";
inline constexpr const char* kNicBdf = "0000:00:04.0";

// The NVMe disk: every 512-byte LBA holds 64 copies of its own LBA number as
// a little-endian u64 (written by run-guest.sh).
inline constexpr size_t kLbaSize = 512;

// "" when `bytes` hold exactly LBAs first_lba, first_lba + 1, ... in the
// disk pattern; else where the first difference is.
std::string check_disk_pattern(std::span<const std::byte> bytes, uint64_t first_lba);

// Page-aligned anonymous memory, populated (pinned-ready) at allocation and
// unmapped on destruction. Plain memory for tests that bring their own DMA
// buffers; later tests use dmakit's allocators instead.
class DmaMemory {
 public:
  static Result<DmaMemory> allocate(size_t len);
  DmaMemory() = default;
  DmaMemory(DmaMemory&& other) noexcept;
  DmaMemory& operator=(DmaMemory&& other) noexcept;
  DmaMemory(const DmaMemory&) = delete;
  DmaMemory& operator=(const DmaMemory&) = delete;
  ~DmaMemory();

  std::byte* data() const { return static_cast<std::byte*>(addr_); }
  size_t size() const { return len_; }
  std::span<std::byte> bytes() const { return {data(), len_}; }

  // Fills every byte with `value`; all_equal tells whether it is still so.
  void fill(uint8_t value) const;
  bool all_equal(uint8_t value) const;

 private:
  DmaMemory(void* addr, size_t len) : addr_(addr), len_(len) {}
  void* addr_ = nullptr;
  size_t len_ = 0;
};

// Reads the kernel log (/dev/kmsg) from the moment it is created, to find
// the Intel IOMMU's fault reports, e.g.
//   DMAR: [DMA Write NO_PASID] Request device [00:03.0] fault addr 0x20000000 [fault reason 0x05] ...
// QEMU records one fault at a time and drops others while one is pending, so
// tests look for the fault they caused, not for a count.
class KmsgWatch {
 public:
  static Result<KmsgWatch> open();

  // Kernel log lines written since open() (or since the last call).
  std::vector<std::string> new_lines();

  // Waits up to `limit` for a DMAR fault line; with `page` set, one whose
  // fault address lies in that 4 KiB page. Returns the line, or nothing.
  // Lines read while waiting are kept for later calls.
  std::optional<std::string> wait_dmar_fault(std::optional<uint64_t> page,
                                             std::chrono::milliseconds limit = std::chrono::seconds(3));

  // Every line seen so far, for failure messages.
  const std::vector<std::string>& seen() const { return seen_; }

 private:
  explicit KmsgWatch(base::UniqueFd fd) : fd_(std::move(fd)) {}
  base::UniqueFd fd_;
  std::vector<std::string> seen_;
  size_t scanned_ = 0;  // seen_[0..scanned_) were already checked for faults
};

// The fault address in a DMAR fault line, if it is one.
std::optional<uint64_t> parse_dmar_fault(const std::string& line);

}  // namespace dmakit::vmtest
