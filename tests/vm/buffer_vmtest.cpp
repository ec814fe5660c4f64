// Guest test: the buffer allocator on the real VFIO domain of an NVMe
// controller, with the memory the guest has. With hugepages, large buffers
// are built from 2 MiB hugepages on 2 MiB-aligned IOVAs and mapped with one
// entry per virtually contiguous run; the device's writes land in the right
// bytes of the right chunk. When the hugepages are really used up, buffers
// come from 4 KiB anonymous memory and still work. In a guest without
// hugepages the EAL runs on 4 KiB pages and every buffer comes from the
// anonymous source from the start. Freeing everything and trimming returns
// the domain to where it started.
//
// The cases share one EAL, domain, allocator and controller (the EAL starts
// once per process, and the exhaustion they build on is state): they run in
// the order written and each builds on the previous one.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "alloc_buffer/buffer_allocator.hpp"
#include "base/eal.hpp"
#include "checks.hpp"
#include "facts.hpp"
#include "guest.hpp"
#include "iommu/iova_arena.hpp"
#include "iommu/vfio.hpp"
#include "nvme.hpp"

namespace dmakit::vmtest {
namespace {

using alloc_buffer::Buffer;
using alloc_buffer::BufferAllocator;
using alloc_buffer::BufferRequest;
using alloc_buffer::BufferChunk;
using iommu::IovaArena;
using iommu::vfio::VfioDomain;

constexpr uint64_t kPage = NvmeController::kPageSize;
constexpr uint64_t k2M = 2ull << 20;
constexpr uint16_t kQueueEntries = 16;
constexpr uint64_t kDiskLbas = 16 * 2048;  // run-guest.sh's 16 MiB disk
constexpr uint16_t kReadBlocks = 24;       // 12 KiB: PRP1 mid-page plus a PRP list
constexpr uint64_t kSizes[] = {4ull << 10, 64ull << 10, 1ull << 20, 4ull << 20, 16ull << 20, 64ull << 20};
// The hugepage cases hold 4 + 16 + 64 MiB of pages plus the carved parents
// (44 pages) in slabs of 16 before they use the rest up.
constexpr uint64_t kHugeCasePages = 64;

// What every case uses; built once, torn down after the last case.
struct Rig {
  bool huge = false;  // the guest has free hugepages: the EAL and the allocator use them
  std::unique_ptr<VfioDomain> domain;
  std::unique_ptr<IovaArena> arena;
  std::unique_ptr<BufferAllocator> buffers;
  Buffer control;  // queues (pages 0-3) and the PRP list (page 4)
  std::optional<NvmeController> ctrl;
  uint64_t empty_avail = 0;  // dma_avail of the domain before anything was mapped
  uint64_t base_mappings = 0, base_avail = 0;  // with only the control buffer mapped
  std::vector<Buffer> held;  // buffers the cases keep alive for later ones
  std::string error;         // why the rig could not be built
};
Rig* rig = nullptr;

// Host address of byte `off` of a buffer, found through its chunk list (an
// independent path from Buffer::at).
std::byte* byte_at(const Buffer& b, uint64_t off) {
  for (const BufferChunk& c : b.chunks()) {
    const uint64_t first = c.iova - b.iova();
    if (off >= first && off < first + c.len) return static_cast<std::byte*>(c.vaddr) + (off - first);
  }
  return nullptr;
}

// Virtually contiguous runs of the chunk list: the mappings the buffer needs.
uint32_t va_runs(const Buffer& b) {
  uint32_t runs = 0;
  const std::byte* next = nullptr;
  for (const BufferChunk& c : b.chunks()) {
    if (static_cast<const std::byte*>(c.vaddr) != next) ++runs;
    next = static_cast<const std::byte*>(c.vaddr) + c.len;
  }
  return runs;
}

std::string describe(const Buffer& b) {
  std::string s = fmt::format("buffer {} bytes at IOVA {:#x}, {} mappings, chunks:", b.size(), b.iova(), b.mappings());
  for (const BufferChunk& c : b.chunks())
    s += fmt::format(" [{} {:#x}+{:#x} va {}]", c.source, c.iova, c.len, c.vaddr);
  return s;
}

class BufferVfio : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    rig = new Rig;
    rig->error = build_rig(*rig);
  }

  static void TearDownTestSuite() {
    if (rig->ctrl) (void)rig->ctrl->disable();
    delete rig;  // controller, buffers, allocator, arena, domain: in that order below
    rig = nullptr;
  }

