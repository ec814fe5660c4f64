/**
 * @file dmakit.h
 * @brief dmakit C API: DMA memory for user-space drivers over VFIO.
 *
 * Object model. A context (::dmakit_ctx) is one IOMMU domain: a VFIO type1
 * container (or, on hosts without VFIO, a simulated type1 IOMMU) with one
 * IOVA space that dmakit allocates from, shared by every device whose IOMMU
 * group is attached to it. Buffers (::dmakit_buffer), DMA pools
 * (::dmakit_pool), registrations of caller memory (dmakit_mem_map()) and
 * open devices (::dmakit_device) belong to one context.
 *
 * Errors. Every call that can fail returns 0 (#DMAKIT_OK) or a negative
 * ::dmakit_errc; dmakit_last_error() then holds a message naming the object
 * (size, address, BDF, path) and, where the kernel refused, its errno text.
 * Misuse that can be detected is such an error, never a crash: NULL
 * arguments, argc/argv that disagree, unknown flag bits, a handle freed
 * twice, a pool or buffer used after its context was destroyed. No call
 * throws a C++ exception or terminates the process.
 *
 * Handles. Handles are opaque values, not pointers to memory: a stale
 * handle (freed or destroyed) is recognised as such and refused with
 * #DMAKIT_EINVAL.
 *
 * DMA contract. From the moment a call returns an IOVA, the device may read
 * (and, unless the memory is mapped read-only, write) every byte at that
 * IOVA at any time, until the memory is freed. After a free the device must
 * no longer use the IOVA; what it can still reach depends on the object and
 * the mode (buffer_isolation) and the arena (arena_strict); docs/API.md,
 * "The DMA contract", has the table. Default mode (as DPDK and SPDK):
 *  - slab buffer (len <= buffer_slab_max): after the free the device still
 *    reaches it (the slab stays mapped) and the memory may have a new owner
 *    at once (the next buffer of its size class); a slab is retired only
 *    when wholly free (trim, memory pressure, before an allocation fails),
 *    and then as a retired buffer below;
 *  - recycled buffer (a larger buffer, freed): still reachable (it keeps its
 *    mapping, with a strict arena too) and may have a new owner at once (the
 *    next buffer of its size);
 *  - pool block: still reachable (the chunk stays mapped) and may have a new
 *    owner at once (the next block of that pool);
 *  - retired buffer or slab: lazy arena - reachable until the arena flushes
 *    its IOVA range (bounded by arena.stale_max_pages and
 *    arena.stale_max_age_ms, or dmakit_ctx_flush()); strict arena -
 *    unmapped inside the retirement; either way the memory gets no new owner
 *    before that unmap returned.
 * Isolation mode (buffer_isolation, beyond the peers): every buffer is its
 * own mapping and nothing is recycled. After dmakit_buffer_free() the
 * device reaches the buffer until the flush (lazy arena) or not at all
 * (strict arena); its memory gets no new owner before the unmap returned.
 * Pool blocks keep the default rule (their chunks stay mapped).
 * Always:
 *  - caller memory (dmakit_mem_unmap()): unmapped before the call returns;
 *  - dmakit_ctx_flush(): every lazily freed IOVA range is unmapped when it
 *    returns.
 *
 * Threads. Unless a call says otherwise it may be made from any thread, on
 * different objects concurrently. Destroying an object while another thread
 * still uses it is the caller's bug.
 */
#ifndef DMAKIT_DMAKIT_H
#define DMAKIT_DMAKIT_H

#include <stddef.h>
#include <stdint.h>

