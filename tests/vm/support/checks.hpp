// gtest checks the guest tests share: a command that completed with success,
// and (faults.hpp) a blocked device access the kernel logged as a DMAR fault
// for an IOVA.
#pragma once

#include <gtest/gtest.h>
#include <fmt/format.h>

#include "faults.hpp"
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

}  // namespace dmakit::vmtest
