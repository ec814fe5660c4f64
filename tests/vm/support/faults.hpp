// A gtest check for any driver: a device access the IOMMU must block,
// repeated until the kernel logs its DMAR fault.
#pragma once

#include <gtest/gtest.h>
#include <fmt/format.h>

#include <chrono>
#include <cstdint>

#include "guest.hpp"

namespace dmakit::vmtest {

// Runs dma - a device access the IOMMU must block - until the kernel logs a
// DMAR fault for iova's page, at most six times; else the log seen since
// the watch opened, for the failure message. QEMU drops a fault while an
// earlier one of the same device is still pending ("compression of
// faults"), so one blocked access can go unlogged; each repeat is blocked
// all the same, and callers still check that memory stayed unchanged.
template <class Dma>
::testing::AssertionResult blocked_with_fault(KmsgWatch& kmsg, uint64_t iova, Dma&& dma) {
  // Three were not always enough in CI (once in some forty guest runs).
  constexpr int kTries = 6;
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