#include "dmakit/export.h"
#include "dmakit/version.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Results of dmakit calls: 0 or one of these negative values. */
enum dmakit_errc {
  DMAKIT_OK = 0,
  DMAKIT_EINVAL = -1,      /**< bad argument: size, alignment, flags, NULL, stale handle */
  DMAKIT_ENOTFOUND = -2,   /**< file, device, address or mapping does not exist */
  DMAKIT_EPERM = -3,       /**< permission denied, RLIMIT_MEMLOCK too low */
  DMAKIT_EBUSY = -4,       /**< in use */
  DMAKIT_EEXIST = -5,      /**< already exists or overlaps */
  DMAKIT_ENOMEM = -6,      /**< host memory (hugepages, pages, pinning) exhausted */
  DMAKIT_ENOSPC = -7,      /**< IOVA space or IOMMU mapping entries exhausted */
  DMAKIT_ENOTSUP = -8,     /**< the kernel or hardware lacks the feature */
  DMAKIT_ENOTVIABLE = -9,  /**< a VFIO group has devices not bound to vfio-pci */
  DMAKIT_EFAULT = -10,     /**< a (simulated) device access the IOMMU blocked */
  DMAKIT_ECORRUPTED = -11, /**< a free that validation refused: double free, foreign address, wrong IOVA */
  DMAKIT_EIO = -12,        /**< any other system error */
  DMAKIT_ETIMEDOUT = -13,  /**< a device did not answer in time */
  DMAKIT_EINTERNAL = -14   /**< a dmakit bug; please report it */
};

/** A context: one IOMMU domain and everything allocated in it. */
typedef struct dmakit_ctx dmakit_ctx;
/** A DMA buffer: host memory with one contiguous IOVA range. */
typedef struct dmakit_buffer dmakit_buffer;
/** A DMA pool of fixed-size blocks (size, alignment, boundary). */
typedef struct dmakit_pool dmakit_pool;
/** A PCI function opened through VFIO: its BARs, config space, reset and interrupts. */
typedef struct dmakit_device dmakit_device;

/* ------------------------------------------------------------------------ */
/** @name Errors, version, logging */
/** @{ */

/** The message of the last failed call on this thread ("" if none failed yet).
 *  Valid until the next failing call on this thread. */
DMAKIT_API const char* dmakit_last_error(void);

/** A short name for a ::dmakit_errc value ("EINVAL", ...), "unknown" otherwise. */
DMAKIT_API const char* dmakit_errc_name(int errc);

/** The library's version, "MAJOR.MINOR.PATCH" (compare with #DMAKIT_VERSION_STRING). */
DMAKIT_API const char* dmakit_version(void);

/** Log levels, as dmakit's logger and DMAKIT_LOG name them. */
enum dmakit_log_level {
  DMAKIT_LOG_TRACE = 0,
  DMAKIT_LOG_DEBUG = 1,
  DMAKIT_LOG_INFO = 2,
  DMAKIT_LOG_WARN = 3,
  DMAKIT_LOG_ERROR = 4,
  DMAKIT_LOG_CRITICAL = 5,
  DMAKIT_LOG_OFF = 6
};

/** Receives one log line (no trailing newline). Called from any thread that
 *  logs, dmakit's own threads included, one call at a time; it must not call
 *  back into dmakit. */
typedef void (*dmakit_log_fn)(void* user, int level, const char* message);

/** Sends dmakit's log lines to fn instead of stderr; fn NULL restores stderr.
 *  Process-wide. #DMAKIT_EBUSY when the application registered its own spdlog
 *  logger named "dmakit" (dmakit then logs through that one). */
DMAKIT_API int dmakit_set_log_callback(dmakit_log_fn fn, void* user);

/** Sets the least severe level that is logged (a ::dmakit_log_level). Process-wide. */
DMAKIT_API int dmakit_set_log_level(int level);

/** @} */
/* ------------------------------------------------------------------------ */
/** @name Contexts */
/** @{ */

/** Every setting of a context. Strings are copied; NULL means the default.
 *  Fill it with dmakit_settings_init() first, then change what you need. */