  static std::string build_rig(Rig& r) {
    const auto& facts = guest_facts();
    if (!facts) return facts.error().what();
    std::cout << facts->str() << "\n";
    if (auto bound = on_vfio(kNvmeBdf, "the NVMe under test"); !bound) return bound.message();
    r.huge = facts->hugepages_free > 0;
    if (r.huge && facts->hugepage_kb != 2048)
      return fmt::format("the default hugepage size is {} KiB; these cases use 2 MiB pages", facts->hugepage_kb);
    if (r.huge && facts->hugepages_free < kHugeCasePages)
      return fmt::format("{} free hugepages: the hugepage cases need at least {} (0 runs the 4 KiB cases)",
                         facts->hugepages_free, kHugeCasePages);
    // auto: the EAL takes hugepages exactly when the guest has some free.
    // Its --no-huge heap stays small: these cases never use it.
    base::EalSettings eal;
    eal.mode = "auto";
    eal.memory_mb = 64;
    auto info = base::ensure_eal(eal);
    if (!info) return info.error().what();
    if ((*info)->hugepages != r.huge)
      return fmt::format("the EAL chose {} ({}) but the guest has {} free hugepages",
                         (*info)->hugepages ? "hugepages" : "4 KiB pages", (*info)->reason, facts->hugepages_free);
    auto domain = VfioDomain::open(std::string_view(kNvmeBdf));
    if (!domain) return domain.error().what();
    r.domain = std::move(*domain);
    r.empty_avail = r.domain->dma_avail();
    auto arena = IovaArena::create(*r.domain, iommu::ArenaConfig{});
    if (!arena) return arena.error().what();
    r.arena = std::move(*arena);
    // These cases drive the builder (every buffer its own range and
    // mapping); slab buffers have a case and an allocator of their own.
    alloc_buffer::BufferSettings bs;
    bs.slab_max = 0;
    auto buffers = alloc_buffer::create_buffer_allocator(*r.arena, bs);
    if (!buffers) return buffers.error().what();
    r.buffers = std::move(*buffers);

    auto control = r.buffers->alloc(BufferRequest{5 * kPage, true});
    if (!control) return control.error().what();
    if (!control->virtually_contiguous()) return "control buffer is not one run: " + describe(*control);
    r.control = std::move(*control);
    auto ctrl = start_nvme(*r.domain, kNvmeBdf, {page(0), page(1), page(2), page(3), kQueueEntries});
    if (!ctrl) return ctrl.error().what();
    r.ctrl.emplace(std::move(*ctrl));
    r.base_mappings = r.domain->stats().mappings;
    r.base_avail = r.domain->dma_avail();
    return "";
  }

  static DmaRef page(size_t i) {
    return DmaRef{rig->control.at(i * kPage), rig->control.iova() + i * kPage, kPage};
  }

  void SetUp() override { ASSERT_EQ(rig->error, "") << "guest rig could not be built"; }

  // Allocates a buffer and checks the domain gained exactly its runs.
  static Result<Buffer> alloc_counted(uint64_t len, ::testing::AssertionResult& counted) {
    const uint64_t maps0 = rig->domain->stats().mappings;
    const uint64_t avail0 = rig->domain->dma_avail();
    auto b = rig->buffers->alloc(BufferRequest{len});
    if (!b) return b;
    const uint64_t maps = rig->domain->stats().mappings - maps0;
    const uint64_t entries = avail0 - rig->domain->dma_avail();
    counted = ::testing::AssertionSuccess();
    if (maps != b->mappings() || entries != b->mappings() || va_runs(*b) != b->mappings())
      counted = ::testing::AssertionFailure()
                << fmt::format("domain mappings +{}, kernel entries +{}, VA runs {}, buffer says {}: {}", maps,
                               entries, va_runs(*b), b->mappings(), describe(*b));
    return b;
  }

