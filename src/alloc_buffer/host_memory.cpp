#include "alloc_buffer/host_memory.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <new>

#include "base/clock.hpp"
#include "base/log.hpp"
#include "iommu/pci.hpp"

namespace dmakit::alloc_buffer {

HostMemoryGuard& HostMemoryGuard::process() {
  // Never destroyed: a source may give memory back from a static destructor
  // that runs after this function's statics would have been.
  alignas(HostMemoryGuard) static unsigned char storage[sizeof(HostMemoryGuard)];
  static HostMemoryGuard* const guard = ::new (storage) HostMemoryGuard("/proc/meminfo");
  return *guard;
}

HostMemoryGuard::HostMemoryGuard(std::string meminfo_path, uint64_t reserve_bytes)
    : path_(std::move(meminfo_path)), reserve_fixed_(reserve_bytes) {}

HostMemoryGuard::Reading HostMemoryGuard::read() const {
  Reading r;
  std::FILE* f = std::fopen(path_.c_str(), "re");
  if (f == nullptr) return r;
  char line[256];
  bool have_avail = false, have_total = false;
  while (std::fgets(line, sizeof line, f) != nullptr && !(have_avail && have_total)) {
    unsigned long long kb = 0;
    if (std::sscanf(line, "MemAvailable: %llu kB", &kb) == 1) {
      r.available = kb << 10;
      have_avail = true;
    } else if (std::sscanf(line, "MemTotal: %llu kB", &kb) == 1) {
      r.total = kb << 10;
      have_total = true;
    }
  }
  std::fclose(f);
  r.ok = have_avail && have_total;
  return r;
}

Status HostMemoryGuard::admit(uint64_t bytes, std::string_view who) {
  std::lock_guard lock(mu_);
  const int64_t now = base::mono_now_ns();
  if (!last_.ok || now - read_at_ns_ >= std::chrono::nanoseconds(kRefresh).count()) {
    last_ = read();
    read_at_ns_ = now;
    since_read_ = 0;
  }
  if (!last_.ok) {
    if (!warned_) base::log().warn("{}: cannot read MemAvailable from {}; host memory is not checked", who, path_);
    warned_ = true;
    return ok();
  }
  constexpr uint64_t kMiB = 1ull << 20;
  const uint64_t reserve =
      reserve_fixed_ != 0 ? reserve_fixed_ : std::clamp<uint64_t>(last_.total / 16, 32 * kMiB, 1024 * kMiB);
  const uint64_t used = reserve + since_read_;
  const uint64_t headroom = last_.available > used ? last_.available - used : 0;
  if (bytes > headroom) {
    ++refusals_;
    return fail(Errc::no_memory,
                "{}: {} bytes refused: the host has {} MiB available ({} MiB committed since it was read) and keeps "
                "{} MiB in reserve",
                who, bytes, last_.available / kMiB, since_read_ / kMiB, reserve / kMiB);
  }
  since_read_ += bytes;
  return ok();
}

void HostMemoryGuard::give_back(uint64_t bytes) {
  std::lock_guard lock(mu_);
  since_read_ -= std::min(bytes, since_read_);
}

Status HostMemoryGuard::admit_pin(uint64_t bytes, std::string_view who) {
  const iommu::pci::MemlockState mem = iommu::pci::current_memlock();
  std::lock_guard lock(mu_);
  if (auto st = iommu::pci::check_memlock(pinned_ + bytes, mem); !st) {
    ++refusals_;
    return fail(Errc::no_memory, "{}: {} bytes refused: {} KiB pinned already; {}", who, bytes, pinned_ / 1024,
                st.error().message);
  }
  pinned_ += bytes;
  return ok();
}

void HostMemoryGuard::unpin(uint64_t bytes) {
  std::lock_guard lock(mu_);
  pinned_ -= std::min(bytes, pinned_);
}

uint64_t HostMemoryGuard::pinned() const {
  std::lock_guard lock(mu_);
  return pinned_;
}

uint64_t HostMemoryGuard::refusals() const {
  std::lock_guard lock(mu_);
  return refusals_;
}

}  // namespace dmakit::alloc_buffer
