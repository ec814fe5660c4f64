// dmakit C++ API: RAII types over the C API's handles (dmakit.h).
//
// Every type here owns one C handle and frees it in its destructor; all are
// move-only. Errors are values: Result<T> (std::expected) carrying a
// dmakit::Error with the code and the message dmakit_last_error() gave.
// Nothing throws. The types expose only dmakit.h: no DPDK, spdlog, CLI11
// or fmt reaches a program that includes this header, and the library's
// ABI is the C one.
//
// Lifetimes: a Context owns its IOMMU domain and everything allocated in
// it. Destroy Buffers and Pools before their Context; one that outlives it
// holds a stale handle, and its calls return Errc::invalid_argument (never a
// crash), but its memory is not reused until the process ends.
//
// The DMA contract and thread-safety rules are those of dmakit.h: from the
// moment an IOVA is returned the device may read and write that memory at
// any time until it is freed; calls on different objects may run
// concurrently, and a Pool may be used from many threads at once.
#ifndef DMAKIT_DMAKIT_HPP
#define DMAKIT_DMAKIT_HPP

#include <cerrno>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dmakit/dmakit.h"
#include "dmakit/error.hpp"

namespace dmakit {

namespace detail {
// The error of a failed C call: its code and this thread's last message
// (without the message when there is no host memory to copy it).
inline Error c_error(int rc) noexcept {
  Error e{static_cast<Errc>(-rc), 0, {}};
  try {
    e.message = dmakit_last_error();
  } catch (...) {
  }
  return e;
}
// Runs f, whose result is a Result; out of host memory, Errc::no_memory
// instead of the exception: no call of this header throws.
template <class F>
auto no_throw(F&& f) noexcept -> decltype(f()) {
  try {
    return f();
  } catch (...) {
    return std::unexpected(Error{Errc::no_memory, ENOMEM, {}});
  }
}
inline Status status(int rc) {
  if (rc != DMAKIT_OK) return std::unexpected(c_error(rc));
  return {};
}

// Owns one C handle and ends it with End when destroyed; move-only.
template <class H, int (*End)(H*)>
class Owned {
 public:
  Owned() = default;
  explicit Owned(H* h) : h_(h) {}
  Owned(Owned&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  Owned& operator=(Owned&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, nullptr);
    }
    return *this;
  }
  ~Owned() { reset(); }
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;

  explicit operator bool() const { return h_ != nullptr; }
  H* c_handle() const { return h_; }

 protected:
  void reset() {
    if (h_ != nullptr) (void)End(std::exchange(h_, nullptr));
  }
  H* h_ = nullptr;
};
}  // namespace detail

// One block of a DMA pool: its host address and the IOVA the device uses.
struct Block {
  void* vaddr = nullptr;
  uint64_t iova = 0;
};

// What dmakit_vtophys answers: the IOVA of an address and how many bytes
// from there are contiguous in host memory and IOVA.
struct Translation {
  uint64_t iova = 0;
  uint64_t len = 0;
};

// Buffer request options; see dmakit_buffer_alloc.
struct BufferOptions {
  uint64_t align = 0;           // IOVA alignment, a power of two; 0 = 4 KiB
  bool zeroed = false;
  bool device_read = true;      // the device may read it
  bool device_write = true;     // the device may write it
  uint64_t dma_limit = UINT64_MAX;  // highest IOVA any byte may have
};

// A DMA buffer: host memory with one contiguous IOVA range. Freed (returned
// for reuse) by its destructor.
class Buffer : public detail::Owned<dmakit_buffer, dmakit_buffer_free> {
 public:
  using Owned::Owned;

  uint64_t iova() const { return dmakit_buffer_iova(h_); }
  uint64_t size() const { return dmakit_buffer_size(h_); }
  void* vaddr() const { return dmakit_buffer_vaddr(h_); }
  // Host address of byte offset; nullptr past the end.
  void* at(uint64_t offset) const { return dmakit_buffer_at(h_, offset); }
  // Pieces contiguous in host memory and IOVA, in IOVA order.
  Result<std::vector<dmakit_segment>> segments() const {
    return detail::no_throw([&]() -> Result<std::vector<dmakit_segment>> {
      size_t n = 0;
      int rc = dmakit_buffer_segments(h_, nullptr, 0, &n);
      if (rc != DMAKIT_OK && rc != DMAKIT_ENOSPC) return std::unexpected(detail::c_error(rc));
      std::vector<dmakit_segment> out(n);
      rc = dmakit_buffer_segments(h_, out.data(), out.size(), &n);
      if (rc != DMAKIT_OK) return std::unexpected(detail::c_error(rc));
      return out;
    });
  }
  // Frees the buffer now; the device must no longer use its IOVA.
  Status free() {
    if (h_ == nullptr) return {};
    int rc = dmakit_buffer_free(std::exchange(h_, nullptr));
    if (rc != DMAKIT_OK) return std::unexpected(detail::c_error(rc));
    return {};
  }
};

