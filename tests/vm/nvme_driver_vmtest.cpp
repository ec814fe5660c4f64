// Guest test: the example NVMe driver (examples/nvme), built on dmakit's
// public API alone, against QEMU's NVMe controller behind vfio-pci and the
// emulated Intel IOMMU. Data written through the driver reads back equal
// through it (PRP lists, transfers above 2 MiB, unaligned starts, several
// queues); completions arrive by MSI-X on an eventfd; and after a buffer is
// freed and the context flushed, the controller can no longer write to it.
#include <gtest/gtest.h>

#include <dmakit/dmakit.hpp>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "buffers.hpp"
#include "faults.hpp"
#include "guest.hpp"
#include "nvme/nvme.hpp"

namespace dmakit::vmtest {
namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kDiskLbas = 16 * 2048;  // run-guest.sh's default 16 MiB disk

// A context on the guest's NVMe controller. isolation (buffer.isolation):
// every buffer is its own mapping and none is kept for reuse, so a flush
// unmaps a freed buffer's IOVA (by default small buffers share a slab that
// stays mapped, the DMA contract of docs/API.md).
Result<Context> nvme_context(bool isolation = false) {
  dmakit_settings s;
  dmakit_settings_init(&s);
  s.backend = "vfio";
  s.devices = kNvmeBdf;
  s.buffer_isolation = isolation;
  return Context::create(s);
}

// A read or write the IOMMU may block: it must complete (QEMU reports
// success or a data transfer error), not time out.
::testing::AssertionResult answered(const Status& st) {
  if (st || st.error().code == Errc::io) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << st.error().what();
}

class NvmeDriver : public ::testing::Test {
 protected:
  void start(nvme::Options opt = {}, bool isolation = false) {
    auto ctx = nvme_context(isolation);
    ASSERT_TRUE(ctx) << ctx.error().what();
    ctx_.emplace(std::move(*ctx));
    auto ctrl = nvme::Controller::open(*ctx_, kNvmeBdf, opt);
    ASSERT_TRUE(ctrl) << ctrl.error().what();
    ctrl_.emplace(std::move(*ctrl));
  }

  Buffer buffer(uint64_t len) {
    auto b = ctx_->alloc_buffer(len);
    EXPECT_TRUE(b) << b.error().what();
    return b ? std::move(*b) : Buffer();
  }

  std::optional<Context> ctx_;
  std::optional<nvme::Controller> ctrl_;  // after the context: shut down first
};

TEST_F(NvmeDriver, IdentifiesAndShutsDown) {
  ASSERT_NO_FATAL_FAILURE(start());
  const auto& info = ctrl_->info();
  EXPECT_EQ(info.vid, 0x1b36) << "QEMU's vendor id";
  EXPECT_EQ(info.model, "QEMU NVMe Ctrl");
  EXPECT_EQ(info.serial, "dmakit0");
  EXPECT_GT(info.max_transfer, 0u) << "QEMU limits transfers (MDTS)";
  EXPECT_EQ(ctrl_->ns().nsid, 1u);
  EXPECT_EQ(ctrl_->ns().blocks, kDiskLbas);
  EXPECT_EQ(ctrl_->ns().block_size, kLbaSize);
  EXPECT_EQ(ctrl_->registers().csts & 1u, 1u) << "CSTS.RDY: " << ctrl_->registers().str();

  auto st = ctrl_->close();
  ASSERT_TRUE(st) << st.error().what();
  const auto regs = ctrl_->registers();
  EXPECT_EQ(regs.csts & 0xcu, 0x8u) << "CSTS.SHST is not 'shutdown complete': " << regs.str();
  EXPECT_TRUE(ctrl_->close()) << "a second close does nothing";
}

TEST_F(NvmeDriver, RefusesBadRequestsNamingThem) {
  ASSERT_NO_FATAL_FAILURE(start());
  Buffer b = buffer(kPage);
  auto segs = b.segments();
  ASSERT_TRUE(segs) << segs.error().what();
  const nvme::DataRef one_block{*segs, 0, kLbaSize};

  auto st = ctrl_->read(0, kDiskLbas, 1, one_block);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::invalid_argument);
  EXPECT_NE(st.error().message.find("beyond the namespace"), std::string::npos) << st.error().message;

