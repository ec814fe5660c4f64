// HostMemoryGuard: refuses anonymous DMA memory the host cannot back.
//
// Committing anonymous memory (mprotect to read-write) succeeds under the
// default overcommit policy whatever the host has left; the pages are only
// found missing when someone first touches them - the caller filling a
// buffer, the zeroing thread, or VFIO pinning it at map time - and then the
// OOM killer ends the process without a message. So before the anonymous
// source commits a run, the guard checks it against what the kernel reports
// as available (MemAvailable in /proc/meminfo) less a reserve for everything
// else, and the request fails with Errc::no_memory instead.
//
// The file is read at most every kRefresh; in between, bytes committed
// since the last read are subtracted from it, so a burst of takes cannot
// all pass on one stale figure. The anonymous source faults its pages in
// when it commits them, so everything admitted before a reading is in that
// reading. Pages given back raise MemAvailable at the next read.
//
// It also guards locked memory: every byte of a DMA buffer is pinned when
// it is mapped (VFIO type1 charges it to the process against RLIMIT_MEMLOCK
// unless the process has CAP_IPC_LOCK, and fails the map with ENOMEM past
// it). admit_pin() counts what the process's buffers pin and refuses, with
// Errc::no_memory, the request that would pass the limit, before any memory
// is taken; unpin() gives it back when the buffer's memory is returned.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>

#include "base/error.hpp"

namespace dmakit::alloc_buffer {

class HostMemoryGuard {
 public:
  static constexpr std::chrono::milliseconds kRefresh{10};

  // The process's guard on /proc/meminfo, shared by every anonymous source.
  static HostMemoryGuard& process();

  // reserve_bytes 0 = MemTotal / 16, kept within [32 MiB, 1 GiB].
  explicit HostMemoryGuard(std::string meminfo_path, uint64_t reserve_bytes = 0);

  // OK and counted when `bytes` more can be committed; else Errc::no_memory
  // naming who asked, the size, what is available and the reserve. When the
  // file cannot be read the guard lets everything through (and says so once
  // in the log): it must never be the reason memory that exists is refused.
  Status admit(uint64_t bytes, std::string_view who);
  // Bytes admitted before and now given back to the kernel.
  void give_back(uint64_t bytes);

  // OK and counted when `bytes` more can be pinned under RLIMIT_MEMLOCK (read
  // now, with CAP_IPC_LOCK, as the kernel does at each map); else
  // Errc::no_memory naming who asked, both amounts and the fix, counted as a
  // refusal.
  Status admit_pin(uint64_t bytes, std::string_view who);
  // Bytes admitted by admit_pin and no longer pinned.
  void unpin(uint64_t bytes);
  uint64_t pinned() const;

  uint64_t refusals() const;

 private:
  struct Reading {
    uint64_t available = 0, total = 0;
    bool ok = false;
  };
  Reading read() const;

  std::string path_;
  uint64_t reserve_fixed_;
  mutable std::mutex mu_;
  Reading last_;
  int64_t read_at_ns_ = 0;  // base::mono_now_ns() of last_
  uint64_t since_read_ = 0;  // bytes admitted since last_ was read
  uint64_t refusals_ = 0;
  uint64_t pinned_ = 0;  // bytes admitted by admit_pin, not yet unpinned
  bool warned_ = false;
};

}  // namespace dmakit::alloc_buffer
