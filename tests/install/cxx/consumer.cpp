// An out-of-tree C++ driver's first steps with the installed dmakit (through
// find_package(dmakit)) on the public C++ API alone: a context on the
// simulated IOMMU, a DMA buffer below 4 GiB written and read back, a DMA
// pool's blocks allocated and freed, its own memory mapped and looked up, the
// context's statistics printed.
#include <dmakit/dmakit.hpp>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

int fail(const char* what, const dmakit::Error& e) {
  std::fprintf(stderr, "consumer_cxx: %s failed: %s\n", what, e.what().c_str());
  return 1;
}
int fail(const char* what) {
  std::fprintf(stderr, "consumer_cxx: %s failed\n", what);
  return 1;
}

}  // namespace

int main() {
  if (std::strcmp(dmakit_version(), DMAKIT_VERSION_STRING) != 0) return fail("version match");
  const std::vector<std::string> overrides = {"--iommu.backend", "sim", "--eal.mode", "nohuge",
                                              "--eal.memory_mb", "64"};
  auto ctx = dmakit::Context::create("", overrides);
  if (!ctx) return fail("Context::create", ctx.error());

  constexpr std::uint64_t len = 256 * 1024;
  auto buf = ctx->alloc_buffer(len, {.dma_limit = UINT32_MAX});
  if (!buf) return fail("alloc_buffer", buf.error());
  if (buf->iova() + len - 1 > UINT32_MAX) return fail("DMA limit");
  auto* p = static_cast<unsigned char*>(buf->at(0));
  for (std::uint64_t i = 0; i < len; ++i) p[i] = static_cast<unsigned char>(i ^ 0x5a);
  for (std::uint64_t i = 0; i < len; ++i)
    if (p[i] != static_cast<unsigned char>(i ^ 0x5a)) return fail("buffer read back");

  auto pool = ctx->create_pool("prp-list", 4096, 4096);
  if (!pool) return fail("create_pool", pool.error());
  std::vector<dmakit::Block> blocks;
  for (int i = 0; i < 32; ++i) {
    auto b = pool->alloc();
    if (!b) return fail("Pool::alloc", b.error());
    if (b->iova % 4096 != 0) return fail("block alignment");
    std::memset(b->vaddr, 0xa5, 4096);
    blocks.push_back(*b);
  }
  for (const auto& b : blocks)
    if (auto st = pool->free(b); !st) return fail("Pool::free", st.error());
  if (auto again = pool->free(blocks.front()); again || again.error().code != dmakit::Errc::corrupted)
    return fail("double free refused");

  std::vector<unsigned char> mine(64 * 1024);
  auto iova = ctx->map_memory(mine.data(), mine.size());
  if (!iova) return fail("map_memory", iova.error());
  auto t = ctx->vtophys(mine.data() + 1000);
  if (!t || t->iova != *iova + 1000) return fail("vtophys");
  auto stats = ctx->stats();
  if (!stats) return fail("stats", stats.error());
  std::printf("consumer_cxx: stats: %llu mappings, %llu buffers live, %llu caller mappings\n",
              static_cast<unsigned long long>(stats->mappings), static_cast<unsigned long long>(stats->buffers_live),
              static_cast<unsigned long long>(stats->caller_maps));
  if (auto st = ctx->unmap_memory(mine.data()); !st) return fail("unmap_memory", st.error());

  std::printf("consumer_cxx: dmakit %s: buffer of %llu bytes below 4 GiB, %zu pool blocks: ok\n", dmakit_version(),
              static_cast<unsigned long long>(buf->size()), blocks.size());
  return 0;
}