  // An NVMe Read into the buffer at an offset that crosses from one chunk
  // into the next (or the middle of a single chunk, across a page), checked
  // byte by byte through the chunk list, with the bytes around untouched.
  static ::testing::AssertionResult read_lands(const Buffer& b, uint64_t lba) {
    const auto chunks = b.chunks();
    uint16_t blocks = kReadBlocks;
    uint64_t off = 0;
    if (b.size() <= kPage) {
      off = 1024;
      blocks = 4;
    } else {
      const uint64_t boundary = chunks.size() > 1 ? chunks[1].iova - b.iova() : b.size() / 2;
      off = boundary - kPage - 1024;  // ends 7 KiB past the boundary
    }
    const uint64_t bytes = uint64_t{blocks} * kLbaSize;
    const uint64_t lo = off >= kPage ? off - kPage : 0;
    const uint64_t hi = std::min(b.size(), off + bytes + kPage);
    for (uint64_t i = lo; i < hi; ++i) {
      std::byte* p = byte_at(b, i);
      if (p == nullptr) return ::testing::AssertionFailure() << "offset " << i << " is in no chunk";
      if (p != b.at(i)) return ::testing::AssertionFailure() << "Buffer::at(" << i << ") disagrees with the chunk list";
      *reinterpret_cast<volatile uint8_t*>(p) = 0xa5;
    }
    if (auto done = completed(rig->ctrl->read(lba, blocks, b.iova() + off, bytes, page(4))); !done) return done;
    for (uint64_t i = lo; i < hi; ++i) {
      const auto v = *reinterpret_cast<const volatile uint8_t*>(byte_at(b, i));
      if (i < off || i >= off + bytes) {
        if (v != 0xa5)
          return ::testing::AssertionFailure() << fmt::format("byte {} outside the read changed to {:#x}", i, v);
        continue;
      }
      // The disk pattern: LBA n is 64 copies of the u64 n.
      const uint64_t in = i - off;
      const uint64_t want = lba + in / kLbaSize;
      const auto expect = static_cast<uint8_t>(want >> (8 * (in % 8)));
      if (v != expect)
        return ::testing::AssertionFailure()
               << fmt::format("byte {} (read offset {}) is {:#x}, want {:#x} of LBA {}; {}", i, in, v, expect, want,
                              describe(b));
    }
    return ::testing::AssertionSuccess() << fmt::format("read at offset {:#x}", off);
  }

  // Every size from anonymous 4 KiB memory, as one run, reached by the
  // device; the buffers are kept for the last case.
  static ::testing::AssertionResult expect_anonymous(uint64_t lba) {
    for (uint64_t len : kSizes) {
      auto counted = ::testing::AssertionSuccess();
      auto b = alloc_counted(len, counted);
      if (!b) return ::testing::AssertionFailure() << len << " bytes: " << b.error().what();
      if (!counted) return counted;
      for (const BufferChunk& c : b->chunks())
        if (c.source != "anon-4K") return ::testing::AssertionFailure() << "not anonymous: " << describe(*b);
      if (b->mappings() != 1u) return ::testing::AssertionFailure() << "not one run: " << describe(*b);
      if (auto landed = read_lands(*b, lba); !landed) return landed << " (" << len << " bytes)";
      lba += 1000;
      rig->held.push_back(std::move(*b));
    }
    return ::testing::AssertionSuccess();
  }

  static const alloc_buffer::MemorySource* source(std::string_view name) {
    for (const auto* s : rig->buffers->sources())
      if (s->name() == name) return s;
    return nullptr;
  }
};

