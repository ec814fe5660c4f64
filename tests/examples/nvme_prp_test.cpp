// Host test of the example NVMe driver's PRP builder (examples/nvme/prp.cpp)
// on the public API with the simulated backend: PRP1 and PRP2, lists,
// lists chained past 512 entries, unaligned starts, and refusals. The
// guest tests cover what QEMU's controller accepts; QEMU's transfer limit
// (MDTS) never lets it see a chained list, so the chain is checked here.
#include <gtest/gtest.h>

#include <dmakit/dmakit.hpp>

#include <optional>
#include <string>
#include <vector>

#include "nvme/prp.hpp"

namespace {

constexpr uint64_t kPage = 4096;

class NvmePrp : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::vector<std::string> overrides = {"--iommu.backend", "sim",  "--eal.mode",
                                                "nohuge",          "--eal.memory_mb", "64"};
    auto ctx = dmakit::Context::create("", overrides);
    ASSERT_TRUE(ctx) << ctx.error().what();
    ctx_.emplace(std::move(*ctx));
    auto pool = ctx_->create_pool("prp-test", kPage, kPage);
    ASSERT_TRUE(pool) << pool.error().what();
    pool_.emplace(std::move(*pool));
    auto buf = ctx_->alloc_buffer(8u << 20);
    ASSERT_TRUE(buf) << buf.error().what();
    buf_.emplace(std::move(*buf));
    auto segs = buf_->segments();
    ASSERT_TRUE(segs) << segs.error().what();
    segs_ = *segs;
  }
  void TearDown() override {
    for (const auto& b : lists_) EXPECT_TRUE(pool_->free(b));
  }

  dmakit::Result<nvme::Prp> build(uint64_t offset, uint64_t bytes) {
    return nvme::build_prp(nvme::DataRef{segs_, offset, bytes}, *pool_, lists_);
  }

  // The data page addresses a list at prp2 names, following chain links.
  std::vector<uint64_t> list_entries(uint64_t prp2, uint64_t n) const {
    std::vector<uint64_t> out;
    uint64_t at = prp2;
    while (out.size() < n) {
      const uint64_t* page = nullptr;
      for (const auto& b : lists_)
        if (b.iova == at) page = static_cast<const uint64_t*>(b.vaddr);
      if (page == nullptr) break;  // a link to no list page of ours
      for (size_t i = 0; i < 512 && out.size() < n; ++i) {
        if (i == 511 && n - out.size() > 1) {
          at = page[i];
          break;
        }
        out.push_back(page[i]);
      }
    }
    return out;
  }

  std::optional<dmakit::Context> ctx_;
  std::optional<dmakit::Pool> pool_;
  std::optional<dmakit::Buffer> buf_;
  std::vector<dmakit_segment> segs_;
  std::vector<dmakit::Block> lists_;
};

TEST_F(NvmePrp, UpToTwoPagesNeedNoList) {
  const uint64_t iova = buf_->iova();
  auto p = build(0, kPage);
  ASSERT_TRUE(p) << p.error().what();
  EXPECT_EQ(p->prp1, iova);
  EXPECT_EQ(p->prp2, 0u);
  p = build(0, 2 * kPage);
  ASSERT_TRUE(p) << p.error().what();
  EXPECT_EQ(p->prp2, iova + kPage);
  p = build(3584, 1024);  // crosses one page boundary
  ASSERT_TRUE(p) << p.error().what();
  EXPECT_EQ(p->prp1, iova + 3584);
  EXPECT_EQ(p->prp2, iova + kPage);
  EXPECT_TRUE(lists_.empty());
}

TEST_F(NvmePrp, ListNamesEveryPageAfterTheFirst) {
  const uint64_t iova = buf_->iova();
  auto p = build(520, 40 * 512);  // unaligned start: 3576 bytes in PRP1, then 5 pages
  ASSERT_TRUE(p) << p.error().what();
  EXPECT_EQ(p->prp1, iova + 520);
  ASSERT_EQ(lists_.size(), 1u);
  EXPECT_EQ(p->prp2, lists_[0].iova);
  const auto e = list_entries(p->prp2, 5);
  ASSERT_EQ(e.size(), 5u);
  for (uint64_t k = 0; k < 5; ++k) EXPECT_EQ(e[k], iova + (k + 1) * kPage) << "entry " << k;
}

TEST_F(NvmePrp, LongListsAreChained) {
  const uint64_t iova = buf_->iova();
  constexpr uint64_t kEntries = 1024;  // after PRP1: two links, three list pages
  auto p = build(0, (kEntries + 1) * kPage);
  ASSERT_TRUE(p) << p.error().what();
  ASSERT_EQ(lists_.size(), 3u);
  const auto e = list_entries(p->prp2, kEntries);
  ASSERT_EQ(e.size(), kEntries);
  for (uint64_t k = 0; k < kEntries; ++k) ASSERT_EQ(e[k], iova + (k + 1) * kPage) << "entry " << k;
}

// 512 entries exactly fill one page: its last slot is data, not a link.
TEST_F(NvmePrp, ExactlyOnePageOfEntriesHasNoLink) {
  const uint64_t iova = buf_->iova();
  auto p = build(0, 513 * kPage);
  ASSERT_TRUE(p) << p.error().what();
  ASSERT_EQ(lists_.size(), 1u);
  const auto* page = static_cast<const uint64_t*>(lists_[0].vaddr);
  EXPECT_EQ(page[511], iova + 512 * kPage);
}

TEST_F(NvmePrp, RefusesWhatPrpsCannotDescribe) {
  auto p = build(2, 512);
  ASSERT_FALSE(p);
  EXPECT_NE(p.error().message.find("not dword aligned"), std::string::npos) << p.error().message;
  p = build((8u << 20) - 512, 1024);
  ASSERT_FALSE(p);
  EXPECT_NE(p.error().message.find("beyond"), std::string::npos) << p.error().message;

  // A page that would run from one IOVA run into another.
  const dmakit_segment split[] = {{nullptr, 0x10000, 6144}, {nullptr, 0x40000, 2048}};
  p = nvme::build_prp(nvme::DataRef{split, 0, 8192}, *pool_, lists_);
  ASSERT_FALSE(p);
  EXPECT_NE(p.error().message.find("contiguous 4 KiB page"), std::string::npos) << p.error().message;
  // Runs that meet on page boundaries are fine, however far apart.
  const dmakit_segment pages[] = {{nullptr, 0x10000, 4096}, {nullptr, 0x40000, 4096}, {nullptr, 0x90000, 4096}};
  p = nvme::build_prp(nvme::DataRef{pages, 0, 3 * kPage}, *pool_, lists_);
  ASSERT_TRUE(p) << p.error().what();
  EXPECT_EQ(list_entries(p->prp2, 2), (std::vector<uint64_t>{0x40000, 0x90000}));
  auto stats = pool_->stats();
  ASSERT_TRUE(stats) << stats.error().what();
  EXPECT_EQ(stats->active, lists_.size()) << "a refused build gives its list pages back";
}

}  // namespace