  st = ctrl_->read(1, 0, 1, one_block);
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("I/O queue 1"), std::string::npos) << st.error().message;

  st = ctrl_->write(0, 0, 2, one_block);
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("2 blocks of 512 bytes"), std::string::npos) << st.error().message;

  st = ctrl_->read(0, 0, 1, nvme::DataRef{*segs, 2, kLbaSize});
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("not dword aligned"), std::string::npos) << st.error().message;

  st = ctrl_->read(0, 0, 8, nvme::DataRef{*segs, kLbaSize, 8 * kLbaSize});
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("beyond"), std::string::npos) << st.error().message;

  auto bad = nvme::Controller::open(*ctx_, kNvmeBdf, {.io_queues = 0});
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("io_queues"), std::string::npos) << bad.error().message;
}

TEST_F(NvmeDriver, PatternsReadBackEqualOnSeveralQueues) {
  ASSERT_NO_FATAL_FAILURE(start({.io_queues = 4, .queue_entries = 32}));
  ASSERT_EQ(ctrl_->queue_count(), 4u);
  const uint32_t bs = ctrl_->ns().block_size;
  const uint64_t mdts = ctrl_->info().max_transfer;

  struct Case {
    const char* what;
    size_t queue;
    uint64_t lba;
    uint64_t misalign;  // start of the data past a page boundary of the buffer
    uint64_t bytes;
    uint64_t offset = 0;  // into the buffers, set below
  };
  Case cases[] = {
      {"64 KiB through a PRP list", 0, 100, 0, 64 << 10},
      {"3 MiB: above 2 MiB, several commands", 1, 2048, 0, 3u << 20},
      {"unaligned start (520 bytes in), PRP list", 2, 9000, 520, 40 * kLbaSize},
      {"unaligned start crossing one page: PRP1 + PRP2", 3, 9100, 3584, 2 * kLbaSize},
      {"unaligned start, above 2 MiB", 0, 12000, 512, (2u << 20) + (64 << 10)},
  };
  // Each case its own bytes of the buffers, with a gap page between them.
  uint64_t len = 0;
  for (Case& k : cases) {
    k.offset = len + k.misalign;
    len = (k.offset + k.bytes + 2 * kPage - 1) / kPage * kPage;
  }
  Buffer src = buffer(len), dst = buffer(len);
  ASSERT_TRUE(src && dst);
  auto src_segs = src.segments(), dst_segs = dst.segments();
  ASSERT_TRUE(src_segs && dst_segs);
  std::printf("data buffers of %" PRIu64 " bytes: %zu and %zu host runs\n", len, src_segs->size(),
              dst_segs->size());

  uint32_t seed = 1;
  for (const Case& k : cases) {
    SCOPED_TRACE(k.what);
    fill_pattern(*src_segs, k.offset, k.bytes, seed++, k.lba, bs);
    auto st = ctrl_->write(k.queue, k.lba, k.bytes / bs, nvme::DataRef{*src_segs, k.offset, k.bytes});
    ASSERT_TRUE(st) << st.error().what();
  }
  auto st = ctrl_->flush(2);
  ASSERT_TRUE(st) << st.error().what();

  // Back: the cases that fit one command in flight together on their
  // queues, then the larger ones, which the driver splits.
  fill_bytes(*dst_segs, 0, len, 0xa5);
  std::vector<std::pair<nvme::Queue*, uint16_t>> inflight;
  for (const Case& k : cases) {
    if (mdts != 0 && k.bytes > mdts) continue;
    nvme::Queue& q = ctrl_->queue(k.queue);
    auto cid = q.submit(0x02 /* Read */, ctrl_->ns().nsid, k.lba, static_cast<uint32_t>(k.bytes / bs),
                        nvme::DataRef{*dst_segs, k.offset, k.bytes});
    ASSERT_TRUE(cid) << k.what << ": " << cid.error().what();
    inflight.emplace_back(&q, *cid);
  }
  EXPECT_GE(inflight.size(), 3u) << "three cases fit one command each";
  for (auto [q, cid] : inflight) {
    auto c = q->wait(cid);
    ASSERT_TRUE(c) << c.error().what();
    EXPECT_TRUE(c->ok()) << "status " << c->status;
  }
  for (const Case& k : cases) {
    if (mdts == 0 || k.bytes <= mdts) continue;
    st = ctrl_->read(k.queue, k.lba, k.bytes / bs, nvme::DataRef{*dst_segs, k.offset, k.bytes});
    ASSERT_TRUE(st) << k.what << ": " << st.error().what();
  }

  // Each range equal to what was written, and not a byte between them touched.
  uint64_t pos = 0;
  for (const Case& k : cases) {
    SCOPED_TRACE(k.what);
    const auto want = copy_out(*src_segs, k.offset, k.bytes);
    const auto got = copy_out(*dst_segs, k.offset, k.bytes);
    EXPECT_EQ(first_difference(want, got), -1) << "first byte that differs (of " << k.bytes << ")";
    for (const auto b : copy_out(*dst_segs, pos, k.offset - pos))
      ASSERT_EQ(static_cast<uint8_t>(b), 0xa5) << "a byte before the range changed";
    pos = k.offset + k.bytes;
  }
  for (const auto b : copy_out(*dst_segs, pos, len - pos)) ASSERT_EQ(static_cast<uint8_t>(b), 0xa5);
}