// With hugepages: chunks of 2 MiB from hugepages on 2 MiB-aligned IOVAs for
// every buffer of 2 MiB and more, carved hugepage pieces for 1 MiB and
// 64 KiB, anonymous memory for 4 KiB (the smallest order). Without: the
// anonymous source is the allocator's only one and serves every size as one
// run.
TEST_F(BufferVfio, BuffersFromTheGuestsMemoryMapByRunsAndReceiveDeviceData) {
  std::vector<std::string_view> names;
  for (const auto* src : rig->buffers->sources()) names.push_back(src->name());
  std::sort(names.begin(), names.end());
  if (rig->huge) {
    EXPECT_EQ(names, (std::vector<std::string_view>{"anon-4K", "carved-1M", "carved-64K", "hugepage-2M"}));
  } else {
    EXPECT_EQ(names, std::vector<std::string_view>{"anon-4K"});
  }
  EXPECT_EQ(rig->base_mappings, 1u) << "the control buffer is one mapping";
  EXPECT_EQ(rig->empty_avail - rig->base_avail, 1u);
  uint64_t lba = 100;
  for (uint64_t len : kSizes) {
    SCOPED_TRACE(fmt::format("{} bytes", len));
    auto counted = ::testing::AssertionSuccess();
    auto b = alloc_counted(len, counted);
    ASSERT_TRUE(b) << b.error().what();
    EXPECT_TRUE(counted);
    EXPECT_EQ(b->size(), len);
    EXPECT_GE(b->span(), len);
    EXPECT_LE(b->mappings(), b->chunks().size());
    uint64_t off = 0;
    for (const BufferChunk& c : b->chunks()) {
      EXPECT_EQ(c.iova, b->iova() + off) << "chunks must tile the IOVA range in order";
      off += c.len;
    }
    EXPECT_EQ(off, b->span());
    if (!rig->huge) {
      for (const BufferChunk& c : b->chunks()) EXPECT_EQ(c.source, "anon-4K") << describe(*b);
      EXPECT_EQ(b->mappings(), 1u) << "anonymous memory comes as one run: " << describe(*b);
    } else if (len >= k2M) {
      EXPECT_EQ(b->chunks().size(), len / k2M) << describe(*b);
      for (const BufferChunk& c : b->chunks()) {
        EXPECT_EQ(c.source, "hugepage-2M") << describe(*b);
        EXPECT_EQ(c.len, k2M);
        EXPECT_EQ(c.order, k2M);
        EXPECT_EQ(c.iova % k2M, 0u) << fmt::format("chunk IOVA {:#x} not 2 MiB aligned", c.iova);
        EXPECT_EQ(reinterpret_cast<uintptr_t>(c.vaddr) % k2M, 0u);
      }
    } else {
      ASSERT_EQ(b->chunks().size(), 1u) << describe(*b);
      const std::string_view want = len == (1u << 20) ? "carved-1M" : len == (64u << 10) ? "carved-64K" : "anon-4K";
      EXPECT_EQ(b->chunks()[0].source, want);
      EXPECT_EQ(b->iova() % len, 0u) << "a single-chunk buffer sits on an IOVA aligned to its order";
    }
    EXPECT_TRUE(read_lands(*b, lba));
    std::cout << fmt::format("{} KiB: {} chunks, {} mappings\n", len >> 10, b->chunks().size(), b->mappings());
    lba += 1000;
    rig->held.push_back(std::move(*b));
  }
  if (!rig->huge) {
    const auto* anon = source("anon-4K");
    ASSERT_NE(anon, nullptr);
    EXPECT_GE(anon->stats().live_bytes, (85ull << 20)) << "every buffer is anonymous memory";
    return;
  }
  const auto* huge = source("hugepage-2M");
  ASSERT_NE(huge, nullptr);
  EXPECT_GE(huge->stats().live_bytes, (84ull << 20)) << "4 + 16 + 64 MiB of pages plus the carved parents";
}

// Uses up the hugepages for real: 2 MiB buffers until the hugepage order
// fails, then 1 MiB and 64 KiB buffers until the carved pieces left in
// partly used hugepages are gone. Every size then comes from 4 KiB
// anonymous memory, as one run, and the device's data still lands.
// Without hugepages there is nothing to use up: the guest's pool is empty
// and stays so, and the sizes come from anonymous memory all the same.
TEST_F(BufferVfio, AnonymousMemoryAfterHugepagesRunOut) {
  if (!rig->huge) {
    const base::HugepageCounts hp = base::read_hugepages();
    EXPECT_EQ(hp.total, 0u) << "a guest without hugepages gained some";
    EXPECT_EQ(source("hugepage-2M"), nullptr);
    EXPECT_TRUE(expect_anonymous(9000));
    return;
  }
  const auto* huge = source("hugepage-2M");
  ASSERT_NE(huge, nullptr);
  const auto exhaust = [](uint64_t len, std::string_view from, size_t cap) -> ::testing::AssertionResult {
    for (size_t n = 0; n < cap; ++n) {
      auto counted = ::testing::AssertionSuccess();
      auto b = alloc_counted(len, counted);
      if (!b) return ::testing::AssertionFailure() << b.error().what();
      if (!counted) return counted;
      const std::string_view got = b->chunks().front().source;
      rig->held.push_back(std::move(*b));
      if (got != from) return ::testing::AssertionSuccess() << n << " buffers of " << len << " from " << from;
    }
    return ::testing::AssertionFailure() << from << " still serves " << len << "-byte buffers after " << cap;
  };
  EXPECT_TRUE(exhaust(k2M, "hugepage-2M", 512));
  EXPECT_GT(huge->stats().failures, 0u) << "the hugepage source never failed";
  EXPECT_TRUE(exhaust(1u << 20, "carved-1M", 64));
  EXPECT_TRUE(exhaust(64u << 10, "carved-64K", 64));
  const base::HugepageCounts hp = base::read_hugepages();
  std::cout << fmt::format("hugepages after exhaustion: total {}, free {}; hugepage-2M source holds {} MiB\n",
                           hp.total, hp.free, huge->stats().live_bytes >> 20);
  // One page may stay free: a one-page slab costs DPDK two (its element
  // header sits before the page), so a lone page is of no use to the source.
  EXPECT_LE(hp.free, 1u) << "the kernel still has free 2 MiB pages: exhaustion was not real";
  EXPECT_TRUE(expect_anonymous(9000));
}