// A DMA pool of fixed-size blocks (the kernel's dma_pool semantics).
// Destroyed by its destructor; blocks still allocated then stay reserved.
class Pool : public detail::Owned<dmakit_pool, dmakit_pool_destroy> {
 public:
  using Owned::Owned;

  // O(1), no lock or allocation on the common path; any thread.
  Result<Block> alloc() {
    Block b;
    int rc = dmakit_pool_alloc(h_, &b.vaddr, &b.iova);
    if (rc != DMAKIT_OK) [[unlikely]]
      return std::unexpected(detail::c_error(rc));
    return b;
  }
  Result<Block> alloc_zeroed() {
    Block b;
    int rc = dmakit_pool_alloc_zeroed(h_, &b.vaddr, &b.iova);
    if (rc != DMAKIT_OK) [[unlikely]]
      return std::unexpected(detail::c_error(rc));
    return b;
  }
  // Validated: a double free, foreign address or wrong IOVA is
  // Errc::corrupted and changes nothing.
  Status free(const Block& b) { return free(b.vaddr, b.iova); }
  Status free(void* vaddr, uint64_t iova) {
    int rc = dmakit_pool_free(h_, vaddr, iova);
    if (rc != DMAKIT_OK) [[unlikely]]
      return std::unexpected(detail::c_error(rc));
    return {};
  }
  Result<dmakit_pool_stats> stats() const {
    dmakit_pool_stats s{};
    s.struct_size = sizeof s;
    int rc = dmakit_pool_get_stats(h_, &s);
    if (rc != DMAKIT_OK) return std::unexpected(detail::c_error(rc));
    return s;
  }
};

// A BAR mapped into the process (owned by its Device, valid while the
// Device is open). Every access is bounds and alignment checked: a refused
// read returns all ones, a refused write does nothing, and both are logged
// and left in dmakit_last_error().
class Bar {
 public:
  Bar() = default;
  explicit Bar(const dmakit_bar& b) : b_(b) {}
  uint32_t read32(uint64_t off) const { return dmakit_mmio_read32(&b_, off); }
  uint64_t read64(uint64_t off) const { return dmakit_mmio_read64(&b_, off); }
  void write32(uint64_t off, uint32_t v) const { dmakit_mmio_write32(&b_, off, v); }
  void write64(uint64_t off, uint64_t v) const { dmakit_mmio_write64(&b_, off, v); }
  uint64_t size() const { return b_.size; }
  uint32_t index() const { return b_.index; }
  const dmakit_bar& c_bar() const { return b_; }

 private:
  dmakit_bar b_{};
};

enum class IrqType : int { intx = DMAKIT_IRQ_INTX, msi = DMAKIT_IRQ_MSI, msix = DMAKIT_IRQ_MSIX };

// A PCI function opened through VFIO in a Context's IOMMU domain. Closed by
// its destructor (interrupts off, bus mastering off, BARs unmapped).
class Device : public detail::Owned<dmakit_device, dmakit_device_close> {
 public:
  using Owned::Owned;

  std::string_view bdf() const {
    const char* b = dmakit_device_bdf(h_);
    return b != nullptr ? b : "";
  }
  Result<dmakit_region_info> region_info(uint32_t index) const {
    dmakit_region_info r{};
    r.struct_size = sizeof r;
    if (int rc = dmakit_device_region_info(h_, index, &r); rc != DMAKIT_OK)
      return std::unexpected(detail::c_error(rc));
    return r;
  }
  Result<Bar> map_bar(uint32_t bar) {
    dmakit_bar b{};
    if (int rc = dmakit_device_map_bar(h_, bar, &b); rc != DMAKIT_OK) return std::unexpected(detail::c_error(rc));
    return Bar(b);
  }
  Status config_read(uint64_t off, void* buf, size_t len) const {
    return detail::status(dmakit_device_config_read(h_, off, buf, len));
  }
  Status config_write(uint64_t off, const void* buf, size_t len) {
    return detail::status(dmakit_device_config_write(h_, off, buf, len));
  }
  template <class T>
  Result<T> config_read(uint64_t off) const {
    T v{};
    if (int rc = dmakit_device_config_read(h_, off, &v, sizeof v); rc != DMAKIT_OK)
      return std::unexpected(detail::c_error(rc));
    return v;
  }
  Status set_bus_master(bool enable) { return detail::status(dmakit_device_set_bus_master(h_, enable ? 1 : 0)); }
  Status reset() { return detail::status(dmakit_device_reset(h_)); }