TEST_F(NvmeDriver, CompletionRaisesItsMsixVector) {
  ASSERT_NO_FATAL_FAILURE(start({.io_queues = 2, .completions = nvme::Completions::msix}));
  nvme::Queue& q = ctrl_->queue(1);
  ASSERT_TRUE(ctrl_->queue(0).vector().has_value());
  ASSERT_TRUE(q.vector().has_value());
  EXPECT_NE(*q.vector(), 0u) << "vector 0 is the admin queue's";
  EXPECT_NE(*q.vector(), *ctrl_->queue(0).vector()) << "each queue has its own vector";

  Buffer b = buffer(16 * kLbaSize);
  auto segs = b.segments();
  ASSERT_TRUE(segs) << segs.error().what();
  fill_bytes(*segs, 0, b.size(), 0);
  (void)q.wait_interrupt(0);  // none may be pending from before; start counting now
  auto cid = q.submit(0x02 /* Read */, ctrl_->ns().nsid, 50, 16, nvme::DataRef{*segs, 0, b.size()});
  ASSERT_TRUE(cid) << cid.error().what();
  // The eventfd of the queue's vector fires (it keeps the count, so an
  // interrupt before this call is not lost); nothing else raises it.
  auto n = q.wait_interrupt(10000);
  ASSERT_TRUE(n) << n.error().what() << " (" << ctrl_->registers().str() << ")";
  EXPECT_GE(*n, 1u);
  auto c = q.wait(*cid);
  ASSERT_TRUE(c) << c.error().what();
  EXPECT_TRUE(c->ok()) << "status " << c->status;
  const auto got = copy_out(*segs, 0, b.size());
  EXPECT_EQ(check_disk_pattern(got, 50), "");

  // Whole transfers wait on the interrupt too (LBAs no other test writes).
  auto st = ctrl_->read(0, 20000, 16, nvme::DataRef{*segs, 0, b.size()});
  ASSERT_TRUE(st) << st.error().what();
  EXPECT_EQ(check_disk_pattern(copy_out(*segs, 0, b.size()), 20000), "");
}

