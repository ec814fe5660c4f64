// Guest test: DmaPool blocks drive a real NVMe controller behind vfio-pci.
// The admin and I/O queues are 4 KiB blocks of one pool, PRP lists are
// blocks of another, the data buffer comes from the buffer allocator; the
// controller fetches commands from the pool blocks and writes completions
// and data where the pools say. Odd-shaped blocks (68 bytes, align 32, no
// 4 KiB crossing) receive device writes at exactly their bytes. Afterwards
// the pools account for every block and refuse a double free. The pools'
// memory is what the guest has: hugepage pieces when it has hugepages,
// anonymous 4 KiB pages when it has none.
#include <gtest/gtest.h>

#include <algorithm>
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
#include "pool/dma_pool.hpp"

namespace dmakit::vmtest {
namespace {

using alloc_buffer::Buffer;
using alloc_buffer::BufferRequest;
using iommu::vfio::VfioDomain;
using pool::DmaBlock;
using pool::DmaPool;

constexpr size_t kPage = NvmeController::kPageSize;
constexpr uint16_t kQueueEntries = 32;

bool all_bytes(const void* p, size_t n, uint8_t v) {
  const auto* q = static_cast<const volatile uint8_t*>(p);
  for (size_t i = 0; i < n; ++i)
    if (q[i] != v) return false;
  return true;
}

void fill(void* p, size_t n, uint8_t v) {
  auto* q = static_cast<volatile uint8_t*>(p);
  for (size_t i = 0; i < n; ++i) q[i] = v;
}

class PoolVfio : public ::testing::Test {
 protected:
  void SetUp() override {
    // Read before the EAL starts (once per process), so the hugepage counts
    // are the guest's own.
    const auto& facts = guest_facts();
    ASSERT_TRUE(facts) << facts.error().what();
    ASSERT_TRUE(on_vfio(kNvmeBdf, "the NVMe under test"));
    huge_ = facts->hugepages_free > 0;
    // auto: hugepages exactly when the guest has some free; the --no-huge
    // heap stays small, the pools never use it.
    base::EalSettings eal;
    eal.mode = "auto";
    eal.memory_mb = 64;
    auto info = base::ensure_eal(eal);
    ASSERT_TRUE(info) << info.error().what();
    ASSERT_EQ((*info)->hugepages, huge_) << (*info)->reason << "\n" << facts->str();
    auto domain = VfioDomain::open(std::string_view(kNvmeBdf));
    ASSERT_TRUE(domain) << domain.error().what();
    domain_ = std::move(*domain);
    auto arena = iommu::IovaArena::create(*domain_, iommu::ArenaConfig{});
    ASSERT_TRUE(arena) << arena.error().what();
    arena_ = std::move(*arena);
    // Chunks as buffers of their own (no slabs), so the memory a source
    // holds is exactly the pools' chunks (buffer_vmtest covers slabs).
    alloc_buffer::BufferSettings bs;
    bs.slab_max = 0;
    auto buffers = alloc_buffer::create_buffer_allocator(*arena_, bs);
    ASSERT_TRUE(buffers) << buffers.error().what();
    buffers_ = std::move(*buffers);

    auto qp = DmaPool::create(*buffers_, "nvme-queue", kPage, kPage, 0);
    ASSERT_TRUE(qp) << qp.error().what();
    queue_pool_ = std::move(*qp);
    auto pp = DmaPool::create(*buffers_, "prp-list", kPage, kPage, 0);
    ASSERT_TRUE(pp) << pp.error().what();
    prp_pool_ = std::move(*pp);

    // ASQ, ACQ, I/O SQ, I/O CQ: one 4 KiB block each.
    for (int i = 0; i < 4; ++i) {
      auto b = queue_pool_->alloc();
      ASSERT_TRUE(b) << b.error().what();
      EXPECT_EQ(b->iova % kPage, 0u);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(b->vaddr) % kPage, 0u);
      queues_.push_back(*b);
    }
    auto ctrl = start_nvme(*domain_, kNvmeBdf,
                           {ref(queues_[0]), ref(queues_[1]), ref(queues_[2]), ref(queues_[3]), kQueueEntries});
    ASSERT_TRUE(ctrl) << ctrl.error().what();
    ctrl_.emplace(std::move(*ctrl));
  }

  void TearDown() override {
    // The controller stops before the queue blocks go back.
    if (ctrl_) {
      auto st = ctrl_->disable();
      EXPECT_TRUE(st) << st.error().what();
      ctrl_.reset();
    }
    if (queue_pool_) {
      for (const DmaBlock& b : queues_) EXPECT_TRUE(queue_pool_->free(b));
      EXPECT_EQ(queue_pool_->stats().active, 0u);
    }
    queue_pool_.reset();
    prp_pool_.reset();
    // With the pools gone their chunks are back in the allocator: trimming
    // and flushing leaves the domain without a mapping.
    if (buffers_) {
      buffers_->trim(true);
      EXPECT_EQ(domain_->stats().mappings, 0u) << "pool chunks still mapped after the pools were destroyed";
    }
  }

