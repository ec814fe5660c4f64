// Guest test: the IOVA arena on the real VFIO domain of an NVMe controller.
// The arena decides IOVAs; memory mapped at them must be reachable by the
// device exactly while the mapping exists. Lazy mode keeps a freed IOVA
// mapped until a flush (a bounded stale window the device can still use);
// after the flush, or at once in strict mode, the IOMMU blocks it: the old
// memory stays untouched and the kernel logs a DMAR fault. The arena never
// hands out the x86 MSI hole, honours a 32-bit DMA limit and reaches the
// top of the IOVA space as wide as the guest's IOMMU is (read, not assumed).
#include <gtest/gtest.h>

#include <algorithm>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "checks.hpp"
#include "facts.hpp"
#include "guest.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/vfio.hpp"
#include "nvme.hpp"

namespace dmakit::vmtest {
namespace {

using iommu::ArenaConfig;
using iommu::IovaArena;
using iommu::IovaSpan;
using iommu::vfio::VfioDomain;

constexpr size_t kPage = NvmeController::kPageSize;
constexpr uint16_t kQueueEntries = 16;
// The controller's queues sit at a fixed IOVA below every arena of this file.
constexpr uint64_t kQueuesIova = 0x100000;  // ASQ, ACQ, I/O SQ, I/O CQ, PRP list
// Default arena space: clear of the queues.
constexpr uint64_t kArenaStart = 0x1000'0000;
constexpr uint64_t kArenaEnd = 0x1fff'ffff;

bool all_bytes(const std::byte* p, size_t n, uint8_t v) {
  const auto* q = reinterpret_cast<const volatile uint8_t*>(p);
  for (size_t i = 0; i < n; ++i)
    if (q[i] != v) return false;
  return true;
}

// An arena whose stale ranges stay until an explicit flush: no page or age
// bound, one shard, so what the test sees is what free() and flush() did.
ArenaConfig quiet_config(bool strict) {
  ArenaConfig c;
  c.shards = 1;
  c.strict = strict;
  c.stale_max_pages = 0;
  c.stale_max_age = std::chrono::milliseconds(0);
  c.iova_start = kArenaStart;
  c.iova_end = kArenaEnd;
  return c;
}

class ArenaVfio : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto& facts = guest_facts();
    ASSERT_TRUE(facts) << facts.error().what();
    facts_ = &*facts;
    ASSERT_TRUE(on_vfio(kNvmeBdf, "the NVMe under test"));
    // The hole between the IOMMU's windows that VFIO reports for MSIs.
    const auto hole = facts_->msi_hole();
    ASSERT_TRUE(hole) << "no gap around the x86 MSI range between the IOVA windows\n" << facts_->str();
    msi_ = *hole;

    auto kmsg = KmsgWatch::open();
    ASSERT_TRUE(kmsg) << kmsg.error().what();
    kmsg_.emplace(std::move(*kmsg));
    auto q = DmaMemory::allocate(5 * kPage);
    ASSERT_TRUE(q) << q.error().what();
    queues_ = std::move(*q);

    auto domain = VfioDomain::open(std::string_view(kNvmeBdf));
    ASSERT_TRUE(domain) << domain.error().what();
    domain_ = std::move(*domain);
    auto st = domain_->map(queues_.data(), kQueuesIova, queues_.size(), iommu::kReadWrite);
    ASSERT_TRUE(st) << st.error().what();

    auto ctrl = start_nvme(*domain_, kNvmeBdf, {queue(0), queue(1), queue(2), queue(3), kQueueEntries});
    ASSERT_TRUE(ctrl) << ctrl.error().what();
    ctrl_.emplace(std::move(*ctrl));
    // Everything below counts from here: one mapping (the queues).
    base_mappings_ = domain_->stats().mappings;
    base_avail_ = domain_->dma_avail();
    ASSERT_EQ(base_mappings_, 1u);
  }

  void TearDown() override {
    if (ctrl_) {
      auto st = ctrl_->disable();
      EXPECT_TRUE(st) << st.error().what();
    }
  }

  DmaRef queue(size_t index) const {
    return DmaRef{queues_.data() + index * kPage, kQueuesIova + index * kPage, kPage};
  }
  DmaRef prp_list() const { return queue(4); }

  std::unique_ptr<IovaArena> make_arena(const ArenaConfig& cfg) {
    auto a = IovaArena::create(*domain_, cfg);
    EXPECT_TRUE(a) << a.error().what();
    return a ? std::move(*a) : nullptr;
  }

