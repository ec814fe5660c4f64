// VFIO: handing a PCI device and an IOMMU address space to user space.
//
// The VFIO model, in the kernel's own objects:
//   - A *container* (/dev/vfio/vfio) is one IOMMU address space (domain).
//     Its IOVA -> host page table is built with VFIO_IOMMU_MAP_DMA; the
//     kernel pins every mapped page until it is unmapped.
//   - A *group* (/dev/vfio/N) is the set of devices the IOMMU cannot isolate
//     from each other. It is usable only when it is "viable": every member
//     is bound to vfio-pci or to no driver. Groups join a container with
//     VFIO_GROUP_SET_CONTAINER; the IOMMU model (type1v2) can only be set
//     with VFIO_SET_IOMMU once the first group is attached, and mapping is
//     only possible after that.
//   - A *device* fd comes from its group (VFIO_GROUP_GET_DEVICE_FD). Through
//     it: region info, BAR mmap, config space at the config region's offset,
//     and reset.
//
// DMA contract: from the moment map() returns until unmap() returns, the
// device may read (and with kWrite, write) the mapped memory at any time, and
// it reaches every byte through the IOVA. Host memory behind a mapping must
// stay allocated for that whole time. Closing the container drops every
// mapping of it.
//
// Each type below owns exactly one fd (or one mmap) and is move-only;
// Container and VfioDomain are heap objects (they are Domains, which other
// layers reference by address).
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/fd.hpp"
#include "base/error.hpp"
#include "iommu/domain.hpp"
#include "iommu/pci.hpp"

namespace dmakit::iommu::vfio {

// Where the kernel objects live; tests point these into a temp dir.
struct Paths {
  std::string dev = "/dev/vfio";  // holds "vfio" (the container) and one node per group
  std::string sysfs = std::string(pci::kDefaultSysfs);

  std::string container() const { return dev + "/vfio"; }
  std::string group(int number) const { return dev + "/" + std::to_string(number); }
};

class Group;
class Device;

// Container: one IOMMU domain, the owner of /dev/vfio/vfio's fd.
//
// Lifecycle: open() checks the API version and which type1 flavour the
// kernel offers; attach(group) joins a group and, for the first group, sets
// the IOMMU model (type1v2 preferred, type1 fallback; rolled back by
// detaching the group if the kernel refuses) and reads VFIO_IOMMU_GET_INFO
// once into info(). Only then can map() be used.
//
// map()/unmap() pre-check the Domain rules with iommu::check_range so their
// errors agree with the simulated domain; what passes goes to the kernel,
// whose errno (EEXIST overlap, ENOSPC entry limit, ENOMEM pin limit, ...) is
// reported naming the ioctl, iova and len. Live mappings are tracked (iova ->
// len) for stats and to refuse an unmap that would split a mapping the same
// way on type1 and type1v2.
class Container final : public Domain {
  struct PassKey {
    explicit PassKey() = default;
  };

 public:
  static Result<std::unique_ptr<Container>> open(const Paths& paths = {});
  Container(PassKey, base::UniqueFd fd, std::string path, int api_version);
  ~Container() override;

  int fd() const { return fd_.get(); }
  const std::string& path() const { return path_; }
  int api_version() const { return api_version_; }

  // VFIO_CHECK_EXTENSION: does the kernel support this IOMMU type/extension?
  Result<bool> check_extension(unsigned long extension) const;

  // Attaches a group; the first one also sets the IOMMU model and reads the
  // domain info. Groups stay attached until they are closed or detached.
  Status attach(Group& group);

  bool iommu_set() const { return iommu_type_ != 0; }
  uint32_t iommu_type() const { return iommu_type_; }  // VFIO_TYPE1v2_IOMMU, VFIO_TYPE1_IOMMU or 0

  // Domain. info() is empty until the first attach().
  const DomainInfo& info() const override { return info_; }
  Status map(const void* vaddr, uint64_t iova, uint64_t len, uint32_t prot) override;
  Status unmap(uint64_t iova, uint64_t len) override;
  uint64_t dma_avail() const override;  // asks the kernel each time
  DomainStats stats() const override;

  // VFIO_IOMMU_GET_INFO now, parsed (page sizes, IOVA windows, DMA_AVAIL).
  Result<DomainInfo> query_info() const;

 private:
  Status set_iommu();

  base::UniqueFd fd_;
  std::string path_;
  int api_version_ = -1;
  uint32_t iommu_type_ = 0;
  DomainInfo info_;

