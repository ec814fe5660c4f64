// An out-of-tree C++ driver's first steps with the installed dmakit (through
// find_package(dmakit)): a context on the simulated IOMMU, a DMA buffer
// written and read back, a DMA pool's blocks allocated and freed.
#include <dmakit/dmakit.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

namespace {

int fail(const char* what, int rc) {
  std::fprintf(stderr, "consumer_cxx: %s failed: %d: %s\n", what, rc, dmakit_last_error());
  return 1;
}

struct Deleter {
  void operator()(dmakit_ctx* c) const { dmakit_ctx_destroy(c); }
  void operator()(dmakit_buffer* b) const { dmakit_buffer_free(b); }
  void operator()(dmakit_pool* p) const { dmakit_pool_destroy(p); }
};

}  // namespace

int main() {
  const char* const overrides[] = {"--iommu.backend", "sim", "--eal.mode", "nohuge", "--eal.memory_mb", "64"};
  if (std::strcmp(dmakit_version(), DMAKIT_VERSION_STRING) != 0) return fail("version match", -1);

  dmakit_ctx* raw_ctx = nullptr;
  int rc = dmakit_ctx_create(nullptr, 6, overrides, &raw_ctx);
  if (rc != DMAKIT_OK) return fail("dmakit_ctx_create", rc);
  std::unique_ptr<dmakit_ctx, Deleter> ctx(raw_ctx);

  dmakit_buffer* raw_buf = nullptr;
  constexpr std::uint64_t len = 256 * 1024;
  rc = dmakit_buffer_alloc(ctx.get(), len, 0, UINT32_MAX, &raw_buf);
  if (rc != DMAKIT_OK) return fail("dmakit_buffer_alloc", rc);
  std::unique_ptr<dmakit_buffer, Deleter> buf(raw_buf);
  if (dmakit_buffer_iova(buf.get()) + len - 1 > UINT32_MAX) return fail("DMA limit", -1);
  auto* p = static_cast<unsigned char*>(dmakit_buffer_at(buf.get(), 0));
  for (std::uint64_t i = 0; i < len; ++i) p[i] = static_cast<unsigned char>(i ^ 0x5a);
  for (std::uint64_t i = 0; i < len; ++i)
    if (p[i] != static_cast<unsigned char>(i ^ 0x5a)) return fail("buffer read back", -1);

  dmakit_pool* raw_pool = nullptr;
  rc = dmakit_pool_create(ctx.get(), "prp-list", 4096, 4096, 0, &raw_pool);
  if (rc != DMAKIT_OK) return fail("dmakit_pool_create", rc);
  std::unique_ptr<dmakit_pool, Deleter> pool(raw_pool);
  std::vector<std::pair<void*, std::uint64_t>> blocks(32);
  for (auto& [vaddr, iova] : blocks) {
    rc = dmakit_pool_alloc(pool.get(), &vaddr, &iova);
    if (rc != DMAKIT_OK) return fail("dmakit_pool_alloc", rc);
    if (iova % 4096 != 0) return fail("block alignment", -1);
    std::memset(vaddr, 0xa5, 4096);
  }
  for (auto& [vaddr, iova] : blocks) {
    rc = dmakit_pool_free(pool.get(), vaddr, iova);
    if (rc != DMAKIT_OK) return fail("dmakit_pool_free", rc);
  }
  std::printf("consumer_cxx: dmakit %s: buffer of %llu bytes below 4 GiB, %zu pool blocks: ok\n",
              dmakit_version(), static_cast<unsigned long long>(dmakit_buffer_size(buf.get())),
              blocks.size());
  return 0;
}