  // NVMe Read of `blocks` LBAs from `lba` to `iova`. QEMU completes with
  // success even when the IOMMU blocked the transfer, so callers check memory.
  ::testing::AssertionResult read(uint64_t lba, uint16_t blocks, uint64_t iova) {
    return completed(ctrl_->read(lba, blocks, iova, size_t{blocks} * kLbaSize, prp_list()));
  }

  // A read into iova (lba, blocks) that the IOMMU blocks and the kernel logs.
  ::testing::AssertionResult read_faults(uint64_t lba, uint16_t blocks, uint64_t iova) {
    return vmtest::blocked_with_fault(*kmsg_, iova, [&] { return read(lba, blocks, iova); });
  }

  // Mapping entries the kernel has handed out beyond the queues' one.
  uint64_t kernel_entries() const { return base_avail_ - domain_->dma_avail(); }
  uint64_t extra_mappings() const { return domain_->stats().mappings - base_mappings_; }

  const GuestFacts* facts_ = nullptr;
  iommu::IovaWindow msi_;
  DmaMemory queues_;
  std::optional<KmsgWatch> kmsg_;
  std::unique_ptr<VfioDomain> domain_;
  std::optional<NvmeController> ctrl_;  // declared last: stopped first
  uint64_t base_mappings_ = 0;
  uint64_t base_avail_ = 0;
};

// Lazy mode, step by step: mapped memory is reachable; after free() it stays
// reachable (the stale window); after flush() the listener reports the range,
// the kernel entry is gone and the device's write is blocked.
TEST_F(ArenaVfio, LazyFreeKeepsMappingUntilFlush) {
  auto arena = make_arena(quiet_config(false));
  ASSERT_TRUE(arena);
  std::vector<IovaSpan> reported;
  ASSERT_TRUE(arena->add_flush_listener([&](std::span<const IovaSpan> r) { reported.insert(reported.end(), r.begin(), r.end()); }));

  auto mem = DmaMemory::allocate(4 * kPage);
  ASSERT_TRUE(mem) << mem.error().what();
  auto span = arena->alloc({4 * kPage, 0, ~0ull});
  ASSERT_TRUE(span) << span.error().what();
  EXPECT_GE(span->iova, kArenaStart);
  EXPECT_LE(span->end() - 1, kArenaEnd);
  EXPECT_EQ(span->len, 4 * kPage);
  EXPECT_EQ(arena->stats().pages_in_use, 4u);
  ASSERT_TRUE(domain_->map(mem->data(), span->iova, span->len, iommu::kReadWrite));
  EXPECT_EQ(kernel_entries(), 1u);
  EXPECT_EQ(extra_mappings(), 1u);

  // Mapped: 8 LBAs land one page in.
  mem->fill(0xa5);
  ASSERT_TRUE(read(300, 8, span->iova + kPage));
  EXPECT_EQ(check_disk_pattern(mem->bytes().subspan(kPage, 8 * kLbaSize), 300), "");
  EXPECT_TRUE(all_bytes(mem->data(), kPage, 0xa5));

  // Freed, not flushed: still mapped, still reachable.
  ASSERT_TRUE(arena->free(*span));
  auto s = arena->stats();
  EXPECT_EQ(s.pages_in_use, 0u);
  EXPECT_EQ(s.stale_pages, 4u);
  EXPECT_EQ(s.unmap_calls, 0u);
  EXPECT_TRUE(reported.empty());
  EXPECT_EQ(kernel_entries(), 1u) << "lazy free must leave the mapping in place";
  mem->fill(0xa5);
  ASSERT_TRUE(read(500, 8, span->iova));
  EXPECT_EQ(check_disk_pattern(mem->bytes().subspan(0, 8 * kLbaSize), 500), "")
      << "a freed but unflushed IOVA is still mapped: the device reaches it";

  // Flushed: one unmap, reported to the listener, blocked for the device.
  ASSERT_TRUE(arena->flush());
  s = arena->stats();
  EXPECT_EQ(s.stale_pages, 0u);
  EXPECT_EQ(s.unmap_calls, 1u);
  EXPECT_EQ(s.flushes, 1u);
  EXPECT_EQ(s.ranges_flushed, 1u);
  ASSERT_EQ(reported.size(), 1u);
  EXPECT_EQ(reported[0], *span);
  EXPECT_EQ(kernel_entries(), 0u);
  EXPECT_EQ(extra_mappings(), 0u);
  mem->fill(0x5a);
  EXPECT_TRUE(read_faults(700, 8, span->iova));
  EXPECT_TRUE(mem->all_equal(0x5a)) << "the device wrote through a flushed IOVA";
  EXPECT_TRUE(arena->check());
}