  mutable std::mutex mu_;
  std::map<uint64_t, uint64_t> live_;  // iova -> len of every live mapping
  uint64_t mapped_bytes_ = 0;
  uint64_t map_calls_ = 0;
  uint64_t unmap_calls_ = 0;
};

// The reply of VFIO_IOMMU_GET_INFO, parsed: buf is the struct and its
// capability chain as the kernel filled them (argsz bytes); iommu_type names
// the backend, path goes into messages. Separate from the ioctl so tests and
// the fuzzer reach it on bytes.
Result<DomainInfo> parse_iommu_info(std::span<const std::byte> buf, uint32_t iommu_type, std::string_view path);

// Group: one IOMMU group, the owner of /dev/vfio/N's fd.
//
// The kernel lets one fd at a time hold a group: a second open of
// /dev/vfio/N fails with EBUSY, reported as Errc::busy. Opening checks
// viability (VFIO_GROUP_GET_STATUS); a group that is not viable is
// Errc::not_viable with every member device and its driver in the message.
// Closing the fd detaches the group from its container.
class Group {
 public:
  static Result<Group> open(int number, const Paths& paths = {});
  // The group of a PCI device, found through sysfs (.../BDF/iommu_group).
  static Result<Group> open_for_device(std::string_view bdf, const Paths& paths = {});

  Group(Group&&) noexcept = default;
  Group& operator=(Group&&) noexcept = default;
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;
  ~Group() = default;

  int number() const { return number_; }
  int fd() const { return fd_.get(); }
  const std::string& path() const { return path_; }
  bool attached() const { return attached_; }

  // VFIO_GROUP_GET_STATUS flags (VFIO_GROUP_FLAGS_VIABLE, _CONTAINER_SET).
  Result<uint32_t> status() const;

  // VFIO_GROUP_SET_CONTAINER / VFIO_GROUP_UNSET_CONTAINER. Container::attach
  // is the normal way in; these are the single steps it uses.
  Status set_container(const Container& container);
  Status unset_container();

  // VFIO_GROUP_GET_DEVICE_FD for a device of this group (needs an IOMMU set
  // on the container).
  Result<Device> open_device(std::string_view bdf) const;

 private:
  Group(base::UniqueFd fd, int number, std::string path, std::string sysfs);
  Status check_viable() const;

  base::UniqueFd fd_;
  int number_ = -1;
  std::string path_;
  std::string sysfs_;
  bool attached_ = false;
};

// One area of a region that may be mmapped (region-relative).
struct MmapArea {
  uint64_t offset = 0;
  uint64_t size = 0;
};

// VFIO_DEVICE_GET_REGION_INFO, parsed.
struct RegionInfo {
  uint32_t index = 0;
  uint32_t flags = 0;      // VFIO_REGION_INFO_FLAG_*
  uint64_t size = 0;
  uint64_t offset = 0;     // where the region starts in the device fd
  // Where mmap is allowed: the whole region when it is mmappable and has no
  // sparse-mmap capability, the listed areas when it has one, else empty.
  std::vector<MmapArea> mmap_areas;
  bool sparse = false;     // VFIO_REGION_INFO_CAP_SPARSE_MMAP was present

  bool readable() const;
  bool writable() const;
  bool mmappable() const;
};

// The reply of VFIO_DEVICE_GET_REGION_INFO for region `index`, parsed: buf is
// the struct and its capability chain as the kernel filled them (argsz
// bytes). A short or malformed reply is read as far as it is in bounds (a
// missing tail reads as zeros). Separate from the ioctl so tests and the
// fuzzer reach it on bytes.
RegionInfo parse_region_info(std::span<const std::byte> buf, uint32_t index);

// VFIO_DEVICE_GET_INFO, parsed.
struct DeviceInfo {
  uint32_t flags = 0;  // VFIO_DEVICE_FLAGS_*
  uint32_t num_regions = 0;
  uint32_t num_irqs = 0;
  bool is_pci() const;
  bool can_reset() const;
};

// A BAR (or part of it) mmapped into this process; unmapped on destruction.
// Accessors are volatile so every load and store reaches the device.
class BarMapping {
 public:
  BarMapping() = default;
  BarMapping(BarMapping&& other) noexcept;
  BarMapping& operator=(BarMapping&& other) noexcept;
  BarMapping(const BarMapping&) = delete;
  BarMapping& operator=(const BarMapping&) = delete;
  ~BarMapping();