typedef struct dmakit_settings {
  uint32_t struct_size;           /**< sizeof(dmakit_settings); set by dmakit_settings_init() */
  const char* log_level;          /**< "trace" ... "off"; NULL keeps the current level */
  const char* backend;            /**< "auto" (default), "vfio" or "sim" */
  const char* devices;            /**< PCI addresses (BDFs), comma separated, whose IOMMU groups the
                                       container attaches at creation; more join with dmakit_ctx_attach() */
  const char* eal_mode;           /**< "auto" (default), "huge" or "nohuge" */
  uint32_t eal_memory_mb;         /**< memory the EAL takes without hugepages (512) */
  const char* eal_file_prefix;    /**< EAL --file-prefix, a plain name; NULL/"" = unique per process */
  int arena_strict;               /**< non-zero: unmap every IOVA range at free */
  uint64_t arena_stale_max_pages; /**< flush a shard of the arena at this many stale pages (8192) */
  uint32_t arena_stale_max_age_ms; /**< ... or when its oldest stale range is this old (50) */
  uint64_t arena_iova_start;      /**< narrow the IOVA space to [start, end]; 0/0 = every window */
  uint64_t arena_iova_end;
  const char* buffer_orders;      /**< chunk orders, largest first ("2M,1M,64K,4K") */
  uint64_t buffer_recycle_high_mb; /**< recycled buffer memory kept above this is released (256) */
  int buffer_prezero;             /**< non-zero (default): a thread zeroes recycled memory */
  uint32_t pool_cache_size;       /**< default per-thread cache of DMA pools, blocks (256) */
  uint32_t sim_address_bits;      /**< simulated IOMMU: address width (39) */
  uint32_t sim_dma_entry_limit;   /**< simulated IOMMU: mapping entries (65535) */
  const char* sim_page_sizes;     /**< simulated IOMMU: page sizes ("4K,2M,1G") */
  /* Added in 0.2; a struct_size without them (an older header) takes their defaults. */
  uint64_t buffer_slab_max;       /**< buffers up to this many bytes are carved from slabs (1048576; 0 = none) */
  int buffer_isolation;           /**< non-zero: every buffer its own mapping, no recycling (see the DMA contract) */
} dmakit_settings;

/** Fills s with the defaults (those of config/dmakit.toml). */
DMAKIT_API void dmakit_settings_init(dmakit_settings* s);

/** Creates a context from a settings struct. Starts DPDK's EAL once per
 *  process if the application has not (then uses the application's EAL as
 *  it is). The calling thread's CPU affinity, signal handlers and DPDK's log
 *  stream of an application-owned EAL are left as they were. */
DMAKIT_API int dmakit_ctx_create_with(const dmakit_settings* s, dmakit_ctx** out);

/** Creates a context from a TOML file (as config/dmakit.toml; NULL for the
 *  defaults) plus argv-style overrides, e.g. {"--arena.strict", "true"}.
 *  argc == 0 with argv NULL means none; argc > 0 with argv NULL is refused. */
DMAKIT_API int dmakit_ctx_create(const char* config_path, int argc, const char* const* argv, dmakit_ctx** out);

/** Destroys a context: its pools, then its buffer allocator, its caller
 *  mappings (unmapped), then the arena (which unmaps stale ranges) and the
 *  domain. Buffers still allocated keep their memory and mapping (a device
 *  may still use them) until the domain closes; their handles turn stale.
 *  Returns #DMAKIT_EINVAL for a handle that is not a live context. */
DMAKIT_API int dmakit_ctx_destroy(dmakit_ctx* ctx);

/** The backend in use: "sim", "vfio-type1v2" or "vfio-type1"; NULL for a bad handle. */
DMAKIT_API const char* dmakit_ctx_backend(const dmakit_ctx* ctx);

/** Unmaps every lazily freed IOVA range now; on return the device can no
 *  longer reach any of them. */
DMAKIT_API int dmakit_ctx_flush(dmakit_ctx* ctx);

