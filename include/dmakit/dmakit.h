/* dmakit C API: DMA memory for user-space drivers over VFIO.
 *
 * Every call returns 0 on success or a negative dmakit_errc; the message of
 * the last failure on this thread is dmakit_last_error(). No C++ exception
 * crosses this boundary.
 *
 * DMA contract: once a buffer or block is returned, the device may read and
 * write it at its IOVA at any time until it is freed; after free, the device
 * must no longer use the IOVA (dmakit unmaps it lazily, bounded by the arena
 * settings, and never hands the memory to a new owner before the unmap).
 */
#ifndef DMAKIT_DMAKIT_H
#define DMAKIT_DMAKIT_H

#include <stddef.h>
#include <stdint.h>

#include <dmakit/export.h>
#include <dmakit/version.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Negated dmakit::Errc values. */
enum dmakit_errc {
  DMAKIT_OK = 0,
  DMAKIT_EINVAL = -1,
  DMAKIT_ENOTFOUND = -2,
  DMAKIT_EPERM = -3,
  DMAKIT_EBUSY = -4,
  DMAKIT_EEXIST = -5,
  DMAKIT_ENOMEM = -6,
  DMAKIT_ENOSPC = -7,
  DMAKIT_ENOTSUP = -8,
  DMAKIT_ENOTVIABLE = -9,
  DMAKIT_EFAULT = -10,
  DMAKIT_ECORRUPTED = -11,
  DMAKIT_EIO = -12,
  DMAKIT_ETIMEDOUT = -13,
  DMAKIT_EINTERNAL = -14,
};

typedef struct dmakit_ctx dmakit_ctx;
typedef struct dmakit_buffer dmakit_buffer;
typedef struct dmakit_pool dmakit_pool;

/**
 * @brief The version of the dmakit library loaded at run time.
 *
 * @return "MAJOR.MINOR.PATCH", a static string. Compare it with
 *         DMAKIT_VERSION_STRING (dmakit/version.h), the version of the
 *         headers compiled against.
 */
DMAKIT_API const char* dmakit_version(void);

/* The message of the last failed call on this thread ("" if none). */
DMAKIT_API const char* dmakit_last_error(void);

/* config_path: a TOML file as config/dmakit.toml, or NULL for the defaults.
 * argv-style overrides ("--arena.strict", "true", ...) may follow: argc/argv
 * may be 0/NULL. */
DMAKIT_API int dmakit_ctx_create(const char* config_path, int argc, const char* const* argv, dmakit_ctx** out);
DMAKIT_API void dmakit_ctx_destroy(dmakit_ctx* ctx);

#define DMAKIT_BUF_ZEROED 0x1u

/* A DMA buffer of len bytes with one contiguous IOVA range; dma_limit is the
 * highest IOVA any byte may have (UINT64_MAX for none). */
DMAKIT_API int dmakit_buffer_alloc(dmakit_ctx* ctx, uint64_t len, uint32_t flags, uint64_t dma_limit,
                                   dmakit_buffer** out);
DMAKIT_API uint64_t dmakit_buffer_iova(const dmakit_buffer* b);
DMAKIT_API uint64_t dmakit_buffer_size(const dmakit_buffer* b);
/* Host address of byte `offset`, or NULL past the end. */
DMAKIT_API void* dmakit_buffer_at(const dmakit_buffer* b, uint64_t offset);
DMAKIT_API void dmakit_buffer_free(dmakit_buffer* b);

DMAKIT_API int dmakit_pool_create(dmakit_ctx* ctx, const char* name, size_t size, size_t align,
                                  size_t boundary, dmakit_pool** out);
DMAKIT_API int dmakit_pool_alloc(dmakit_pool* pool, void** vaddr, uint64_t* iova);
/* Validated: a double free, foreign pointer or wrong IOVA returns DMAKIT_ECORRUPTED. */
DMAKIT_API int dmakit_pool_free(dmakit_pool* pool, void* vaddr, uint64_t iova);
DMAKIT_API void dmakit_pool_destroy(dmakit_pool* pool);

#ifdef __cplusplus
}
#endif

#endif /* DMAKIT_DMAKIT_H */
