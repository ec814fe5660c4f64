// gtest checks the guest tests share: a command that completed with success,
// and a DMAR fault the kernel logged for an IOVA.
#pragma once

#include <gtest/gtest.h>
#include <fmt/format.h>

#include <cstdint>

#include "guest.hpp"
#include "nvme.hpp"

namespace dmakit::vmtest {

// The command was submitted and completed with status 0. QEMU's NVMe
// completes with success even when the IOMMU blocked the transfer, so a
// caller that needs the data checks memory as well.
inline ::testing::AssertionResult completed(const Result<NvmeCompletion>& c) {
  if (!c) return ::testing::AssertionFailure() << c.error().what();
  if (!c->ok()) return ::testing::AssertionFailure() << fmt::format("completion status {:#x}", c->status);
  return ::testing::AssertionSuccess();
}

// A DMAR fault line for `iova`'s page appeared in the kernel log; else the
// log seen since the watch opened, for the failure message.
inline ::testing::AssertionResult dmar_fault_at(KmsgWatch& kmsg, uint64_t iova) {
  if (auto line = kmsg.wait_dmar_fault(iova)) return ::testing::AssertionSuccess() << *line;
  auto failure = ::testing::AssertionFailure() << fmt::format("no DMAR fault at {:#x}; kernel log since start:", iova);
  for (const auto& l : kmsg.seen()) failure << "\n  " << l;
  return failure;
}

}  // namespace dmakit::vmtest