/** A context's counters (a snapshot; each read without stopping others). */
typedef struct dmakit_ctx_stats {
  uint32_t struct_size;        /**< set to sizeof(dmakit_ctx_stats) before the call */
  uint64_t mappings;           /**< live IOMMU mapping entries */
  uint64_t mapped_bytes;
  uint64_t map_calls;          /**< map ioctls so far */
  uint64_t unmap_calls;        /**< unmap ioctls so far */
  uint64_t dma_avail;          /**< free mapping entries (dma_entry_limit minus those in use) */
  uint64_t iova_pages_in_use;  /**< IOVA pages allocated */
  uint64_t iova_stale_pages;   /**< IOVA pages freed but still mapped (lazy unmap) */
  uint64_t flushes;            /**< arena flushes that unmapped something */
  uint64_t buffers_live;
  uint64_t buffer_bytes_live;
  uint64_t buffer_bytes_recycled; /**< freed buffers kept mapped for reuse */
  uint64_t caller_maps;        /**< live dmakit_mem_map() registrations */
  uint64_t caller_map_bytes;
  uint64_t pools;
  /* Added in 0.2; a struct_size without them (an older header) is still served. */
  uint64_t buffer_slabs;            /**< slabs mapped for small buffers (buffers up to buffer_slab_max) */
  uint64_t buffer_slab_bytes;       /**< their bytes (also counted in mapped_bytes) */
  uint64_t buffer_slab_bytes_in_use; /**< slab bytes handed out as buffers (in buffer_bytes_live too) */
} dmakit_ctx_stats;

/** Fills *out; out->struct_size must be sizeof(dmakit_ctx_stats) (or that of
 *  an older header, which gets the fields it has). */
DMAKIT_API int dmakit_ctx_get_stats(dmakit_ctx* ctx, dmakit_ctx_stats* out);

/** @} */
/* ------------------------------------------------------------------------ */
/** @name Buffers */
/** @{ */

#define DMAKIT_BUF_ZEROED 0x1u       /**< every byte reads zero on return */
#define DMAKIT_BUF_DEVICE_READ 0x2u  /**< the device may read (alone: mapped read-only) */
#define DMAKIT_BUF_DEVICE_WRITE 0x4u /**< the device may write; neither bit = read and write */

/** Allocates a DMA buffer of len bytes with one contiguous IOVA range.
 *  align: alignment of the IOVA, a power of two; 0 = 4 KiB. The host address
 *  of byte 0 is 4 KiB aligned. flags: DMAKIT_BUF_*. dma_limit: the highest
 *  IOVA any byte may have (UINT64_MAX for none; 0xffffffff for a 32-bit
 *  device). The host memory is one virtual run when it can be (see
 *  dmakit_buffer_segments()). Costs no ioctl when a recycled buffer of the
 *  same size fits, else one map per virtually contiguous run. */
DMAKIT_API int dmakit_buffer_alloc(dmakit_ctx* ctx, uint64_t len, uint64_t align, uint32_t flags,
                                   uint64_t dma_limit, dmakit_buffer** out);

/** IOVA of byte 0; 0 for a bad handle (0 is never a dmakit IOVA). */
DMAKIT_API uint64_t dmakit_buffer_iova(const dmakit_buffer* b);
/** Requested size in bytes; 0 for a bad handle. */
DMAKIT_API uint64_t dmakit_buffer_size(const dmakit_buffer* b);
/** Host address of byte 0; NULL for a bad handle. */
DMAKIT_API void* dmakit_buffer_vaddr(const dmakit_buffer* b);
/** Host address of byte offset; NULL past the end or for a bad handle.
 *  Bytes are contiguous in host memory only within one segment. */
DMAKIT_API void* dmakit_buffer_at(const dmakit_buffer* b, uint64_t offset);

/** One piece of a buffer: contiguous in host memory and in IOVA. */
typedef struct dmakit_segment {
  void* vaddr;
  uint64_t iova;
  uint64_t len;
} dmakit_segment;

/** The buffer's segments in IOVA order. Writes at most cap of them to segs
 *  (which may be NULL when cap is 0) and sets *count to how many there are;
 *  #DMAKIT_ENOSPC when cap is too small. The segments cover size() bytes. */
DMAKIT_API int dmakit_buffer_segments(const dmakit_buffer* b, dmakit_segment* segs, size_t cap, size_t* count);

/** Frees a buffer. The device must no longer use its IOVA. A stale handle
 *  (freed before) is refused with #DMAKIT_EINVAL and changes nothing. */
DMAKIT_API int dmakit_buffer_free(dmakit_buffer* b);