  volatile uint8_t* data() const { return static_cast<volatile uint8_t*>(addr_); }
  size_t size() const { return len_; }
  uint32_t bar() const { return bar_; }
  uint64_t offset() const { return offset_; }  // of this mapping inside the BAR

  // Aligned register access; off is relative to this mapping. An access
  // outside the mapping or misaligned is not performed: it is logged as an
  // error, a read returns all ones (what PCI returns for a missing target).
  uint32_t read32(size_t off) const;
  void write32(size_t off, uint32_t value) const;
  uint64_t read64(size_t off) const;
  void write64(size_t off, uint64_t value) const;

 private:
  friend class Device;
  BarMapping(void* addr, size_t len, uint32_t bar, uint64_t offset)
      : addr_(addr), len_(len), bar_(bar), offset_(offset) {}
  void reset() noexcept;

  void* addr_ = nullptr;
  size_t len_ = 0;
  uint32_t bar_ = 0;
  uint64_t offset_ = 0;
};

// "INTx", "MSI", "MSI-X", "error", "request" for a VFIO PCI IRQ index.
const char* irq_name(uint32_t index);

// VFIO_DEVICE_GET_IRQ_INFO, parsed. Index: VFIO_PCI_INTX_IRQ_INDEX (0),
// _MSI_ (1), _MSIX_ (2), ...
struct IrqInfo {
  uint32_t index = 0;
  uint32_t flags = 0;  // VFIO_IRQ_INFO_* (EVENTFD, MASKABLE, AUTOMASKED, NORESIZE)
  uint32_t count = 0;  // vectors; 0 = the device has none of this kind
};

// Device: one VFIO device fd (a PCI function), from Group::open_device.
//
// Interrupts reach user space as eventfd signals: SET_IRQS with
// ACTION_TRIGGER attaches one eventfd per vector, and the kernel's handler
// (which owns the real MSI/MSI-X vector or the INTx line) writes to it.
class Device {
 public:
  Device(Device&&) noexcept = default;
  Device& operator=(Device&&) noexcept = default;
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  ~Device() = default;

  const std::string& bdf() const { return bdf_; }
  int fd() const { return fd_.get(); }
  const DeviceInfo& info() const { return info_; }

  // VFIO_DEVICE_GET_REGION_INFO (with the capability chain) for a region
  // index: BARs 0-5 are VFIO_PCI_BAR0_REGION_INDEX.., config space is
  // VFIO_PCI_CONFIG_REGION_INDEX.
  Result<RegionInfo> region_info(uint32_t index) const;

  // mmaps [offset, offset+len) of BAR `bar` (len 0 = to the end of the BAR).
  // Refused (Errc::unsupported) when the range is not inside one area the
  // kernel allows to mmap; invalid_argument when it is outside the BAR or not
  // page aligned.
  Result<BarMapping> map_bar(uint32_t bar, uint64_t offset = 0, uint64_t len = 0) const;

  // PCI config space through the config region (pread/pwrite at its offset).
  Status read_config(uint64_t off, std::span<std::byte> out) const;
  Status write_config(uint64_t off, std::span<const std::byte> in) const;
  Result<uint16_t> read_config16(uint64_t off) const;
  Result<uint32_t> read_config32(uint64_t off) const;
  Status write_config16(uint64_t off, uint16_t value) const;

  // Sets memory-space (bit 1) and bus-master (bit 2) in the command register
  // (config offset 4). From then on the device can issue DMA.
  Status enable_bus_master() const;
  // Clears bus-master: the device can no longer issue DMA (MMIO still works).
  Status disable_bus_master() const;

  // VFIO_DEVICE_GET_IRQ_INFO for one IRQ index.
  Result<IrqInfo> irq_info(uint32_t index) const;
  // SET_IRQS, DATA_EVENTFD | ACTION_TRIGGER: vectors [start, start + n)
  // signal fds[0..n); an fd of -1 detaches that vector. The first call for
  // an index enables it (MSI/MSI-X: the kernel allocates the vectors).
  Status set_irq_eventfds(uint32_t index, uint32_t start, std::span<const int32_t> fds) const;
  // SET_IRQS, DATA_NONE | ACTION_TRIGGER with count 0: disables the index
  // and releases every vector and eventfd binding of it.
  Status disable_irqs(uint32_t index) const;
  // SET_IRQS, DATA_NONE | ACTION_MASK or ACTION_UNMASK for one vector (the
  // kernel supports this for INTx only).
  Status mask_irq(uint32_t index, uint32_t vector, bool masked) const;