// Strict mode: free() itself unmaps (and reports), no flush needed.
TEST_F(ArenaVfio, StrictFreeUnmapsAtOnce) {
  auto arena = make_arena(quiet_config(true));
  ASSERT_TRUE(arena);
  std::vector<IovaSpan> reported;
  ASSERT_TRUE(arena->add_flush_listener([&](std::span<const IovaSpan> r) { reported.insert(reported.end(), r.begin(), r.end()); }));

  auto mem = DmaMemory::allocate(2 * kPage);
  ASSERT_TRUE(mem) << mem.error().what();
  auto span = arena->alloc({2 * kPage, 0, ~0ull});
  ASSERT_TRUE(span) << span.error().what();
  ASSERT_TRUE(domain_->map(mem->data(), span->iova, span->len, iommu::kReadWrite));
  EXPECT_EQ(kernel_entries(), 1u);
  mem->fill(0xa5);
  ASSERT_TRUE(read(1234, 16, span->iova));  // 8 KiB: PRP1 + PRP2
  EXPECT_EQ(check_disk_pattern(mem->bytes(), 1234), "");

  ASSERT_TRUE(arena->free(*span));
  const auto s = arena->stats();
  EXPECT_EQ(s.stale_pages, 0u);
  EXPECT_EQ(s.unmap_calls, 1u);
  ASSERT_EQ(reported.size(), 1u);
  EXPECT_EQ(reported[0], *span);
  EXPECT_EQ(kernel_entries(), 0u) << "strict free must unmap before it returns";
  EXPECT_EQ(extra_mappings(), 0u);

  mem->fill(0x3c);
  EXPECT_TRUE(read_faults(99, 8, span->iova + kPage));
  EXPECT_TRUE(mem->all_equal(0x3c)) << "the device wrote through an IOVA freed in strict mode";
  EXPECT_TRUE(arena->check());
}

// The stale window is bounded: with stale_max_pages = 8 a shard flushes by
// itself once 8 pages are stale, without an explicit flush().
TEST_F(ArenaVfio, StaleWindowIsBoundedByPageCount) {
  ArenaConfig cfg = quiet_config(false);
  cfg.stale_max_pages = 8;
  auto arena = make_arena(cfg);
  ASSERT_TRUE(arena);
  auto mem = DmaMemory::allocate(kPage);
  ASSERT_TRUE(mem) << mem.error().what();
  std::vector<IovaSpan> spans;
  for (int i = 0; i < 8; ++i) {
    auto span = arena->alloc({kPage, 0, ~0ull});
    ASSERT_TRUE(span) << span.error().what();
    ASSERT_TRUE(domain_->map(mem->data(), span->iova, kPage, iommu::kReadWrite));
    spans.push_back(*span);
  }
  EXPECT_EQ(kernel_entries(), 8u);
  for (int i = 0; i < 7; ++i) ASSERT_TRUE(arena->free(spans[static_cast<size_t>(i)]));
  EXPECT_EQ(arena->stats().stale_pages, 7u);
  EXPECT_EQ(kernel_entries(), 8u) << "below the bound every freed IOVA stays mapped";
  ASSERT_TRUE(arena->free(spans[7]));
  const auto s = arena->stats();
  EXPECT_EQ(s.stale_pages, 0u) << "the 8th stale page must trigger the shard's flush";
  EXPECT_EQ(s.ranges_flushed, 8u);
  EXPECT_EQ(s.unmap_calls, 1u) << "8 adjacent stale pages merge into one unmap";
  EXPECT_EQ(kernel_entries(), 0u);
  mem->fill(0x77);
  EXPECT_TRUE(read_faults(4000, 8, spans[3].iova));
  EXPECT_TRUE(mem->all_equal(0x77));
}

