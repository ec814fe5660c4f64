/* An out-of-tree C11 driver's first steps with the installed dmakit: a
 * context on the simulated IOMMU, a DMA buffer written and read back, a DMA
 * pool's blocks allocated and freed, its own memory mapped for the device and
 * looked up, the context's statistics printed. Built by tests/install/install_consumers.sh
 * with `pkg-config --cflags --libs dmakit` and -std=c11 -Wall -Wextra
 * -Wpedantic -Werror, which also checks that dmakit.h is clean C11. */
#include <dmakit/dmakit.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BLOCKS 64

static int fail(const char* what, int rc) {
  fprintf(stderr, "consumer: %s failed: %d: %s\n", what, rc, dmakit_last_error());
  return 1;
}

int main(void) {
  static const char* const overrides[] = {"--iommu.backend", "sim", "--eal.mode", "nohuge",
                                          "--eal.memory_mb", "64"};
  dmakit_ctx* ctx = NULL;
  dmakit_buffer* buf = NULL;
  dmakit_pool* pool = NULL;
  void* vaddr[BLOCKS];
  uint64_t iova[BLOCKS];
  unsigned char* p;
  uint64_t i;
  int rc;

  if (strcmp(dmakit_version(), DMAKIT_VERSION_STRING) != 0) {
    fprintf(stderr, "consumer: library %s, headers %s\n", dmakit_version(), DMAKIT_VERSION_STRING);
    return 1;
  }
  rc = dmakit_ctx_create(NULL, (int)(sizeof overrides / sizeof overrides[0]), overrides, &ctx);
  if (rc != DMAKIT_OK) return fail("dmakit_ctx_create", rc);

  rc = dmakit_buffer_alloc(ctx, 1u << 20, 0, DMAKIT_BUF_ZEROED, UINT64_MAX, &buf);
  if (rc != DMAKIT_OK) return fail("dmakit_buffer_alloc", rc);
  p = dmakit_buffer_at(buf, 0);
  if (p == NULL || dmakit_buffer_size(buf) < (1u << 20)) return fail("dmakit_buffer_at", -1);
  for (i = 0; i < (1u << 20); ++i) {
    if (p[i] != 0) return fail("zeroed buffer", -1);
    p[i] = (unsigned char)(i * 7u);
  }
  for (i = 0; i < (1u << 20); ++i)
    if (p[i] != (unsigned char)(i * 7u)) return fail("buffer read back", -1);
  if (dmakit_buffer_at(buf, dmakit_buffer_size(buf)) != NULL) return fail("dmakit_buffer_at past the end", -1);

  rc = dmakit_pool_create(ctx, "consumer", 64, 64, 0, &pool);
  if (rc != DMAKIT_OK) return fail("dmakit_pool_create", rc);
  for (i = 0; i < BLOCKS; ++i) {
    rc = dmakit_pool_alloc(pool, &vaddr[i], &iova[i]);
    if (rc != DMAKIT_OK) return fail("dmakit_pool_alloc", rc);
    if (((uintptr_t)vaddr[i] & 63u) != 0 || (iova[i] & 63u) != 0) return fail("block alignment", -1);
    memset(vaddr[i], (int)i, 64);
  }
  for (i = 0; i < BLOCKS; ++i) {
    rc = dmakit_pool_free(pool, vaddr[i], iova[i]);
    if (rc != DMAKIT_OK) return fail("dmakit_pool_free", rc);
  }
  rc = dmakit_pool_free(pool, vaddr[0], iova[0]);
  if (rc != DMAKIT_ECORRUPTED) return fail("double free refused", rc);

  {
    /* The driver's own memory, mapped for the device and looked up. */
    void* mine = aligned_alloc(4096, 3 * 4096);
    uint64_t mine_iova = 0, found = 0, run = 0;
    dmakit_ctx_stats st;
    if (mine == NULL) return fail("aligned_alloc", -1);
    rc = dmakit_mem_map(ctx, mine, 3 * 4096, 0, UINT64_MAX, &mine_iova);
    if (rc != DMAKIT_OK) return fail("dmakit_mem_map", rc);
    rc = dmakit_vtophys(ctx, (char*)mine + 5000, &found, &run);
    if (rc != DMAKIT_OK || found != mine_iova + 5000 || run != 3 * 4096 - 5000) return fail("dmakit_vtophys", rc);
    rc = dmakit_vtophys(ctx, vaddr[1], &found, NULL);
    if (rc != DMAKIT_OK) return fail("dmakit_vtophys of a pool block", rc);
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    rc = dmakit_ctx_get_stats(ctx, &st);
    if (rc != DMAKIT_OK) return fail("dmakit_ctx_get_stats", rc);
    printf("consumer: stats: %llu mappings, %llu buffers live, %llu caller mappings, %llu IOVA pages in use\n",
           (unsigned long long)st.mappings, (unsigned long long)st.buffers_live,
           (unsigned long long)st.caller_maps, (unsigned long long)st.iova_pages_in_use);
    if (st.caller_maps != 1) return fail("caller mapping counted", -1);
    rc = dmakit_mem_unmap(ctx, mine);
    if (rc != DMAKIT_OK) return fail("dmakit_mem_unmap", rc);
    free(mine);
  }

  printf("consumer: dmakit %s: buffer of %llu bytes at IOVA 0x%llx, %d pool blocks: ok\n",
         dmakit_version(), (unsigned long long)dmakit_buffer_size(buf),
         (unsigned long long)dmakit_buffer_iova(buf), BLOCKS);
  dmakit_pool_destroy(pool);
  dmakit_buffer_free(buf);
  dmakit_ctx_destroy(ctx);
  return 0;
}