  Result<uint32_t> irq_count(IrqType t) const {
    uint32_t n = 0;
    if (int rc = dmakit_device_irq_count(h_, static_cast<int>(t), &n); rc != DMAKIT_OK)
      return std::unexpected(detail::c_error(rc));
    return n;
  }
  // Enables vectors [0, count); returns their eventfds (owned by the device).
  Result<std::vector<int>> irq_enable(IrqType t, uint32_t count) {
    return detail::no_throw([&]() -> Result<std::vector<int>> {
      std::vector<int> fds(count, -1);
      if (int rc = dmakit_device_irq_enable(h_, static_cast<int>(t), count, fds.data()); rc != DMAKIT_OK)
        return std::unexpected(detail::c_error(rc));
      return fds;
    });
  }
  Status irq_disable(IrqType t) { return detail::status(dmakit_device_irq_disable(h_, static_cast<int>(t))); }
  Status irq_mask(IrqType t, uint32_t vector) {
    return detail::status(dmakit_device_irq_mask(h_, static_cast<int>(t), vector));
  }
  Status irq_unmask(IrqType t, uint32_t vector) {
    return detail::status(dmakit_device_irq_unmask(h_, static_cast<int>(t), vector));
  }
  // Waits for one vector (timeout_ms -1 = no limit); the interrupts counted
  // since the last wait. Errc::timeout when none came.
  Result<uint64_t> irq_wait(IrqType t, uint32_t vector, int timeout_ms) {
    uint64_t n = 0;
    if (int rc = dmakit_device_irq_wait(h_, static_cast<int>(t), vector, timeout_ms, &n); rc != DMAKIT_OK)
      return std::unexpected(detail::c_error(rc));
    return n;
  }
};

// One IOMMU domain and everything allocated in it.
class Context : public detail::Owned<dmakit_ctx, dmakit_ctx_destroy> {
 public:
  // From a settings struct (fill it with dmakit_settings_init first).
  // buffer_slab_max and buffer_isolation choose between the two exposure
  // models (dmakit.h, "DMA contract"): small buffers from shared slab
  // mappings and recycling (default), or a mapping per buffer whose memory
  // has no new owner before its unmap (isolation). Example:
  //   dmakit_settings s;
  //   dmakit_settings_init(&s);
  //   s.buffer_isolation = 1;
  //   auto ctx = dmakit::Context::create(s);
  static Result<Context> create(const dmakit_settings& s) {
    dmakit_ctx* h = nullptr;
    int rc = dmakit_ctx_create_with(&s, &h);
    if (rc != DMAKIT_OK) return std::unexpected(detail::c_error(rc));
    return Context(h);
  }
  // From a TOML file ("" for the defaults) plus overrides such as
  // {"--iommu.backend", "sim"}.
  static Result<Context> create(const std::string& config_file, std::span<const std::string> overrides = {}) {
    return detail::no_throw([&]() -> Result<Context> {
      std::vector<const char*> argv;
      argv.reserve(overrides.size());
      for (const auto& o : overrides) argv.push_back(o.c_str());
      dmakit_ctx* h = nullptr;
      int rc = dmakit_ctx_create(config_file.empty() ? nullptr : config_file.c_str(), static_cast<int>(argv.size()),
                                 argv.empty() ? nullptr : argv.data(), &h);
      if (rc != DMAKIT_OK) return std::unexpected(detail::c_error(rc));
      return Context(h);
    });
  }

  // "sim", "vfio-type1v2" or "vfio-type1".
  std::string_view backend() const {
    const char* b = dmakit_ctx_backend(h_);
    return b != nullptr ? b : "";
  }

  Result<Buffer> alloc_buffer(uint64_t len, const BufferOptions& o = {}) {
    if (!o.device_read && !o.device_write)
      return detail::no_throw([]() -> Result<Buffer> {
        return std::unexpected(Error{Errc::invalid_argument, 0,
                                     "alloc_buffer: BufferOptions lets the device neither read nor write"});
      });
    uint32_t flags = (o.zeroed ? DMAKIT_BUF_ZEROED : 0u) | (o.device_read ? DMAKIT_BUF_DEVICE_READ : 0u) |
                     (o.device_write ? DMAKIT_BUF_DEVICE_WRITE : 0u);
    dmakit_buffer* b = nullptr;
    int rc = dmakit_buffer_alloc(h_, len, o.align, flags, o.dma_limit, &b);
    if (rc != DMAKIT_OK) return std::unexpected(detail::c_error(rc));
    return Buffer(b);
  }