// An arena narrowed to 17 MiB around the MSI hole (1 MiB on x86: 14 MiB
// below it, 2 MiB above): filling it hands out every usable page, none inside
// the hole, and the kernel accepts a real mapping at every range.
TEST_F(ArenaVfio, NeverHandsOutTheMsiHole) {
  ArenaConfig cfg = quiet_config(false);
  cfg.iova_start = 0xfe00'0000;
  cfg.iova_end = 0xff0f'ffff;
  ASSERT_TRUE(msi_.start > cfg.iova_start && msi_.last < cfg.iova_end)
      << fmt::format("the hole {:#x}-{:#x} is not inside the test's range", msi_.start, msi_.last);
  auto arena = make_arena(cfg);
  ASSERT_TRUE(arena);
  constexpr uint64_t kLen = 64 << 10;
  const uint64_t below = (msi_.start - cfg.iova_start) / kLen;
  const uint64_t above = (cfg.iova_end - msi_.last) / kLen;
  EXPECT_EQ(arena->stats().total_pages, (cfg.iova_end + 1 - cfg.iova_start - msi_.size()) / kPage);

  auto mem = DmaMemory::allocate(kLen);
  ASSERT_TRUE(mem) << mem.error().what();
  std::vector<IovaSpan> spans;
  for (;;) {
    auto span = arena->alloc({kLen, 0, 0xffff'ffff});
    if (!span) {
      EXPECT_EQ(span.error().code, Errc::no_space) << span.error().what();
      break;
    }
    ASSERT_LE(spans.size(), below + above) << "more ranges than the narrowed space holds";
    EXPECT_TRUE(span->end() <= msi_.start || span->iova > msi_.last)
        << fmt::format("range {:#x}+{:#x} overlaps the MSI hole", span->iova, span->len);
    EXPECT_GE(span->iova, cfg.iova_start);
    EXPECT_LE(span->end() - 1, cfg.iova_end);
    auto st = domain_->map(mem->data(), span->iova, kLen, iommu::kReadWrite);
    ASSERT_TRUE(st) << st.error().what();
    spans.push_back(*span);
  }
  // Every 64 KiB range below and above the hole.
  EXPECT_EQ(spans.size(), below + above);
  EXPECT_EQ(std::count_if(spans.begin(), spans.end(), [&](const IovaSpan& s) { return s.iova > msi_.last; }),
            static_cast<std::ptrdiff_t>(above));
  std::sort(spans.begin(), spans.end(), [](const IovaSpan& a, const IovaSpan& b) { return a.iova < b.iova; });
  for (size_t i = 1; i < spans.size(); ++i) EXPECT_LE(spans[i - 1].end(), spans[i].iova) << "ranges overlap";
  EXPECT_EQ(kernel_entries(), spans.size());

  // The device reaches the first range above the hole.
  const auto first_above =
      std::find_if(spans.begin(), spans.end(), [&](const IovaSpan& s) { return s.iova > msi_.last; });
  ASSERT_NE(first_above, spans.end());
  mem->fill(0xa5);
  ASSERT_TRUE(read(2048, 8, first_above->iova));
  EXPECT_EQ(check_disk_pattern(mem->bytes().subspan(0, kPage), 2048), "");

  for (const IovaSpan& s : spans) ASSERT_TRUE(arena->free(s));
  ASSERT_TRUE(arena->flush());
  const auto s = arena->stats();
  EXPECT_EQ(s.ranges_flushed, spans.size());
  EXPECT_LT(s.unmap_calls, 8u) << "adjacent stale ranges are unmapped in merged runs";
  EXPECT_EQ(kernel_entries(), 0u);
  EXPECT_TRUE(arena->check());
}

// A 32-bit DMA limit keeps every byte below 4 GiB in an arena that also has
// space above it; without the limit the space above is used.
TEST_F(ArenaVfio, HonoursA32BitDmaLimit) {
  ArenaConfig cfg = quiet_config(false);
  cfg.iova_start = 0xfe00'0000;  // 32 MiB below 4 GiB (1 MiB of it the MSI hole)...
  cfg.iova_end = 0x1'00ff'ffff;  // ...and 16 MiB above
  auto arena = make_arena(cfg);
  ASSERT_TRUE(arena);
  constexpr uint64_t kLen = 1 << 20;
  auto mem = DmaMemory::allocate(kLen);
  ASSERT_TRUE(mem) << mem.error().what();

  // Every 1 MiB range from the start to 4 GiB except the hole's.
  const uint64_t low_ranges = (0x1'0000'0000 - cfg.iova_start - msi_.size()) / kLen;
  std::vector<IovaSpan> low;
  for (;;) {
    auto span = arena->alloc({kLen, 0, 0xffff'ffff});
    if (!span) {
      EXPECT_EQ(span.error().code, Errc::no_space) << span.error().what();
      break;
    }
    ASSERT_LE(low.size(), low_ranges);
    EXPECT_LE(span->end() - 1, 0xffff'ffffu) << fmt::format("range {:#x}+{:#x} ends above 4 GiB", span->iova, span->len);
    EXPECT_TRUE(span->end() <= msi_.start || span->iova > msi_.last);
    ASSERT_TRUE(domain_->map(mem->data(), span->iova, kLen, iommu::kReadWrite));
    low.push_back(*span);
  }
  EXPECT_EQ(low.size(), low_ranges);

  auto high = arena->alloc({kLen, 0, ~0ull});
  ASSERT_TRUE(high) << high.error().what();
  EXPECT_GE(high->iova, 0x1'0000'0000u);
  ASSERT_TRUE(domain_->map(mem->data(), high->iova, kLen, iommu::kReadWrite));

  // The device reaches both sides of 4 GiB.
  for (uint64_t iova : {low.back().iova, high->iova}) {
    SCOPED_TRACE(fmt::format("IOVA {:#x}", iova));
    mem->fill(0xa5);
    ASSERT_TRUE(read(77, 8, iova));
    EXPECT_EQ(check_disk_pattern(mem->bytes().subspan(0, kPage), 77), "");
  }

  for (const IovaSpan& s : low) ASSERT_TRUE(arena->free(s));
  ASSERT_TRUE(arena->free(*high));
  ASSERT_TRUE(arena->flush());
  EXPECT_EQ(kernel_entries(), 0u);
  EXPECT_EQ(arena->stats().pages_in_use, 0u);
  EXPECT_TRUE(arena->check());
}

// The space ends where the guest's IOMMU does: VFIO's last window ends at
// 2^MGAW - 1 of the IOMMU's capability register. An arena over the top
// 16 MiB hands out every range up to the last IOVA, the device's write
// lands in the highest page, and an arena starting past the end is refused.
TEST_F(ArenaVfio, ReachesTheTopOfTheGuestsIovaSpace) {
  const uint64_t top = facts_->iova_last();
  std::cout << fmt::format("guest IOMMU: {}-bit, last IOVA {:#x}\n", facts_->address_bits, top);
  ASSERT_NE(facts_->dmar_address_bits, 0u) << "no Intel IOMMU capability register in sysfs\n" << facts_->str();
  ASSERT_EQ(top, (1ull << facts_->dmar_address_bits) - 1) << facts_->str();
  ASSERT_EQ(domain_->info().windows.back().last, top);

  ArenaConfig cfg = quiet_config(false);
  constexpr uint64_t kSpace = 16ull << 20;
  constexpr uint64_t kLen = 1ull << 20;
  cfg.iova_start = top + 1 - kSpace;
  cfg.iova_end = 0;  // to the end of the last window
  auto arena = make_arena(cfg);
  ASSERT_TRUE(arena);
  EXPECT_EQ(arena->stats().total_pages, kSpace / kPage);
  std::vector<IovaSpan> spans;
  for (;;) {
    auto span = arena->alloc({kLen, 0, ~0ull});
    if (!span) {
      EXPECT_EQ(span.error().code, Errc::no_space) << span.error().what();
      break;
    }
    ASSERT_LT(spans.size(), kSpace / kLen) << "more ranges than the space holds";
    EXPECT_GE(span->iova, cfg.iova_start);
    EXPECT_LE(span->end() - 1, top);
    spans.push_back(*span);
  }
  ASSERT_EQ(spans.size(), kSpace / kLen);
  const auto highest =
      *std::max_element(spans.begin(), spans.end(), [](const IovaSpan& a, const IovaSpan& b) { return a.iova < b.iova; });
  EXPECT_EQ(highest.end() - 1, top);

  auto mem = DmaMemory::allocate(kLen);
  ASSERT_TRUE(mem) << mem.error().what();
  ASSERT_TRUE(domain_->map(mem->data(), highest.iova, kLen, iommu::kReadWrite));
  mem->fill(0xa5);
  ASSERT_TRUE(read(4321, 8, top + 1 - kPage));
  EXPECT_EQ(check_disk_pattern(mem->bytes().subspan(kLen - kPage, kPage), 4321), "");
  EXPECT_TRUE(all_bytes(mem->data(), kLen - kPage, 0xa5));

  for (const IovaSpan& s : spans) ASSERT_TRUE(arena->free(s));
  ASSERT_TRUE(arena->flush());
  EXPECT_EQ(kernel_entries(), 0u);

  ArenaConfig past = quiet_config(false);
  past.iova_start = top + 1;
  past.iova_end = 0;
  auto none = IovaArena::create(*domain_, past);
  ASSERT_FALSE(none) << "an arena past the last IOVA was created";
  EXPECT_EQ(none.error().code, Errc::invalid_argument);
}

}  // namespace
}  // namespace dmakit::vmtest