/** @} */
/* ------------------------------------------------------------------------ */
/** @name Address translation and caller memory */
/** @{ */

/** The IOVA at which the device reaches host address vaddr, for any memory
 *  the context maps (buffers, pool blocks, caller memory). len (may be NULL)
 *  gets the bytes from vaddr that are contiguous in host memory and IOVA.
 *  #DMAKIT_ENOTFOUND for memory the context does not map. A lookup: no
 *  system call. */
DMAKIT_API int dmakit_vtophys(dmakit_ctx* ctx, const void* vaddr, uint64_t* iova, uint64_t* len);

/** Maps memory the caller owns for the device, as spdk_mem_register and
 *  rte_vfio_container_dma_map do: the pages holding [vaddr, vaddr + len) get
 *  an IOVA range of their own. Costs one IOMMU mapping entry and one map
 *  ioctl per call (keep registrations few and large). flags: the
 *  DMAKIT_BUF_DEVICE_READ/WRITE bits. *iova is the IOVA of vaddr itself.
 *  The memory must stay allocated until dmakit_mem_unmap(); with VFIO the
 *  kernel pins it. Registrations may not share a page with each other or
 *  with memory dmakit allocated (#DMAKIT_EEXIST). */
DMAKIT_API int dmakit_mem_map(dmakit_ctx* ctx, void* vaddr, uint64_t len, uint32_t flags, uint64_t dma_limit,
                              uint64_t* iova);

/** Unmaps a registration (vaddr as given to dmakit_mem_map()). Synchronous:
 *  when it returns the IOMMU mapping is gone and the IOTLB invalidated, so
 *  the memory may be freed or reused. Frees the mapping entry. */
DMAKIT_API int dmakit_mem_unmap(dmakit_ctx* ctx, void* vaddr);

/** @} */
/* ------------------------------------------------------------------------ */
/** @name DMA pools */
/** @{ */

#define DMAKIT_POOL_ZERO 0x1u   /**< every block is zeroed at alloc (no per-thread caches) */
#define DMAKIT_POOL_POISON 0x2u /**< poison freed blocks, check them at alloc (debugging; no caches) */

/** Everything a pool can be created with. */
typedef struct dmakit_pool_params {
  uint32_t struct_size;  /**< sizeof(dmakit_pool_params) */
  const char* name;      /**< unique within the context */
  size_t size;           /**< block size in bytes */
  size_t align;          /**< block alignment (vaddr and IOVA), a power of two; 0 = 1 */
  size_t boundary;       /**< no block crosses a multiple of this (power of two); 0 = none */
  uint64_t dma_limit;    /**< highest IOVA a block may have; UINT64_MAX = none */
  uint32_t cache_size;   /**< per-thread cache in blocks; UINT32_MAX = the context's pool_cache_size */
  uint32_t flags;        /**< DMAKIT_POOL_* */
} dmakit_pool_params;

/** Fills p with the defaults for a pool of size bytes (align, boundary 0,
 *  no DMA limit, the context's cache size, no flags). */
DMAKIT_API void dmakit_pool_params_init(dmakit_pool_params* p, const char* name, size_t size);

/** Creates a pool with the kernel dma_pool_create() semantics: blocks of size
 *  bytes, aligned to align, none crossing a boundary multiple. Blocks are
 *  carved from large buffers mapped once; block state lives in host memory
 *  the device cannot reach. */
DMAKIT_API int dmakit_pool_create(dmakit_ctx* ctx, const char* name, size_t size, size_t align, size_t boundary,
                                  dmakit_pool** out);
/** The same from a parameter struct. */
DMAKIT_API int dmakit_pool_create_with(dmakit_ctx* ctx, const dmakit_pool_params* p, dmakit_pool** out);

/** Allocates one block: its host address and IOVA. O(1); no system call,
 *  lock or allocation on the common path (per-thread caches). */