// A freed buffer whose IOVA the context flushed (isolation mode): the
// controller's write there is blocked (DMAR fault) and reaches no other
// buffer. The freed host
// memory is dmakit's again, so the test cannot look at it; the next test
// does the same with memory the test keeps.
TEST_F(NvmeDriver, FreedAndFlushedBufferIsOutOfReach) {
  ASSERT_NO_FATAL_FAILURE(start({}, /*isolation=*/true));
  auto kmsg = KmsgWatch::open();
  ASSERT_TRUE(kmsg) << kmsg.error().what();
  constexpr uint64_t kLen = 64 << 10;
  const uint64_t blocks = kLen / kLbaSize;

  Buffer b = buffer(kLen), neighbor = buffer(kLen);
  ASSERT_TRUE(b && neighbor);
  auto segs = b.segments(), neighbor_segs = neighbor.segments();
  ASSERT_TRUE(segs && neighbor_segs);
  auto st = ctrl_->read(0, 300, blocks, nvme::DataRef{*segs, 0, kLen});
  ASSERT_TRUE(st) << st.error().what();
  ASSERT_EQ(check_disk_pattern(copy_out(*segs, 0, kLen), 300), "") << "reachable while allocated";
  fill_bytes(*neighbor_segs, 0, kLen, 0x5a);

  const uint64_t old_iova = b.iova();
  ASSERT_TRUE(b.free());
  ASSERT_TRUE(ctx_->flush());
  auto stats = ctx_->stats();
  ASSERT_TRUE(stats) << stats.error().what();
  EXPECT_EQ(stats->iova_stale_pages, 0u) << "the flush left IOVA ranges mapped";

  const dmakit_segment stale{nullptr, old_iova, kLen};
  EXPECT_TRUE(blocked_with_fault(*kmsg, old_iova, [&] {
    return answered(ctrl_->read(0, 300, blocks, nvme::DataRef{std::span(&stale, 1), 0, kLen}));
  }));
  const auto after = copy_out(*neighbor_segs, 0, kLen);
  EXPECT_TRUE(std::all_of(after.begin(), after.end(), [](std::byte x) { return x == std::byte{0x5a}; }))
      << "the live buffer next to it changed";
}

// The same with caller memory, which the test keeps after unmapping it:
// the memory the controller could reach before is not written.
TEST_F(NvmeDriver, UnmappedCallerMemoryIsOutOfReach) {
  ASSERT_NO_FATAL_FAILURE(start());
  auto kmsg = KmsgWatch::open();
  ASSERT_TRUE(kmsg) << kmsg.error().what();
  constexpr uint64_t kLen = 64 << 10;
  const uint64_t blocks = kLen / kLbaSize;
  auto mem = DmaMemory::allocate(kLen);
  ASSERT_TRUE(mem) << mem.error().what();
  auto iova = ctx_->map_memory(mem->data(), kLen);
  ASSERT_TRUE(iova) << iova.error().what();
  auto segs = nvme::mapped_segments(*ctx_, mem->data(), kLen);
  ASSERT_TRUE(segs) << segs.error().what();
  auto st = ctrl_->read(0, 700, blocks, nvme::DataRef{*segs, 0, kLen});
  ASSERT_TRUE(st) << st.error().what();
  ASSERT_EQ(check_disk_pattern(mem->bytes(), 700), "") << "reachable while mapped";

  ASSERT_TRUE(ctx_->unmap_memory(mem->data()));
  ASSERT_TRUE(ctx_->flush());
  mem->fill(0x5a);
  const dmakit_segment stale{nullptr, *iova, kLen};
  EXPECT_TRUE(blocked_with_fault(*kmsg, *iova, [&] {
    return answered(ctrl_->read(0, 700, blocks, nvme::DataRef{std::span(&stale, 1), 0, kLen}));
  }));
  EXPECT_TRUE(mem->all_equal(0x5a)) << "the device wrote to memory after its unmap";
}

}  // namespace
}  // namespace dmakit::vmtest
