// gtest checks the guest tests share: a command that completed with success,
// and a blocked device access the kernel logged as a DMAR fault for an IOVA.
#pragma once

#include <gtest/gtest.h>
#include <fmt/format.h>

#include <chrono>
#include <cstdint>
#include <string_view>

#include "facts.hpp"
#include "guest.hpp"
#include "nvme.hpp"

namespace dmakit::vmtest {

// bdf is on vfio-pci in this guest. A guest booted with other devices bound
// fails here with what it has, rather than later with an open error.
inline ::testing::AssertionResult on_vfio(std::string_view bdf, std::string_view role) {
  const auto& facts = guest_facts();
  if (!facts) return ::testing::AssertionFailure() << "reading the guest facts: " << facts.error().what();
  if (facts->bound(bdf)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << fmt::format(
             "{} ({}) is not bound to vfio-pci in this guest (run-guest.sh --bind must list it)\n{}", bdf, role,
             facts->str());
}

// The command was submitted and completed with status 0. QEMU's NVMe
// completes with success even when the IOMMU blocked the transfer, so a
// caller that needs the data checks memory as well.
inline ::testing::AssertionResult completed(const Result<NvmeCompletion>& c) {
  if (!c) return ::testing::AssertionFailure() << c.error().what();
  if (!c->ok()) return ::testing::AssertionFailure() << fmt::format("completion status {:#x}", c->status);
  return ::testing::AssertionSuccess();
}

// Runs dma - a device access the IOMMU must block - until the kernel logs a
// DMAR fault for iova's page, at most three times; else the log seen since
// the watch opened, for the failure message. QEMU drops a fault while an
// earlier one of the same device is still pending ("compression of
// faults"), so one blocked access can go unlogged; each repeat is blocked
// all the same, and callers still check that memory stayed unchanged.
template <class Dma>
::testing::AssertionResult blocked_with_fault(KmsgWatch& kmsg, uint64_t iova, Dma&& dma) {
  constexpr int kTries = 3;
  for (int i = 0; i < kTries; ++i) {
    if (::testing::AssertionResult sent = dma(); !sent) return sent;
    if (auto line = kmsg.wait_dmar_fault(iova, std::chrono::seconds(1))) return ::testing::AssertionSuccess() << *line;
  }
  auto failure = ::testing::AssertionFailure()
                 << fmt::format("no DMAR fault at {:#x} after {} blocked accesses; kernel log since start:", iova, kTries);
  for (const auto& l : kmsg.seen()) failure << "\n  " << l;
  return failure;
}

}  // namespace dmakit::vmtest