DMAKIT_API int dmakit_pool_alloc(dmakit_pool* pool, void** vaddr, uint64_t* iova);
/** The same, with the block zeroed. */
DMAKIT_API int dmakit_pool_alloc_zeroed(dmakit_pool* pool, void** vaddr, uint64_t* iova);
/** Frees one block. Validated in O(1): a foreign address, a wrong IOVA or a
 *  double free returns #DMAKIT_ECORRUPTED and changes nothing; of two racing
 *  frees of one block exactly one succeeds. Any thread may free any block. */
DMAKIT_API int dmakit_pool_free(dmakit_pool* pool, void* vaddr, uint64_t iova);

/** Allocates n blocks into vaddrs[0..n) and iovas[0..n): all or none. */
DMAKIT_API int dmakit_pool_alloc_bulk(dmakit_pool* pool, size_t n, void** vaddrs, uint64_t* iovas);
/** Frees n blocks, each validated as by dmakit_pool_free(); those that pass
 *  are freed, and the first refusal is returned. */
DMAKIT_API int dmakit_pool_free_bulk(dmakit_pool* pool, size_t n, void* const* vaddrs, const uint64_t* iovas);

/** A pool's counters. */
typedef struct dmakit_pool_stats {
  uint32_t struct_size;           /**< set to sizeof(dmakit_pool_stats) before the call */
  uint64_t size, align, boundary; /**< the geometry */
  uint64_t chunk_bytes;           /**< bytes of each region blocks are carved from */
  uint64_t blocks;                /**< carved so far */
  uint64_t active;                /**< allocated now */
  uint64_t chunks;
  uint64_t validation_failures;   /**< refused frees */
  uint64_t grow_failures;         /**< the pool could not get another chunk */
} dmakit_pool_stats;

/** Fills *out; out->struct_size must be sizeof(dmakit_pool_stats). */
DMAKIT_API int dmakit_pool_get_stats(dmakit_pool* pool, dmakit_pool_stats* out);

/** Destroys a pool. Blocks still allocated keep their memory and mapping (a
 *  device may still use them) and are reported in the log. The handle turns
 *  stale. */
DMAKIT_API int dmakit_pool_destroy(dmakit_pool* pool);

/** @} */

/* ------------------------------------------------------------------------ */
/** @name Devices
 *
 * A context's IOMMU domain is shared by every device whose IOMMU group is
 * attached to it: one VFIO container, one IOVA space, so an IOVA from any
 * buffer or pool of the context is valid for all of them. Groups attach at
 * creation (dmakit_settings::devices) or later with dmakit_ctx_attach(); an
 * attached group sees every mapping that already exists. A device handle
 * (dmakit_device_open()) gives the driver the function itself: regions, BAR
 * mappings, config space, bus mastering, reset and interrupts delivered to
 * eventfds. The simulated backend has no devices (#DMAKIT_ENOTSUP).
 *
 * A device may read and write every mapped IOVA of the context from the
 * moment bus mastering is on; dmakit_device_close() turns bus mastering and
 * interrupts off before it closes the device. */
/** @{ */

/** Attaches the IOMMU group of the PCI device bdf ("0000:00:03.0" or
 *  "00:03.0") to the context's container. Every mapping the context has is
 *  valid for the new group at once (the kernel replays them into its
 *  domain). Attaching a group that is already attached does nothing.
 *  #DMAKIT_ENOTVIABLE when a member of the group is not on vfio-pci (the
 *  message lists them), #DMAKIT_EBUSY when another process holds the group. */
DMAKIT_API int dmakit_ctx_attach(dmakit_ctx* ctx, const char* bdf);

/** Detaches the IOMMU group of bdf: its devices lose every mapping.
 *  #DMAKIT_EBUSY while a device of that group is open, or when it is the
 *  context's last group (the IOMMU domain and its mappings would go with
 *  it); #DMAKIT_ENOTFOUND when the group is not attached. */
DMAKIT_API int dmakit_ctx_detach(dmakit_ctx* ctx, const char* bdf);

/** The PCI addresses named at creation and with dmakit_ctx_attach() whose
 *  groups are attached, comma separated, written to buf (NUL terminated, at most cap bytes); *len (may
 *  be NULL) gets the length without the NUL. #DMAKIT_ENOSPC when cap is too small. */
