// vfio::Device: one PCI function through its VFIO device fd.
#include <linux/pci_regs.h>
#include <linux/vfio.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "base/log.hpp"
#include "iommu/vfio.hpp"

namespace dmakit::iommu::vfio {

bool RegionInfo::readable() const { return flags & VFIO_REGION_INFO_FLAG_READ; }
bool RegionInfo::writable() const { return flags & VFIO_REGION_INFO_FLAG_WRITE; }
bool RegionInfo::mmappable() const { return flags & VFIO_REGION_INFO_FLAG_MMAP; }
bool DeviceInfo::is_pci() const { return flags & VFIO_DEVICE_FLAGS_PCI; }
bool DeviceInfo::can_reset() const { return flags & VFIO_DEVICE_FLAGS_RESET; }

const char* irq_name(uint32_t index) {
  switch (index) {
    case VFIO_PCI_INTX_IRQ_INDEX: return "INTx";
    case VFIO_PCI_MSI_IRQ_INDEX: return "MSI";
    case VFIO_PCI_MSIX_IRQ_INDEX: return "MSI-X";
    case VFIO_PCI_ERR_IRQ_INDEX: return "error";
    case VFIO_PCI_REQ_IRQ_INDEX: return "request";
    default: return "unknown";
  }
}

// ---- BarMapping -------------------------------------------------------------

BarMapping::BarMapping(BarMapping&& other) noexcept
    : addr_(std::exchange(other.addr_, nullptr)),
      len_(std::exchange(other.len_, 0)),
      bar_(other.bar_),
      offset_(other.offset_) {}

BarMapping& BarMapping::operator=(BarMapping&& other) noexcept {
  if (this != &other) {
    reset();
    addr_ = std::exchange(other.addr_, nullptr);
    len_ = std::exchange(other.len_, 0);
    bar_ = other.bar_;
    offset_ = other.offset_;
  }
  return *this;
}

BarMapping::~BarMapping() { reset(); }

void BarMapping::reset() noexcept {
  if (addr_ != nullptr) ::munmap(addr_, len_);
  addr_ = nullptr;
  len_ = 0;
}

namespace {

bool access_ok(size_t off, size_t width, size_t len, uint32_t bar) {
  if (off % width == 0 && off + width <= len && off + width > off) return true;
  base::log().error("BAR{} access of {} bytes at {:#x} refused: outside the {:#x}-byte mapping or misaligned",
                    bar, width, off, len);
  return false;
}

}  // namespace

uint32_t BarMapping::read32(size_t off) const {
  if (!access_ok(off, 4, len_, bar_)) return 0xffffffffu;
  return *reinterpret_cast<volatile uint32_t*>(data() + off);
}

void BarMapping::write32(size_t off, uint32_t value) const {
  if (access_ok(off, 4, len_, bar_)) *reinterpret_cast<volatile uint32_t*>(data() + off) = value;
}

uint64_t BarMapping::read64(size_t off) const {
  if (!access_ok(off, 8, len_, bar_)) return ~0ull;
  return *reinterpret_cast<volatile uint64_t*>(data() + off);
}

void BarMapping::write64(size_t off, uint64_t value) const {
  if (access_ok(off, 8, len_, bar_)) *reinterpret_cast<volatile uint64_t*>(data() + off) = value;
}

// ---- Device -----------------------------------------------------------------

Device::Device(base::UniqueFd fd, std::string bdf, DeviceInfo info, uint64_t config_offset,
               uint64_t config_size)
    : fd_(std::move(fd)),
      bdf_(std::move(bdf)),
      info_(info),
      config_offset_(config_offset),
      config_size_(config_size) {}

Result<RegionInfo> Device::region_info(uint32_t index) const {
  if (index >= info_.num_regions)
    return fail(Errc::invalid_argument, "{}: region {} does not exist (the device has {})", bdf_, index,
                info_.num_regions);
  // As with the IOMMU info, capabilities follow the struct and argsz tells
  // how much room the kernel needs for them.
  std::vector<uint64_t> storage((sizeof(vfio_region_info) + 7) / 8);
  vfio_region_info* ri = nullptr;
  for (int attempt = 0;; ++attempt) {
    ri = reinterpret_cast<vfio_region_info*>(storage.data());
    std::memset(ri, 0, storage.size() * 8);
    ri->argsz = static_cast<uint32_t>(storage.size() * 8);
    ri->index = index;
    if (::ioctl(fd_.get(), VFIO_DEVICE_GET_REGION_INFO, ri) != 0)
      return fail_errno(errno, "VFIO_DEVICE_GET_REGION_INFO region {} of {}", index, bdf_);
    if (ri->argsz <= storage.size() * 8) break;
    if (attempt == 4 || ri->argsz > (1u << 20))
      return fail(Errc::io, "VFIO_DEVICE_GET_REGION_INFO region {} of {}: argsz keeps growing ({})", index,
                  bdf_, ri->argsz);
    storage.resize((ri->argsz + 7) / 8);
  }
  const auto* bytes = reinterpret_cast<const std::byte*>(storage.data());
  return parse_region_info({bytes, std::min<size_t>(ri->argsz, storage.size() * 8)}, index);
}

RegionInfo parse_region_info(std::span<const std::byte> buf, uint32_t index) {
  vfio_region_info fixed{};
  if (!buf.empty()) std::memcpy(&fixed, buf.data(), std::min(buf.size(), sizeof fixed));
  const vfio_region_info* ri = &fixed;
  const std::byte* bytes = buf.data();
  const size_t filled = buf.size();
  RegionInfo out;
  out.index = index;
  out.flags = ri->flags;
  out.size = ri->size;
  out.offset = ri->offset;

  if ((ri->flags & VFIO_REGION_INFO_FLAG_CAPS) && ri->cap_offset != 0) {
    uint32_t off = ri->cap_offset;
    for (int guard = 0; off != 0 && guard < 64; ++guard) {
      vfio_info_cap_header hdr;
      if (off + sizeof hdr > filled) break;
      std::memcpy(&hdr, bytes + off, sizeof hdr);
      if (hdr.id == VFIO_REGION_INFO_CAP_SPARSE_MMAP) {
        // Only these areas may be mmapped (e.g. not the MSI-X table page).
        vfio_region_info_cap_sparse_mmap head;
        if (off + sizeof head <= filled) {
          std::memcpy(&head, bytes + off, sizeof head);
          out.sparse = true;
          for (uint32_t i = 0; i < head.nr_areas; ++i) {
            const size_t at = off + sizeof head + i * sizeof(vfio_region_sparse_mmap_area);
            if (at + sizeof(vfio_region_sparse_mmap_area) > filled) break;
            vfio_region_sparse_mmap_area a;
            std::memcpy(&a, bytes + at, sizeof a);
            if (a.size != 0) out.mmap_areas.push_back({a.offset, a.size});
          }
        }
      }
      if (hdr.next <= off) break;
      off = hdr.next;
    }
  }
  if (!out.mmappable()) out.mmap_areas.clear();
  else if (!out.sparse && out.size != 0) out.mmap_areas.push_back({0, out.size});
  return out;
}

Result<BarMapping> Device::map_bar(uint32_t bar, uint64_t offset, uint64_t len) const {
  if (bar > VFIO_PCI_BAR5_REGION_INDEX)
    return fail(Errc::invalid_argument, "{}: BAR{} does not exist (BARs are 0-5)", bdf_, bar);
  const RegionInfo ri = DMAKIT_TRY(region_info(VFIO_PCI_BAR0_REGION_INDEX + bar));
  if (ri.size == 0) return fail(Errc::not_found, "{}: BAR{} is not implemented by the device", bdf_, bar);
  if (len == 0 && offset < ri.size) len = ri.size - offset;
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  if (offset >= ri.size || len > ri.size - offset)
    return fail(Errc::invalid_argument, "{}: BAR{} range {:#x}+{:#x} is outside the {:#x}-byte BAR", bdf_, bar,
                offset, len, ri.size);
  if (offset % page != 0)
    return fail(Errc::invalid_argument, "{}: BAR{} offset {:#x} is not page aligned", bdf_, bar, offset);
  bool allowed = false;
  for (const auto& a : ri.mmap_areas) allowed |= offset >= a.offset && offset + len <= a.offset + a.size;
  if (!allowed) {
    std::string areas;
    for (const auto& a : ri.mmap_areas) areas += fmt::format(" {:#x}+{:#x}", a.offset, a.size);
    return fail(Errc::unsupported, "{}: BAR{} range {:#x}+{:#x} may not be mmapped (allowed:{})", bdf_, bar,
                offset, len, areas.empty() ? " none" : areas);
  }
  const int prot = (ri.readable() ? PROT_READ : 0) | (ri.writable() ? PROT_WRITE : 0);
  // The region's offset in the device fd selects the BAR; the kernel maps the
  // BAR's physical pages, so loads and stores here go to the device.
  void* p = ::mmap(nullptr, len, prot, MAP_SHARED, fd_.get(), static_cast<off_t>(ri.offset + offset));
  if (p == MAP_FAILED)
    return fail_errno(errno, "mmap BAR{} {:#x}+{:#x} of {}", bar, offset, len, bdf_);
  return BarMapping(p, len, bar, offset);
}

namespace {

// One config space access of exactly buf.size() bytes at off, through the
// region VFIO exposes at `base` (io is pread or pwrite): refused outside the
// config space, and a short transfer is an error rather than partial data.
template <class Span, class Io>
Status config_access(const char* verb, const std::string& bdf, int fd, uint64_t base, uint64_t size,
                     uint64_t off, Span buf, Io io) {
  if (off > size || buf.size() > size - off)
    return fail(Errc::invalid_argument, "{}: config {} {:#x}+{} is outside the {:#x}-byte config space", bdf,
                verb, off, buf.size(), size);
  const ssize_t n = io(fd, buf.data(), buf.size(), static_cast<off_t>(base + off));
  if (n < 0) return fail_errno(errno, "{} config space {:#x}+{} of {}", verb, off, buf.size(), bdf);
  if (static_cast<size_t>(n) != buf.size())
    return fail(Errc::io, "short {} of config space {:#x}+{} of {} ({} bytes)", verb, off, buf.size(), bdf, n);
  return ok();
}

}  // namespace

Status Device::read_config(uint64_t off, std::span<std::byte> out) const {
  return config_access("read", bdf_, fd_.get(), config_offset_, config_size_, off, out, ::pread);
}

Status Device::write_config(uint64_t off, std::span<const std::byte> in) const {
  return config_access("write", bdf_, fd_.get(), config_offset_, config_size_, off, in, ::pwrite);
}

// PCI config space is little-endian, like every host dmakit runs on (x86-64, arm64 LE).
Result<uint16_t> Device::read_config16(uint64_t off) const {
  uint16_t v = 0;
  DMAKIT_TRY(read_config(off, std::as_writable_bytes(std::span(&v, 1))));
  return v;
}

Result<uint32_t> Device::read_config32(uint64_t off) const {
  uint32_t v = 0;
  DMAKIT_TRY(read_config(off, std::as_writable_bytes(std::span(&v, 1))));
  return v;
}

Status Device::write_config16(uint64_t off, uint16_t value) const {
  return write_config(off, std::as_bytes(std::span(&value, 1)));
}

Status Device::enable_bus_master() const {
  const uint16_t cmd = DMAKIT_TRY(read_config16(PCI_COMMAND));
  constexpr uint16_t kBits = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;  // bits 1 and 2
  const auto want = static_cast<uint16_t>(cmd | kBits);
  if (want != cmd) DMAKIT_TRY(write_config16(PCI_COMMAND, want));
  const uint16_t now = DMAKIT_TRY(read_config16(PCI_COMMAND));
  if ((now & kBits) != kBits)
    return fail(Errc::io, "{}: command register reads {:#x} after setting memory space and bus master", bdf_,
                now);
  return ok();
}

Status Device::disable_bus_master() const {
  const uint16_t cmd = DMAKIT_TRY(read_config16(PCI_COMMAND));
  if ((cmd & PCI_COMMAND_MASTER) == 0) return ok();
  return write_config16(PCI_COMMAND, static_cast<uint16_t>(cmd & ~PCI_COMMAND_MASTER));
}

namespace {

// vfio_irq_set is followed by its data (here: one int32 eventfd per vector).
Status set_irqs(int fd, const std::string& bdf, uint32_t index, uint32_t flags, uint32_t start, uint32_t count,
                std::span<const int32_t> fds, const char* what) {
  std::vector<uint64_t> storage((sizeof(vfio_irq_set) + fds.size_bytes() + 7) / 8);
  auto* set = reinterpret_cast<vfio_irq_set*>(storage.data());
  set->argsz = static_cast<uint32_t>(sizeof(vfio_irq_set) + fds.size_bytes());
  set->flags = flags;
  set->index = index;
  set->start = start;
  set->count = count;
  if (!fds.empty()) std::memcpy(set->data, fds.data(), fds.size_bytes());
  if (::ioctl(fd, VFIO_DEVICE_SET_IRQS, set) != 0)
    return fail_errno(errno, "VFIO_DEVICE_SET_IRQS ({}) {} vectors {}+{} of {}", what, irq_name(index), start, count,
                      bdf);
  return ok();
}

}  // namespace

Result<IrqInfo> Device::irq_info(uint32_t index) const {
  if (index >= info_.num_irqs)
    return fail(Errc::invalid_argument, "{}: IRQ index {} does not exist (the device has {})", bdf_, index,
                info_.num_irqs);
  vfio_irq_info ii{};
  ii.argsz = sizeof ii;
  ii.index = index;
  if (::ioctl(fd_.get(), VFIO_DEVICE_GET_IRQ_INFO, &ii) != 0)
    return fail_errno(errno, "VFIO_DEVICE_GET_IRQ_INFO {} of {}", irq_name(index), bdf_);
  return IrqInfo{index, ii.flags, ii.count};
}

Status Device::set_irq_eventfds(uint32_t index, uint32_t start, std::span<const int32_t> fds) const {
  return set_irqs(fd_.get(), bdf_, index, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, start,
                  static_cast<uint32_t>(fds.size()), fds, "trigger");
}

Status Device::disable_irqs(uint32_t index) const {
  return set_irqs(fd_.get(), bdf_, index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, {},
                  "disable");
}

Status Device::mask_irq(uint32_t index, uint32_t vector, bool masked) const {
  const uint32_t action = masked ? VFIO_IRQ_SET_ACTION_MASK : VFIO_IRQ_SET_ACTION_UNMASK;
  return set_irqs(fd_.get(), bdf_, index, VFIO_IRQ_SET_DATA_NONE | action, vector, 1, {},
                  masked ? "mask" : "unmask");
}

Status Device::reset() const {
  if (!info_.can_reset())
    return fail(Errc::unsupported, "{}: VFIO reports no reset method for this device", bdf_);
  if (::ioctl(fd_.get(), VFIO_DEVICE_RESET) != 0) return fail_errno(errno, "VFIO_DEVICE_RESET on {}", bdf_);
  return ok();
}

}  // namespace dmakit::iommu::vfio
