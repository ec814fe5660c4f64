// gtest checks the guest tests share: a device on vfio-pci in this guest, a
// command that completed with success, and (faults.hpp) a blocked device
// access the kernel logged as a DMAR fault for an IOVA.
#pragma once

#include <gtest/gtest.h>
#include <fmt/format.h>

#include <string_view>

#include "facts.hpp"
#include "faults.hpp"
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

}  // namespace dmakit::vmtest