  // VFIO_DEVICE_RESET (function-level or equivalent reset).
  Status reset() const;

 private:
  friend class Group;
  Device(base::UniqueFd fd, std::string bdf, DeviceInfo info, uint64_t config_offset,
         uint64_t config_size);

  base::UniqueFd fd_;
  std::string bdf_;
  DeviceInfo info_;
  uint64_t config_offset_ = 0;  // config region's offset in the device fd
  uint64_t config_size_ = 0;
};

// VfioDomain: a container with the groups of the given devices attached;
// what core::Context uses for iommu.backend = vfio. Owns the container and
// the groups (groups close first, then the container). Devices it opens are
// owned by the caller.
//
// Groups may join and leave while mappings exist: a group that joins a
// container whose IOMMU is set gets every existing mapping replayed into its
// domain by the kernel; a group that leaves loses them. The last group may
// not leave (the container would drop its IOMMU and every mapping with it).
class VfioDomain final : public Domain {
  struct PassKey {
    explicit PassKey() = default;
  };

 public:
  explicit VfioDomain(PassKey) {}
  static Result<std::unique_ptr<VfioDomain>> open(std::span<const std::string> bdfs,
                                                  const Paths& paths = {});
  static Result<std::unique_ptr<VfioDomain>> open(std::string_view bdf, const Paths& paths = {});
  ~VfioDomain() override;

  // A device of one of the attached groups.
  Result<Device> open_device(std::string_view bdf) const;

  // Attaches the group of bdf (nothing to do when it is attached; bdf is
  // then remembered as named). Errors name the device and the group.
  Status attach(std::string_view bdf);
  // Detaches the group of bdf: Errc::not_found when it is not attached,
  // Errc::busy when it is the last group. The caller closes the group's
  // devices first (the kernel refuses with EBUSY otherwise).
  Status detach(std::string_view bdf);
  // The IOMMU group of bdf when it is attached, else Errc::not_found.
  Result<int> attached_group(std::string_view bdf) const;
  // Canonical BDFs named at open() and attach(), in that order.
  std::vector<std::string> devices() const;
  size_t group_count() const;

  Container& container() { return *container_; }

  const DomainInfo& info() const override { return container_->info(); }
  Status map(const void* vaddr, uint64_t iova, uint64_t len, uint32_t prot) override {
    return container_->map(vaddr, iova, len, prot);
  }
  Status unmap(uint64_t iova, uint64_t len) override { return container_->unmap(iova, len); }
  uint64_t dma_avail() const override { return container_->dma_avail(); }
  DomainStats stats() const override { return container_->stats(); }
  std::optional<HostRun> translate_host(const void* vaddr) const override {
    return container_->translate_host(vaddr);
  }

 private:
  struct Member {
    Group group;
    std::vector<std::string> bdfs;  // devices of the group named by the caller
  };
  Status attach_locked(const std::string& bdf, int number);

  std::unique_ptr<Container> container_;
  mutable std::mutex mu_;  // members_
  std::vector<Member> members_;
  Paths paths_;
};

// What `dmakit info` shows about VFIO. Absence of VFIO is a normal answer,
// not an error: present = false with the reason.
struct GroupReport {
  int number = -1;
  std::vector<pci::GroupMember> members;
  bool all_vfio = false;             // every member bound to vfio-pci
  std::optional<bool> viable;        // VFIO_GROUP_GET_STATUS, when the group could be opened
  std::optional<DomainInfo> iommu;   // page sizes, windows, DMA_AVAIL of a container with this group
  std::string error;                 // why the group could not be probed ("" = fine)
};

struct VfioReport {
  bool present = false;      // /dev/vfio/vfio could be opened
  std::string reason;        // why not, when !present
  int api_version = -1;
  bool type1 = false;
  bool type1v2 = false;
  bool noiommu = false;
  std::vector<GroupReport> groups;  // every IOMMU group in sysfs
};

// Lists every IOMMU group with its devices and drivers; for groups whose
// members are all on vfio-pci, opens a throw-away container to read the
// IOMMU info. Fails only when sysfs cannot be read at all.
Result<VfioReport> probe_vfio(const Paths& paths = {});

}  // namespace dmakit::iommu::vfio