// Small buffers from slabs on the real container: a thousand of them take
// only their slabs' entries (the kernel's count agrees), the device's data
// lands in them, and freeing and trimming gives every entry back.
TEST_F(BufferVfio, SmallBuffersShareSlabMappingsAndReceiveDeviceData) {
  alloc_buffer::BufferSettings bs;
  bs.psi = false;
  auto slabs = alloc_buffer::create_buffer_allocator(*rig->arena, bs);
  ASSERT_TRUE(slabs) << slabs.error().what();
  const uint64_t maps0 = rig->domain->stats().mappings, avail0 = rig->domain->dma_avail();
  std::vector<Buffer> small;
  for (int i = 0; i < 1000; ++i) {
    auto b = (*slabs)->alloc(BufferRequest{i % 10 == 0 ? (64ull << 10) : kPage});
    ASSERT_TRUE(b) << i << ": " << b.error().what();
    ASSERT_TRUE(b->from_slab());
    small.push_back(std::move(*b));
  }
  const auto st = (*slabs)->stats();
  const uint64_t maps = rig->domain->stats().mappings - maps0;
  EXPECT_EQ(maps, st.map_calls);
  EXPECT_EQ(avail0 - rig->domain->dma_avail(), maps) << "the kernel counts the same entries";
  EXPECT_GE(st.slabs, 1u);
  EXPECT_LE(maps, 16u) << "1000 small buffers took " << maps << " entries";
  EXPECT_TRUE(read_lands(small[1], 20000));    // 4 KiB
  EXPECT_TRUE(read_lands(small[990], 21000));  // 64 KiB
  std::cout << fmt::format("1000 slab buffers: {} slabs, {} entries\n", st.slabs, maps);
  small.clear();
  (*slabs)->trim(true);
  EXPECT_EQ(rig->domain->stats().mappings, maps0);
  EXPECT_EQ(rig->domain->dma_avail(), avail0);
}

// Freeing every buffer, trimming the recycler and flushing the arena
// leaves the domain as it was with only the control buffer; then, with the
// controller stopped and that buffer freed too, with no mapping at all.
TEST_F(BufferVfio, FreeTrimFlushReturnsToBaseline) {
  ASSERT_GE(rig->held.size(), 2 * std::size(kSizes)) << "the earlier cases did not run";
  rig->held.clear();
  rig->buffers->trim(true);
  auto st = rig->arena->flush();
  ASSERT_TRUE(st) << st.error().what();
  EXPECT_EQ(rig->domain->stats().mappings, rig->base_mappings);
  EXPECT_EQ(rig->domain->dma_avail(), rig->base_avail);
  auto s = rig->buffers->stats();
  EXPECT_EQ(s.buffers_live, 1u);
  EXPECT_EQ(s.recycled_bytes, 0u);
  EXPECT_EQ(s.pending_flush_bytes, 0u);
  if (rig->huge) {
    const auto* huge = source("hugepage-2M");
    ASSERT_NE(huge, nullptr);
    EXPECT_EQ(huge->stats().live_bytes, 0u) << "hugepages still taken after trim";
  } else {
    const auto* anon = source("anon-4K");
    ASSERT_NE(anon, nullptr);
    EXPECT_EQ(anon->stats().live_bytes, rig->control.span()) << "anonymous memory beyond the control buffer after trim";
  }
  EXPECT_EQ(rig->arena->stats().pages_in_use, 5u) << "only the control buffer's pages";

  ASSERT_TRUE(rig->ctrl->disable());
  rig->ctrl.reset();
  rig->control = Buffer{};
  rig->buffers->trim(true);
  EXPECT_EQ(rig->domain->stats().mappings, 0u);
  EXPECT_EQ(rig->domain->dma_avail(), rig->empty_avail);
  EXPECT_EQ(rig->arena->stats().pages_in_use, 0u);
  EXPECT_EQ(rig->arena->stats().stale_pages, 0u);
  EXPECT_TRUE(rig->arena->check());
}

}  // namespace
}  // namespace dmakit::vmtest