  // A pool of size-byte blocks aligned to align, none crossing a multiple of
  // boundary (0 = none).
  Result<Pool> create_pool(const std::string& name, size_t size, size_t align = 0, size_t boundary = 0) {
    dmakit_pool_params p;
    dmakit_pool_params_init(&p, name.c_str(), size);
    p.align = align;
    p.boundary = boundary;
    return create_pool(p);
  }
  Result<Pool> create_pool(const dmakit_pool_params& p) {
    dmakit_pool* h = nullptr;
    int rc = dmakit_pool_create_with(h_, &p, &h);
    if (rc != DMAKIT_OK) return std::unexpected(detail::c_error(rc));
    return Pool(h);
  }

  // The IOVA of any host address this context maps (as spdk_vtophys).
  Result<Translation> vtophys(const void* vaddr) const {
    Translation t;
    int rc = dmakit_vtophys(h_, vaddr, &t.iova, &t.len);
    if (rc != DMAKIT_OK) return std::unexpected(detail::c_error(rc));
    return t;
  }

  // Maps caller memory for the device: one mapping entry per call; see
  // dmakit_mem_map. Returns the IOVA of vaddr.
  Result<uint64_t> map_memory(void* vaddr, uint64_t len, uint64_t dma_limit = UINT64_MAX) {
    uint64_t iova = 0;
    int rc = dmakit_mem_map(h_, vaddr, len, 0, dma_limit, &iova);
    if (rc != DMAKIT_OK) return std::unexpected(detail::c_error(rc));
    return iova;
  }
  // Unmapped when it returns: the memory may be freed.
  Status unmap_memory(void* vaddr) {
    int rc = dmakit_mem_unmap(h_, vaddr);
    if (rc != DMAKIT_OK) return std::unexpected(detail::c_error(rc));
    return {};
  }

  // Unmaps every lazily freed IOVA range now.
  Status flush() {
    int rc = dmakit_ctx_flush(h_);
    if (rc != DMAKIT_OK) return std::unexpected(detail::c_error(rc));
    return {};
  }

  // Devices: one IOVA space for every attached group (see dmakit.h, "Devices").
  Status attach(const std::string& bdf) { return detail::status(dmakit_ctx_attach(h_, bdf.c_str())); }
  Status detach(const std::string& bdf) { return detail::status(dmakit_ctx_detach(h_, bdf.c_str())); }
  Result<Device> open_device(const std::string& bdf) {
    dmakit_device* d = nullptr;
    if (int rc = dmakit_device_open(h_, bdf.c_str(), &d); rc != DMAKIT_OK) return std::unexpected(detail::c_error(rc));
    return Device(d);
  }
  // The attached devices' addresses.
  Result<std::vector<std::string>> devices() const {
    return detail::no_throw([&]() -> Result<std::vector<std::string>> { return devices_unguarded(); });
  }

 private:
  Result<std::vector<std::string>> devices_unguarded() const {
    size_t n = 0;
    int rc = dmakit_ctx_devices(h_, nullptr, 0, &n);
    if (rc != DMAKIT_OK && rc != DMAKIT_ENOSPC) return std::unexpected(detail::c_error(rc));
    std::string text(n + 1, '\0');
    if (rc = dmakit_ctx_devices(h_, text.data(), text.size(), &n); rc != DMAKIT_OK)
      return std::unexpected(detail::c_error(rc));
    text.resize(n);
    std::vector<std::string> out;
    for (size_t pos = 0; pos < text.size();) {
      size_t comma = text.find(',', pos);
      if (comma == std::string::npos) comma = text.size();
      out.push_back(text.substr(pos, comma - pos));
      pos = comma + 1;
    }
    return out;
  }

 public:
  Result<dmakit_ctx_stats> stats() const {
    dmakit_ctx_stats s{};
    s.struct_size = sizeof s;
    int rc = dmakit_ctx_get_stats(h_, &s);
    if (rc != DMAKIT_OK) return std::unexpected(detail::c_error(rc));
    return s;
  }

 private:
  explicit Context(dmakit_ctx* h) : Owned(h) {}
};

}  // namespace dmakit

#endif  // DMAKIT_DMAKIT_HPP
