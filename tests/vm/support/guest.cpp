#include "guest.hpp"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <thread>
#include <utility>

namespace dmakit::vmtest {

std::string check_disk_pattern(std::span<const std::byte> bytes, uint64_t first_lba) {
  if (bytes.size() % kLbaSize != 0)
    return fmt::format("{} bytes is not a whole number of {}-byte LBAs", bytes.size(), kLbaSize);
  for (size_t off = 0; off < bytes.size(); off += sizeof(uint64_t)) {
    const uint64_t want = first_lba + off / kLbaSize;
    uint64_t got = 0;
    std::memcpy(&got, bytes.data() + off, sizeof got);
    if (got != want)
      return fmt::format("byte {}: found {:#x}, want LBA {:#x} (buffer starts at LBA {})", off, got, want,
                         first_lba);
  }
  return "";
}

Result<DmaMemory> DmaMemory::allocate(size_t len) {
  if (len == 0 || len % 4096 != 0)
    return fail(Errc::invalid_argument, "DMA memory of {} bytes: want a positive multiple of 4096", len);
  // MAP_POPULATE: touch every page now, so the test measures nothing lazy
  // and VFIO pins pages that already exist.
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) return fail_errno(errno, "mmap of {} bytes of DMA memory", len);
  return DmaMemory(p, len);
}

DmaMemory::DmaMemory(DmaMemory&& other) noexcept
    : addr_(std::exchange(other.addr_, nullptr)), len_(std::exchange(other.len_, 0)) {}

DmaMemory& DmaMemory::operator=(DmaMemory&& other) noexcept {
  if (this != &other) {
    if (addr_ != nullptr) munmap(addr_, len_);
    addr_ = std::exchange(other.addr_, nullptr);
    len_ = std::exchange(other.len_, 0);
  }
  return *this;
}

DmaMemory::~DmaMemory() {
  if (addr_ != nullptr) munmap(addr_, len_);
}

void DmaMemory::fill(uint8_t value) const {
  // Volatile: the device, not the compiler, decides what is in DMA memory.
  auto* p = static_cast<volatile uint8_t*>(addr_);
  for (size_t i = 0; i < len_; ++i) p[i] = value;
}

bool DmaMemory::all_equal(uint8_t value) const {
  auto* p = static_cast<const volatile uint8_t*>(addr_);
  for (size_t i = 0; i < len_; ++i)
    if (p[i] != value) return false;
  return true;
}

Result<KmsgWatch> KmsgWatch::open() {
  base::UniqueFd fd(::open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  if (!fd) return fail_errno(errno, "open /dev/kmsg");
  // Start at the end: only what the test causes from now on counts.
  if (lseek(fd.get(), 0, SEEK_END) < 0) return fail_errno(errno, "lseek(SEEK_END) on /dev/kmsg");
  return KmsgWatch(std::move(fd));
}

std::vector<std::string> KmsgWatch::new_lines() {
  std::vector<std::string> lines;
  // Each read returns one record: "prio,seq,time,flags;text\n" plus
  // continuation lines; a too-small buffer is EINVAL, so use a generous one.
  char buf[8192];
  for (;;) {
    const ssize_t n = ::read(fd_.get(), buf, sizeof buf - 1);
    if (n < 0) {
      if (errno == EPIPE) continue;  // records were overwritten; go on from the next one
      break;                         // EAGAIN: nothing more right now
    }
    std::string rec(buf, static_cast<size_t>(n));
    const size_t semi = rec.find(';');
    std::string text = semi == std::string::npos ? rec : rec.substr(semi + 1);
    if (const size_t nl = text.find('\n'); nl != std::string::npos) text.resize(nl);
    lines.push_back(text);
  }
  seen_.insert(seen_.end(), lines.begin(), lines.end());
  return lines;
}

std::optional<uint64_t> parse_dmar_fault(const std::string& line) {
  if (line.find("DMAR") == std::string::npos) return std::nullopt;
  static constexpr std::string_view kKey = "fault addr ";
  const size_t at = line.find(kKey);
  if (at == std::string::npos) return std::nullopt;
  const std::string rest = line.substr(at + kKey.size());
  char* end = nullptr;
  errno = 0;
  const unsigned long long addr = std::strtoull(rest.c_str(), &end, 16);
  if (end == rest.c_str() || errno != 0) return std::nullopt;
  return addr;
}

std::optional<std::string> KmsgWatch::wait_dmar_fault(std::optional<uint64_t> page,
                                                      std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    new_lines();
    for (; scanned_ < seen_.size(); ++scanned_) {
      const auto addr = parse_dmar_fault(seen_[scanned_]);
      if (!addr) continue;
      if (!page || (*addr & ~uint64_t{0xfff}) == (*page & ~uint64_t{0xfff})) return seen_[scanned_++];
    }
    // The fault is reported from the IOMMU's interrupt, shortly after the DMA.
    if (std::chrono::steady_clock::now() > deadline) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace dmakit::vmtest
