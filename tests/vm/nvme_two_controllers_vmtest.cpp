// Guest test: two NVMe controllers (00:03.0 and 00:05.0, each with its own
// disk) driven by the example driver in one dmakit context - one IOMMU
// domain, so both reach the same buffers - with their I/O interleaved.
#include <gtest/gtest.h>

#include <dmakit/dmakit.hpp>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <vector>

#include "buffers.hpp"
#include "guest.hpp"
#include "nvme/nvme.hpp"

namespace dmakit::vmtest {
namespace {

constexpr const char* kSecondNvmeBdf = "0000:00:05.0";  // run-guest.sh --nvme-count 2
constexpr uint64_t kPage = 4096;

TEST(TwoNvmeControllers, InterleavedIoInOneContext) {
  dmakit_settings s;
  dmakit_settings_init(&s);
  s.backend = "vfio";
  s.devices = "0000:00:03.0,0000:00:05.0";
  auto ctx = Context::create(s);
  ASSERT_TRUE(ctx) << ctx.error().what();

  std::array<std::optional<nvme::Controller>, 2> ctrl;
  const std::array<const char*, 2> bdfs = {kNvmeBdf, kSecondNvmeBdf};
  for (size_t i = 0; i < 2; ++i) {
    auto c = nvme::Controller::open(*ctx, bdfs[i], {.io_queues = 2, .queue_entries = 16});
    ASSERT_TRUE(c) << c.error().what();
    ctrl[i].emplace(std::move(*c));
    EXPECT_EQ(ctrl[i]->info().serial, "dmakit" + std::to_string(i)) << "a distinct controller";
  }
  auto devices = ctx->devices();
  ASSERT_TRUE(devices) << devices.error().what();
  EXPECT_NE(std::find(devices->begin(), devices->end(), kNvmeBdf), devices->end());
  EXPECT_NE(std::find(devices->begin(), devices->end(), kSecondNvmeBdf), devices->end());

  // One source buffer, half a pattern per controller; one destination
  // buffer both read into. Same LBAs on both disks, different data.
  const uint32_t bs = ctrl[0]->ns().block_size;
  ASSERT_EQ(ctrl[1]->ns().block_size, bs);
  constexpr uint64_t kPiece = 32 * kPage;  // per command: a PRP list each
  constexpr int kPieces = 8;               // per controller
  constexpr uint64_t kHalf = kPiece * kPieces;
  constexpr uint64_t kLba = 5000;
  auto src = ctx->alloc_buffer(2 * kHalf), dst = ctx->alloc_buffer(2 * kHalf);
  ASSERT_TRUE(src && dst);
  auto src_segs = src->segments(), dst_segs = dst->segments();
  ASSERT_TRUE(src_segs && dst_segs);
  for (uint32_t i = 0; i < 2; ++i) fill_pattern(*src_segs, i * kHalf, kHalf, 40 + i, kLba, bs);
  fill_bytes(*dst_segs, 0, 2 * kHalf, 0xa5);

  // Commands alternate between the controllers (and their two queues), all
  // in flight together, then complete in any order.
  auto interleave = [&](uint8_t opcode, const std::vector<dmakit_segment>& segs) -> ::testing::AssertionResult {
    std::vector<std::pair<nvme::Queue*, uint16_t>> inflight;
    for (int p = 0; p < kPieces; ++p) {
      for (uint32_t i = 0; i < 2; ++i) {
        nvme::Queue& q = ctrl[i]->queue(p % 2);
        const uint64_t off = i * kHalf + p * kPiece;
        auto cid = q.submit(opcode, ctrl[i]->ns().nsid, kLba + p * kPiece / bs, kPiece / bs,
                            nvme::DataRef{segs, off, kPiece});
        if (!cid) return ::testing::AssertionFailure() << cid.error().what();
        inflight.emplace_back(&q, *cid);
      }
    }
    for (auto [q, cid] : inflight) {
      auto c = q->wait(cid);
      if (!c) return ::testing::AssertionFailure() << c.error().what();
      if (!c->ok()) return ::testing::AssertionFailure() << "status " << c->status;
    }
    return ::testing::AssertionSuccess();
  };
  ASSERT_TRUE(interleave(0x01 /* Write */, *src_segs));
  for (auto& c : ctrl) ASSERT_TRUE(c->flush(0));
  ASSERT_TRUE(interleave(0x02 /* Read */, *dst_segs));

  for (uint32_t i = 0; i < 2; ++i) {
    SCOPED_TRACE(bdfs[i]);
    EXPECT_EQ(first_difference(copy_out(*src_segs, i * kHalf, kHalf), copy_out(*dst_segs, i * kHalf, kHalf)), -1)
        << "each controller returns its own data";
  }
  // The LBAs around the written range are the disk's own on both.
  for (uint32_t i = 0; i < 2; ++i) {
    auto st = ctrl[i]->read(1, kLba - 1, 1, nvme::DataRef{*dst_segs, 0, bs});
    ASSERT_TRUE(st) << st.error().what();
    EXPECT_EQ(check_disk_pattern(copy_out(*dst_segs, 0, bs), kLba - 1), "") << bdfs[i];
  }
  for (auto& c : ctrl) {
    auto st = c->close();
    EXPECT_TRUE(st) << st.error().what();
  }
}

}  // namespace
}  // namespace dmakit::vmtest