DMAKIT_API int dmakit_ctx_devices(const dmakit_ctx* ctx, char* buf, size_t cap, size_t* len);

/** Opens a PCI function for the driver; its group is attached first when it
 *  is not yet. Bus mastering stays as it was (see dmakit_device_set_bus_master()). */
DMAKIT_API int dmakit_device_open(dmakit_ctx* ctx, const char* bdf, dmakit_device** out);

/** Disables the device's interrupts, turns bus mastering off, unmaps its BARs
 *  and closes it. The group stays attached. */
DMAKIT_API int dmakit_device_close(dmakit_device* dev);

/** The canonical PCI address ("0000:00:03.0"); NULL for a bad handle. */
DMAKIT_API const char* dmakit_device_bdf(const dmakit_device* dev);

/** Region indexes: BARs 0-5 are 0-5 (as VFIO_PCI_BAR0_REGION_INDEX...). */
#define DMAKIT_REGION_CONFIG 7u /**< PCI config space (VFIO_PCI_CONFIG_REGION_INDEX) */

#define DMAKIT_REGION_READ 0x1u  /**< the region can be read */
#define DMAKIT_REGION_WRITE 0x2u /**< the region can be written */
#define DMAKIT_REGION_MMAP 0x4u  /**< (part of) the region can be mapped (dmakit_device_map_bar()) */

/** One region of a device, as VFIO_DEVICE_GET_REGION_INFO reports it. */
typedef struct dmakit_region_info {
  uint32_t struct_size; /**< set to sizeof(dmakit_region_info) before the call */
  uint32_t index;
  uint32_t flags;       /**< DMAKIT_REGION_* */
  uint64_t size;        /**< bytes; 0 = the device does not implement it */
} dmakit_region_info;

/** Fills *out for region index (0-5 BARs, #DMAKIT_REGION_CONFIG). */
DMAKIT_API int dmakit_device_region_info(dmakit_device* dev, uint32_t index, dmakit_region_info* out);

/** A BAR mapped into the process; owned by its device (unmapped at close).
 *  Use the dmakit_mmio_* accessors: every access is bounds and alignment
 *  checked and reaches the device as one load or store of its width. */
typedef struct dmakit_bar {
  volatile void* base; /**< the mapping's first byte */
  uint64_t size;       /**< bytes mapped */
  uint32_t index;      /**< the BAR */
} dmakit_bar;

/** Maps the whole of BAR bar (0-5) and fills *out. Mapping a BAR twice
 *  returns the same mapping. #DMAKIT_ENOTSUP when the kernel does not allow
 *  the BAR to be mapped (I/O port BARs, or the MSI-X table covers it). */
DMAKIT_API int dmakit_device_map_bar(dmakit_device* dev, uint32_t bar, dmakit_bar* out);

/** Reports an MMIO access the accessors refused (outside the mapping or
 *  misaligned): sets dmakit_last_error() and logs it; returns #DMAKIT_EINVAL. */
DMAKIT_API int dmakit_mmio_refused(const dmakit_bar* bar, uint64_t off, unsigned width, int write);

/* Bounds-checked MMIO accessors. A refused read returns all ones (what PCI
 * returns for a missing target) and a refused write does nothing; both are
 * reported through dmakit_mmio_refused(). */