  static DmaRef ref(const DmaBlock& b, size_t len = kPage) { return DmaRef{b.vaddr, b.iova, len}; }

  // Bytes the allocator's anonymous 4 KiB source has handed out.
  uint64_t anon_live() const {
    for (const auto* s : buffers_->sources())
      if (s->name() == "anon-4K") return s->stats().live_bytes;
    ADD_FAILURE() << "the allocator has no anon-4K source";
    return 0;
  }

  bool huge_ = false;
  std::unique_ptr<VfioDomain> domain_;
  std::unique_ptr<iommu::IovaArena> arena_;
  std::unique_ptr<alloc_buffer::BufferAllocator> buffers_;
  std::unique_ptr<DmaPool> queue_pool_, prp_pool_;
  std::vector<DmaBlock> queues_;
  std::optional<NvmeController> ctrl_;
};

// Multi-page reads (PRP1 mid-page + a PRP list from the pool) into a
// buffer-allocator buffer: every byte lands, nothing around it changes.
TEST_F(PoolVfio, ReadsThroughPoolPrpListsLandInAllocatorBuffers) {
  auto data = buffers_->alloc(BufferRequest{256 << 10});
  ASSERT_TRUE(data) << data.error().what();
  struct Case {
    uint64_t lba;
    uint16_t blocks;
    uint64_t offset;
  };
  // 240 KiB over 61 pages; 12 KiB over 4 pages; 64 KiB + 512 across pages.
  const Case cases[] = {{1000, 480, 1024}, {5000, 24, 3 * kPage + 2048}, {20000, 129, 128 << 10}};
  std::vector<DmaBlock> lists;
  for (const Case& k : cases) {
    SCOPED_TRACE(fmt::format("LBA {} x {} at offset {}", k.lba, k.blocks, k.offset));
    const uint64_t bytes = uint64_t{k.blocks} * kLbaSize;
    ASSERT_LE(k.offset + bytes, data->size());
    for (uint64_t i = 0; i < data->size(); i += kPage) fill(data->at(i), kPage, 0xa5);
    auto list = prp_pool_->alloc();
    ASSERT_TRUE(list) << list.error().what();
    EXPECT_EQ(list->iova % kPage, 0u);
    fill(list->vaddr, kPage, 0xee);
    lists.push_back(*list);
    ASSERT_TRUE(completed(ctrl_->read(k.lba, k.blocks, data->iova() + k.offset, bytes, ref(*list))));
    // The list holds the IOVA of every page after the first.
    const uint64_t first_page = (data->iova() + k.offset) & ~uint64_t{kPage - 1};
    const uint64_t last_page = (data->iova() + k.offset + bytes - 1) & ~uint64_t{kPage - 1};
    const auto* entries = static_cast<const uint64_t*>(list->vaddr);
    for (uint64_t p = first_page + kPage, i = 0; p <= last_page; p += kPage, ++i)
      ASSERT_EQ(entries[i], p) << "PRP list entry " << i;
    // Through Buffer::at, so the check holds whatever the chunk layout.
    for (uint64_t j = 0; j < k.blocks; ++j) {
      const auto* lba = static_cast<const std::byte*>(data->at(k.offset + j * kLbaSize));
      ASSERT_EQ(check_disk_pattern({lba, kLbaSize}, k.lba + j), "") << "LBA " << j << " of the read";
    }
    for (uint64_t i = 0; i < data->size(); ++i) {
      if (i == k.offset) i += bytes;
      if (i >= data->size()) break;
      ASSERT_EQ(*static_cast<const volatile uint8_t*>(data->at(i)), 0xa5) << "byte " << i << " outside the read changed";
    }
  }
  // Three lists in use at once are three distinct blocks.
  EXPECT_EQ(prp_pool_->stats().active, 3u);
  EXPECT_NE(lists[0].iova, lists[1].iova);
  EXPECT_NE(lists[1].iova, lists[2].iova);
  for (const DmaBlock& b : lists) ASSERT_TRUE(prp_pool_->free(b));

  const auto s = prp_pool_->stats();
  EXPECT_EQ(s.active, 0u);
  EXPECT_EQ(s.validation_failures, 0u);
  // The same block again: refused, counted, nothing else changes.
  auto again = prp_pool_->free(lists[0]);
  ASSERT_FALSE(again) << "a double free was accepted";
  EXPECT_EQ(again.error().code, Errc::corrupted);
  EXPECT_EQ(prp_pool_->stats().validation_failures, 1u);
  EXPECT_EQ(prp_pool_->stats().active, 0u);
  // A pointer into the middle of a block and a wrong IOVA are refused too.
  auto b = prp_pool_->alloc();
  ASSERT_TRUE(b) << b.error().what();
  EXPECT_FALSE(prp_pool_->free(static_cast<char*>(b->vaddr) + 64, b->iova + 64));
  EXPECT_FALSE(prp_pool_->free(b->vaddr, b->iova + kPage));
  EXPECT_EQ(prp_pool_->stats().validation_failures, 3u);
  EXPECT_TRUE(prp_pool_->free(*b));
  EXPECT_EQ(prp_pool_->stats().active, 0u);

  // The queue pool served four blocks and the controller used them.
  const auto q = queue_pool_->stats();
  EXPECT_EQ(q.active, 4u);
  EXPECT_EQ(q.validation_failures, 0u);
}

// Blocks of 68 bytes, aligned to 32, never crossing a 4 KiB IOVA boundary:
// the controller writes 64 bytes of its SMART log into several of them
// (Get Log Page, PRP1 only) and touches nothing else.
TEST_F(PoolVfio, OddBlocksReceiveExactlyTheDeviceWrite) {
  auto odd = DmaPool::create(*buffers_, "sgl-odd", 68, 32, 4096);
  ASSERT_TRUE(odd) << odd.error().what();
  DmaPool& pool = **odd;
  EXPECT_EQ(pool.block_size(), 96u) << "68 rounded up to the 32-byte alignment";
  std::vector<DmaBlock> blocks;
  for (int i = 0; i < 200; ++i) {
    auto b = pool.alloc();
    ASSERT_TRUE(b) << b.error().what();
    EXPECT_EQ(b->iova % 32, 0u);
    EXPECT_EQ(b->iova / 4096, (b->iova + 67) / 4096) << fmt::format("block at {:#x} crosses 4 KiB", b->iova);
    fill(b->vaddr, 68, 0xa5);
    blocks.push_back(*b);
  }
  // Device writes into every 17th block; the others must stay as filled.
  for (size_t i = 0; i < blocks.size(); i += 17) {
    SCOPED_TRACE(fmt::format("block {} at IOVA {:#x}", i, blocks[i].iova));
    NvmeCommand cmd;
    cmd.opcode = 0x02;        // Get Log Page
    cmd.nsid = 0xffffffff;    // controller-wide
    cmd.prp1 = blocks[i].iova;
    cmd.cdw10 = 0x02 | (15u << 16);  // LID 2: SMART / Health; NUMDL: 16 dwords, 0-based
    ASSERT_TRUE(completed(ctrl_->submit_admin(cmd)));
    const auto* p = static_cast<const uint8_t*>(blocks[i].vaddr);
    // Composite temperature, bytes 2:1, in kelvin: a plausible value arrived.
    const unsigned kelvin = p[1] | (unsigned{p[2]} << 8);
    EXPECT_GE(kelvin, 273u);
    EXPECT_LE(kelvin, 373u);
    EXPECT_FALSE(all_bytes(p, 64, 0xa5)) << "no data arrived";
    EXPECT_TRUE(all_bytes(p + 64, 4, 0xa5)) << "the device wrote past the 64 bytes asked for";
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (i % 17 != 0) {
      EXPECT_TRUE(all_bytes(blocks[i].vaddr, 68, 0xa5)) << "block " << i << " changed";
    }
  }

  for (const DmaBlock& b : blocks) ASSERT_TRUE(pool.free(b));
  auto s = pool.stats();
  EXPECT_EQ(s.active, 0u);
  EXPECT_EQ(s.blocks, s.chunks * (s.chunk_bytes / 4096) * (4096 / 96)) << "42 blocks per 4 KiB segment";
  EXPECT_EQ(s.validation_failures, 0u);
  EXPECT_FALSE(pool.free(blocks[5])) << "a double free was accepted";
  EXPECT_EQ(pool.stats().validation_failures, 1u);
}

// Where the pools' chunks come from follows the guest: with hugepages the
// queue pool's chunk is hugepage memory (no anonymous page is used), without
// them the anonymous source, the allocator's only one, holds exactly it.
TEST_F(PoolVfio, PoolChunksComeFromTheGuestsMemory) {
  const auto q = queue_pool_->stats();
  ASSERT_GE(q.chunks, 1u);
  std::vector<std::string_view> names;
  for (const auto* s : buffers_->sources()) names.push_back(s->name());
  if (huge_) {
    EXPECT_NE(std::find(names.begin(), names.end(), "hugepage-2M"), names.end());
    EXPECT_EQ(anon_live(), 0u) << "pool chunks taken from anonymous memory although hugepages are free";
  } else {
    EXPECT_EQ(names, std::vector<std::string_view>{"anon-4K"});
    EXPECT_EQ(anon_live(), q.chunks * q.chunk_bytes);
  }
  // A 64 KiB block pool grows by one chunk from the same memory.
  auto big = DmaPool::create(*buffers_, "big", 64 << 10, 64 << 10, 0);
  ASSERT_TRUE(big) << big.error().what();
  const uint64_t anon_before = anon_live();
  auto b = (*big)->alloc();
  ASSERT_TRUE(b) << b.error().what();
  EXPECT_EQ(b->iova % (64 << 10), 0u);
  const auto s = (*big)->stats();
  EXPECT_EQ(s.chunks, 1u);
  EXPECT_EQ(anon_live() - anon_before, huge_ ? 0u : s.chunk_bytes);
  EXPECT_TRUE((*big)->free(*b));
}

}  // namespace
}  // namespace dmakit::vmtest