static inline int dmakit_mmio_ok_(const dmakit_bar* bar, uint64_t off, unsigned width) {
  return bar != 0 && off % width == 0 && off < bar->size && bar->size - off >= width;
}
static inline uint32_t dmakit_mmio_read32(const dmakit_bar* bar, uint64_t off) {
  if (!dmakit_mmio_ok_(bar, off, 4)) return (void)dmakit_mmio_refused(bar, off, 4, 0), 0xffffffffu;
  return *(volatile uint32_t*)((volatile char*)bar->base + off);
}
static inline uint64_t dmakit_mmio_read64(const dmakit_bar* bar, uint64_t off) {
  if (!dmakit_mmio_ok_(bar, off, 8)) return (void)dmakit_mmio_refused(bar, off, 8, 0), ~(uint64_t)0;
  return *(volatile uint64_t*)((volatile char*)bar->base + off);
}
static inline void dmakit_mmio_write32(const dmakit_bar* bar, uint64_t off, uint32_t value) {
  if (!dmakit_mmio_ok_(bar, off, 4)) {
    (void)dmakit_mmio_refused(bar, off, 4, 1);
    return;
  }
  *(volatile uint32_t*)((volatile char*)bar->base + off) = value;
}
static inline void dmakit_mmio_write64(const dmakit_bar* bar, uint64_t off, uint64_t value) {
  if (!dmakit_mmio_ok_(bar, off, 8)) {
    (void)dmakit_mmio_refused(bar, off, 8, 1);
    return;
  }
  *(volatile uint64_t*)((volatile char*)bar->base + off) = value;
}

/** Reads len bytes of PCI config space at off (through the kernel, which
 *  virtualizes parts of it). */
DMAKIT_API int dmakit_device_config_read(dmakit_device* dev, uint64_t off, void* buf, size_t len);
/** Writes len bytes of PCI config space at off. */
DMAKIT_API int dmakit_device_config_write(dmakit_device* dev, uint64_t off, const void* buf, size_t len);

/** enable != 0 sets memory-space decoding and bus mastering in the command
 *  register; enable == 0 clears bus mastering only (MMIO keeps working).
 *  With bus mastering on, the device can reach every IOVA the context maps. */
DMAKIT_API int dmakit_device_set_bus_master(dmakit_device* dev, int enable);

/** Resets the function (VFIO_DEVICE_RESET: FLR or the equivalent the kernel
 *  picks). Interrupts are disabled first; BAR mappings stay valid, device
 *  state and the command register are the device's reset values. #DMAKIT_ENOTSUP
 *  when the function cannot be reset. */
DMAKIT_API int dmakit_device_reset(dmakit_device* dev);

/** Interrupt kinds (VFIO's IRQ indexes). */
enum dmakit_irq_type {
  DMAKIT_IRQ_INTX = 0,
  DMAKIT_IRQ_MSI = 1,
  DMAKIT_IRQ_MSIX = 2
};

/** How many vectors the device offers for type (0 = none). */
DMAKIT_API int dmakit_device_irq_count(dmakit_device* dev, int type, uint32_t* count);

/** Enables vectors [0, count) of type, each signalling its own eventfd
 *  (VFIO_DEVICE_SET_IRQS with ACTION_TRIGGER). The eventfds are created and
 *  owned by the device (non-blocking, close-on-exec); efds (may be NULL)
 *  gets them. Only one type can be enabled at a time (#DMAKIT_EBUSY).
 *  An INTx interrupt masks itself; dmakit_device_irq_unmask() re-arms it. */
DMAKIT_API int dmakit_device_irq_enable(dmakit_device* dev, int type, uint32_t count, int* efds);

/** Disables type's vectors and closes their eventfds. */
DMAKIT_API int dmakit_device_irq_disable(dmakit_device* dev, int type);

/** Masks (no delivery) or unmasks one vector. INTx uses VFIO's mask and
 *  unmask; MSI and MSI-X, which vfio-pci cannot mask, detach the vector's
 *  eventfd and attach it again: an interrupt raised while masked is not
 *  delivered, so a driver checks its queues after unmasking. */
DMAKIT_API int dmakit_device_irq_mask(dmakit_device* dev, int type, uint32_t vector);
DMAKIT_API int dmakit_device_irq_unmask(dmakit_device* dev, int type, uint32_t vector);

/** Waits up to timeout_ms (-1 = no limit) for vector's eventfd and consumes
 *  it; *count (may be NULL) gets how many interrupts arrived since the last
 *  wait. #DMAKIT_ETIMEDOUT when none came. */
DMAKIT_API int dmakit_device_irq_wait(dmakit_device* dev, int type, uint32_t vector, int timeout_ms,
                                      uint64_t* count);

/** @} */

#ifdef __cplusplus
}
#endif

#endif /* DMAKIT_DMAKIT_H */
