// The C boundary (include/dmakit/dmakit.h). Handles come from HandleTables
// (core/handles.hpp), so a stale or foreign handle is an error, not a crash;
// errors become a dmakit_errc plus a thread-local message.
//
// Budget of the hot calls (pool alloc/free, buffer accessors): find the
// handle (a bounds test, two loads, a compare), then call straight into the
// C++ object. No exception frame, string or allocation unless the call fails;
// failures leave through cold functions.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <new>
#include <string>

#include "base/log.hpp"
#include "core/c_handles.hpp"
#include "core/config_cli.hpp"
#include "core/context.hpp"
#include "core/handles.hpp"
#include "dmakit/dmakit.h"

namespace {

using namespace dmakit;

struct CtxEntry {
  core::Context* ctx = nullptr;
  std::unique_ptr<core::Context> owned;  // null for a handle of a context C++ code owns (borrow_c_handle)
};
struct PoolEntry {
  pool::DmaPool* pool = nullptr;
  core::Context* ctx = nullptr;
  const void* ctx_handle = nullptr;
};
struct BufEntry {
  alloc_buffer::Buffer buf;
  const void* ctx_handle = nullptr;
};
struct DevEntry {
  core::Device* dev = nullptr;
  core::Context* ctx = nullptr;
  const void* ctx_handle = nullptr;
};

using CtxTable = core::HandleTable<CtxEntry, 6, 4>;        // 256 contexts
using PoolTable = core::HandleTable<PoolEntry, 8, 64>;     // 16384 pools
using BufTable = core::HandleTable<BufEntry, 12, 4096>;    // 16 Mi live buffers
using DevTable = core::HandleTable<DevEntry, 6, 16>;       // 1024 open devices

// Tables live as long as the process: never destroyed, so calls from exit
// hooks and late threads still find them. Constant-initialised (constinit
// checks it), so a hot call reaches its table at a fixed address, with no
// guard of a function-local static to test and no call.
template <class T>
union Forever {
  constexpr Forever() : table() {}
  ~Forever() {}  // the member is never destroyed
  T table;
};
constinit Forever<CtxTable> g_ctxs;
constinit Forever<PoolTable> g_pools;
constinit Forever<BufTable> g_bufs;
constinit Forever<DevTable> g_devs;
CtxTable& ctxs() { return g_ctxs.table; }
PoolTable& pools() { return g_pools.table; }
BufTable& bufs() { return g_bufs.table; }
DevTable& devs() { return g_devs.table; }

thread_local std::string g_last_error;

[[gnu::cold, gnu::noinline]] void set_message(std::string_view text) noexcept {
  try {
    g_last_error.assign(text);
  } catch (...) {
    g_last_error.clear();  // no memory for the message: the code still tells
  }
}

// For the calls outside guarded(): the message is built inside the try.
template <class Text>
[[gnu::cold]] void set_message_of(Text&& text) noexcept {
  try {
    set_message(text());
  } catch (...) {
    g_last_error.clear();
  }
}

[[gnu::cold, gnu::noinline]] int report(const Error& e) noexcept {
  try {
    set_message(e.what());
  } catch (...) {
    g_last_error.clear();
  }
  return -static_cast<int>(e.code);
}

// Misuse of a call: a NULL or stale argument, unknown flags.
[[gnu::cold, gnu::noinline]] int misuse(const char* call, std::string_view what) noexcept {
  try {
    set_message(std::string(call) + ": " + std::string(what));
  } catch (...) {
    g_last_error.clear();
  }
  return DMAKIT_EINVAL;
}

[[gnu::cold, gnu::noinline]] int no_memory(const char* call) noexcept {
  try {
    set_message(std::string(call) + ": out of host memory");
  } catch (...) {
    g_last_error.clear();
  }
  return DMAKIT_ENOMEM;
}

// Slow calls run inside this: nothing escapes the C boundary.
template <class F>
int guarded(const char* call, F&& f) noexcept {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return no_memory(call);
  } catch (const std::exception& e) {
    set_message(std::string(call) + ": internal error: " + e.what());
    return DMAKIT_EINTERNAL;
  } catch (...) {
    set_message(std::string(call) + ": internal error");
    return DMAKIT_EINTERNAL;
  }
}

constexpr const char* kStaleCtx = "ctx is not a live context (NULL, destroyed, or never created)";
constexpr const char* kStalePool = "pool is not a live pool (NULL, destroyed, or its context was destroyed)";
constexpr const char* kStaleBuf = "buffer is not a live buffer (NULL, freed, or never allocated)";
constexpr const char* kDeadCtx = "the buffer's context was destroyed";
constexpr const char* kStaleDev = "dev is not an open device (NULL, closed, or its context was destroyed)";

core::Device* dev_of(const dmakit_device* h) {
  auto* s = devs().find(h);
  return s != nullptr ? s->value.dev : nullptr;
}

int status_of(const Status& st) { return st ? DMAKIT_OK : report(st.error()); }

core::Context* ctx_of(const dmakit_ctx* h) {
  auto* s = ctxs().find(h);
  return s != nullptr ? s->value.ctx : nullptr;
}

// A live buffer of a live context, or nullptr with call's misuse reported.
BufTable::Slot* live_buffer(const dmakit_buffer* h, const char* call) {
  auto* s = bufs().find(h);
  if (s == nullptr) {
    misuse(call, kStaleBuf);
    return nullptr;
  }
  if (ctxs().find(s->value.ctx_handle) == nullptr) {
    misuse(call, kDeadCtx);
    return nullptr;
  }
  return s;
}

uint32_t prot_of(uint32_t flags) {
  uint32_t prot = ((flags & DMAKIT_BUF_DEVICE_READ) ? iommu::kRead : 0u) |
                  ((flags & DMAKIT_BUF_DEVICE_WRITE) ? iommu::kWrite : 0u);
  return prot != 0 ? prot : uint32_t{iommu::kReadWrite};
}

int create_context(const core::Config& cfg, dmakit_ctx** out) {
  auto* slot = ctxs().acquire();
  if (slot == nullptr)
    return ctxs().full() ? report({Errc::no_space, 0, "dmakit: every context handle is in use"})
                         : no_memory("dmakit_ctx_create: a block of context handles");
  auto ctx = core::Context::create(cfg);
  if (!ctx) {
    ctxs().recycle(slot);
    return report(ctx.error());
  }
  slot->value.ctx = ctx->get();
  slot->value.owned = std::move(*ctx);
  *out = static_cast<dmakit_ctx*>(ctxs().publish(slot));
  return DMAKIT_OK;
}

[[gnu::cold, gnu::noinline]] int bad_pool_call(const char* call, const dmakit_pool* pool) noexcept {
  if (pools().find(pool) == nullptr) return misuse(call, kStalePool);
  return misuse(call, "an output or input array is NULL");
}

// The slow paths of dmakit_pool_alloc/free, out of line: the pool's own
// alloc() and free(), and a failure's report.
[[gnu::noinline]] int pool_alloc_slow(pool::DmaPool& p, void** vaddr, uint64_t* iova) noexcept {
  auto b = p.alloc();
  if (!b) [[unlikely]]
    return report(b.error());
  *vaddr = b->vaddr;
  *iova = b->iova;
  return DMAKIT_OK;
}

[[gnu::noinline]] int pool_free_slow(pool::DmaPool& p, void* vaddr, uint64_t iova) noexcept {
  auto st = p.free(vaddr, iova);
  if (!st) [[unlikely]]
    return report(st.error());
  return DMAKIT_OK;
}

}  // namespace

dmakit_ctx* dmakit::core::borrow_c_handle(Context& ctx) noexcept {
  auto* slot = ctxs().acquire();
  if (slot == nullptr) return nullptr;
  slot->value.ctx = &ctx;
  return static_cast<dmakit_ctx*>(ctxs().publish(slot));
}

extern "C" {

const char* dmakit_last_error(void) { return g_last_error.c_str(); }

const char* dmakit_errc_name(int errc) {
  static constexpr const char* kNames[] = {"OK",      "EINVAL",     "ENOTFOUND", "EPERM",     "EBUSY",
                                           "EEXIST",  "ENOMEM",     "ENOSPC",    "ENOTSUP",   "ENOTVIABLE",
                                           "EFAULT",  "ECORRUPTED", "EIO",       "ETIMEDOUT", "EINTERNAL"};
  return errc <= 0 && -errc < static_cast<int>(std::size(kNames)) ? kNames[-errc] : "unknown";
}

int dmakit_set_log_callback(dmakit_log_fn fn, void* user) {
  return guarded("dmakit_set_log_callback", [&]() -> int {
    base::LogCallback cb;
    if (fn != nullptr)
      cb = [fn, user](spdlog::level::level_enum level, std::string_view text) {
        std::string line(text);  // the callback wants a terminated string
        fn(user, static_cast<int>(level), line.c_str());
      };
    if (auto st = base::set_log_callback(std::move(cb)); !st) return report(st.error());
    return DMAKIT_OK;
  });
}

int dmakit_set_log_level(int level) {
  if (level < DMAKIT_LOG_TRACE || level > DMAKIT_LOG_OFF)
    return misuse("dmakit_set_log_level", "level " + std::to_string(level) + " is not a dmakit_log_level (0..6)");
  base::log().set_level(static_cast<spdlog::level::level_enum>(level));
  return DMAKIT_OK;
}

void dmakit_settings_init(dmakit_settings* s) {
  if (s == nullptr) return;
  const core::Config d;  // the defaults, kept equal to config/dmakit.toml by a test
  *s = dmakit_settings{};
  s->struct_size = sizeof(dmakit_settings);
  s->eal_memory_mb = d.eal.memory_mb;
  s->arena_strict = d.arena.strict ? 1 : 0;
  s->arena_stale_max_pages = d.arena.stale_max_pages;
  s->arena_stale_max_age_ms = d.arena.stale_max_age_ms;
  s->arena_iova_start = d.arena.iova_start;
  s->arena_iova_end = d.arena.iova_end;
  s->buffer_recycle_high_mb = d.buffer.recycle_high_mb;
  s->buffer_prezero = d.buffer.prezero ? 1 : 0;
  s->pool_cache_size = d.pool.cache_size;
  s->sim_address_bits = d.iommu.sim_address_bits;
  s->sim_dma_entry_limit = d.iommu.sim_dma_entry_limit;
  s->buffer_slab_max = d.buffer.slab_max;
  s->buffer_isolation = d.buffer.isolation ? 1 : 0;
}

int dmakit_ctx_create_with(const dmakit_settings* s, dmakit_ctx** out) {
  return guarded("dmakit_ctx_create_with", [&]() -> int {
    if (out == nullptr) return misuse("dmakit_ctx_create_with", "out is NULL");
    *out = nullptr;
    if (s == nullptr) return misuse("dmakit_ctx_create_with", "settings is NULL");
    // The struct as this library has it, or as older headers had it (up to
    // sim_page_sizes); fields past the caller's struct_size keep their defaults.
    constexpr size_t kSizeV1 = offsetof(dmakit_settings, sim_page_sizes) + sizeof(const char*);
    if (s->struct_size != sizeof(dmakit_settings) && s->struct_size != kSizeV1)
      return misuse("dmakit_ctx_create_with",
                    fmt::format("settings.struct_size is {}, this library's dmakit_settings has {} bytes: fill it "
                                "with dmakit_settings_init()",
                                s->struct_size, sizeof(dmakit_settings)));
    core::Config c;
    auto text = [](const char* v, std::string& dst) {
      if (v != nullptr) dst = v;
    };
    text(s->backend, c.iommu.backend);
    text(s->devices, c.iommu.devices);
    text(s->eal_mode, c.eal.mode);
    text(s->eal_file_prefix, c.eal.file_prefix);
    text(s->buffer_orders, c.buffer.orders);
    text(s->sim_page_sizes, c.iommu.sim_page_sizes);
    c.eal.memory_mb = s->eal_memory_mb;
    c.arena.strict = s->arena_strict != 0;
    c.arena.stale_max_pages = s->arena_stale_max_pages;
    c.arena.stale_max_age_ms = s->arena_stale_max_age_ms;
    c.arena.iova_start = s->arena_iova_start;
    c.arena.iova_end = s->arena_iova_end;
    c.buffer.recycle_high_mb = s->buffer_recycle_high_mb;
    c.buffer.prezero = s->buffer_prezero != 0;
    c.pool.cache_size = s->pool_cache_size;
    c.iommu.sim_address_bits = s->sim_address_bits;
    c.iommu.sim_dma_entry_limit = s->sim_dma_entry_limit;
    if (s->struct_size >= offsetof(dmakit_settings, buffer_isolation) + sizeof(int)) {
      c.buffer.slab_max = s->buffer_slab_max;
      c.buffer.isolation = s->buffer_isolation != 0;
    }
    if (s->log_level != nullptr) {
      c.log.level = s->log_level;
      if (auto st = base::set_log_level(c.log.level); !st)
        return report(with_context(st.error(), "settings.log_level"));
    }
    return create_context(c, out);  // Context::create validates
  });
}

int dmakit_ctx_create(const char* config_path, int argc, const char* const* argv, dmakit_ctx** out) {
  return guarded("dmakit_ctx_create", [&]() -> int {
    if (out == nullptr) return misuse("dmakit_ctx_create", "out is NULL");
    *out = nullptr;
    if (argc < 0) return misuse("dmakit_ctx_create", fmt::format("argc is {}", argc));
    if (argc > 0 && argv == nullptr)
      return misuse("dmakit_ctx_create", fmt::format("argc is {} but argv is NULL", argc));
    core::Config cfg;
    CLI::App app{"dmakit"};
    app.set_help_flag();  // "--help" is an unknown override here, not a request
    core::add_config_options(app, cfg, "");
    std::vector<std::string> args;
    for (int i = argc - 1; i >= 0; --i) {  // CLI11 takes them reversed
      if (argv[i] == nullptr) return misuse("dmakit_ctx_create", fmt::format("argv[{}] is NULL", i));
      args.emplace_back(argv[i]);
    }
    if (config_path != nullptr) {
      args.emplace_back(config_path);
      args.emplace_back("--config");
    }
    try {
      app.parse(args);
    } catch (const CLI::Error& e) {
      return report({Errc::invalid_argument, 0, base::describe_parse_error(e)});
    }
    return create_context(cfg, out);  // Context::create validates
  });
}

int dmakit_ctx_destroy(dmakit_ctx* h) {
  return guarded("dmakit_ctx_destroy", [&]() -> int {
    auto* slot = ctxs().retire(h);
    if (slot == nullptr) return misuse("dmakit_ctx_destroy", kStaleCtx);
    // Its devices' and pools' handles die with it (the objects themselves
    // with the Context).
    std::vector<DevTable::Slot*> dead_devs;
    devs().for_each_live([&](DevTable::Slot& d) {
      uint32_t gen = d.gen.load(std::memory_order_relaxed);
      if (d.value.ctx_handle == h && d.gen.compare_exchange_strong(gen, gen + 1)) dead_devs.push_back(&d);
    });
    std::vector<PoolTable::Slot*> dead;
    pools().for_each_live([&](PoolTable::Slot& p) {
      uint32_t gen = p.gen.load(std::memory_order_relaxed);
      if (p.value.ctx_handle == h && p.gen.compare_exchange_strong(gen, gen + 1)) dead.push_back(&p);
    });
    // An owned context takes its pools with it; a borrowed one stays, without
    // the pools made through this handle.
    const bool borrowed = slot->value.owned == nullptr;
    for (auto* d : dead_devs)
      if (borrowed) (void)d->value.ctx->close_device(d->value.dev);
    for (auto* p : dead)
      if (borrowed) (void)p->value.ctx->destroy_pool(p->value.pool);
    slot->value = CtxEntry{};
    ctxs().recycle(slot);
    for (auto* p : dead) {
      p->value = PoolEntry{};
      pools().recycle(p);
    }
    for (auto* d : dead_devs) {
      d->value = DevEntry{};
      devs().recycle(d);
    }
    return DMAKIT_OK;
  });
}

const char* dmakit_ctx_backend(const dmakit_ctx* h) {
  core::Context* ctx = ctx_of(h);
  if (ctx == nullptr) {
    misuse("dmakit_ctx_backend", kStaleCtx);
    return nullptr;
  }
  return ctx->backend().c_str();
}

int dmakit_ctx_flush(dmakit_ctx* h) {
  return guarded("dmakit_ctx_flush", [&]() -> int {
    core::Context* ctx = ctx_of(h);
    if (ctx == nullptr) return misuse("dmakit_ctx_flush", kStaleCtx);
    if (auto st = ctx->flush(); !st) return report(st.error());
    return DMAKIT_OK;
  });
}

int dmakit_ctx_get_stats(dmakit_ctx* h, dmakit_ctx_stats* out) {
  return guarded("dmakit_ctx_get_stats", [&]() -> int {
    core::Context* ctx = ctx_of(h);
    if (ctx == nullptr) return misuse("dmakit_ctx_get_stats", kStaleCtx);
    if (out == nullptr) return misuse("dmakit_ctx_get_stats", "out is NULL");
    constexpr size_t kSizeV1 = offsetof(dmakit_ctx_stats, pools) + sizeof(uint64_t);  // before the slab fields
    const uint32_t size = out->struct_size;
    if (size != sizeof(dmakit_ctx_stats) && size != kSizeV1)
      return misuse("dmakit_ctx_get_stats", fmt::format("out->struct_size is {}, expected sizeof(dmakit_ctx_stats) = {}",
                                                        out->struct_size, sizeof(dmakit_ctx_stats)));
    const core::ContextStats s = ctx->stats();
    dmakit_ctx_stats full{};
    full.struct_size = size;
    full.buffer_slabs = s.buffers.slabs;
    full.buffer_slab_bytes = s.buffers.slab_bytes;
    full.buffer_slab_bytes_in_use = s.buffers.slab_bytes_in_use;
    std::memcpy(out, &full, size);  // the caller's struct may end before the newer fields
    out->mappings = s.domain.mappings;
    out->mapped_bytes = s.domain.mapped_bytes;
    out->map_calls = s.domain.map_calls;
    out->unmap_calls = s.domain.unmap_calls;
    out->dma_avail = s.dma_avail;
    out->iova_pages_in_use = s.arena.pages_in_use;
    out->iova_stale_pages = s.arena.stale_pages;
    out->flushes = s.arena.flushes;
    out->buffers_live = s.buffers.buffers_live;
    out->buffer_bytes_live = s.buffers.bytes_live;
    out->buffer_bytes_recycled = s.buffers.recycled_bytes;
    out->caller_maps = s.caller_maps;
    out->caller_map_bytes = s.caller_map_bytes;
    out->pools = s.pools;
    return DMAKIT_OK;
  });
}

// ---------------------------------------------------------------------------
// Buffers

int dmakit_buffer_alloc(dmakit_ctx* h, uint64_t len, uint64_t align, uint32_t flags, uint64_t dma_limit,
                        dmakit_buffer** out) {
  return guarded("dmakit_buffer_alloc", [&]() -> int {
    core::Context* ctx = ctx_of(h);
    if (ctx == nullptr) return misuse("dmakit_buffer_alloc", kStaleCtx);
    if (out == nullptr) return misuse("dmakit_buffer_alloc", "out is NULL");
    *out = nullptr;
    constexpr uint32_t kKnown = DMAKIT_BUF_ZEROED | DMAKIT_BUF_DEVICE_READ | DMAKIT_BUF_DEVICE_WRITE;
    if ((flags & ~kKnown) != 0)
      return misuse("dmakit_buffer_alloc", fmt::format("unknown flag bits {:#x}", flags & ~kKnown));
    alloc_buffer::BufferRequest req;
    req.len = len;
    req.align = align == 0 ? alloc_buffer::kPage4K : align;
    req.zeroed = (flags & DMAKIT_BUF_ZEROED) != 0;
    req.dma_limit = dma_limit;
    req.prot = prot_of(flags);
    auto* slot = bufs().acquire();
    if (slot == nullptr) {
      if (!bufs().full()) return no_memory("dmakit_buffer_alloc: a block of buffer handles");
      return report({Errc::no_space, 0, fmt::format("dmakit_buffer_alloc: all {} buffer handles are in use",
                                                    BufTable::kCapacity)});
    }
    auto buf = ctx->buffers().alloc(req);
    if (!buf) {
      bufs().recycle(slot);
      return report(buf.error());
    }
    slot->value.buf = std::move(*buf);
    slot->value.ctx_handle = h;
    *out = static_cast<dmakit_buffer*>(bufs().publish(slot));
    return DMAKIT_OK;
  });
}

uint64_t dmakit_buffer_iova(const dmakit_buffer* b) {
  auto* s = live_buffer(b, "dmakit_buffer_iova");
  if (s == nullptr) return 0;
  return s->value.buf.iova();
}

uint64_t dmakit_buffer_size(const dmakit_buffer* b) {
  auto* s = live_buffer(b, "dmakit_buffer_size");
  if (s == nullptr) return 0;
  return s->value.buf.size();
}

void* dmakit_buffer_vaddr(const dmakit_buffer* b) {
  auto* s = live_buffer(b, "dmakit_buffer_vaddr");
  if (s == nullptr) return nullptr;
  return s->value.buf.vaddr();
}

void* dmakit_buffer_at(const dmakit_buffer* b, uint64_t offset) {
  auto* s = live_buffer(b, "dmakit_buffer_at");
  if (s == nullptr) return nullptr;
  void* p = s->value.buf.at(offset);
  if (p == nullptr)
    set_message_of([&] {
      return fmt::format("dmakit_buffer_at: offset {} is past the buffer's {} bytes", offset, s->value.buf.size());
    });
  return p;
}

int dmakit_buffer_segments(const dmakit_buffer* b, dmakit_segment* segs, size_t cap, size_t* count) {
  auto* s = live_buffer(b, "dmakit_buffer_segments");
  if (s == nullptr) return DMAKIT_EINVAL;
  if (count == nullptr) return misuse("dmakit_buffer_segments", "count is NULL");
  if (segs == nullptr && cap != 0) return misuse("dmakit_buffer_segments", "segs is NULL but cap is not 0");
  const alloc_buffer::Buffer& buf = s->value.buf;
  // Chunks that continue each other in host memory form one segment; the
  // last segment ends at size(), not at the span's rounding.
  size_t n = 0;
  dmakit_segment cur{};
  const uint64_t end = buf.iova() + buf.size();
  auto emit = [&] {
    if (n < cap) segs[n] = cur;
    ++n;
  };
  for (const auto& c : buf.chunks()) {
    if (c.iova >= end) break;
    const uint64_t len = std::min(c.len, end - c.iova);
    if (cur.len != 0 && static_cast<char*>(cur.vaddr) + cur.len == c.vaddr) {
      cur.len += len;
      continue;
    }
    if (cur.len != 0) emit();
    cur = dmakit_segment{c.vaddr, c.iova, len};
  }
  if (cur.len != 0) emit();
  *count = n;
  if (n > cap) {
    set_message_of([&] { return fmt::format("dmakit_buffer_segments: the buffer has {} segments, room for {}", n, cap); });
    return DMAKIT_ENOSPC;
  }
  return DMAKIT_OK;
}

int dmakit_buffer_free(dmakit_buffer* b) {
  return guarded("dmakit_buffer_free", [&]() -> int {
    auto* slot = bufs().retire(b);
    if (slot == nullptr) return misuse("dmakit_buffer_free", kStaleBuf);
    const bool ctx_alive = ctxs().find(slot->value.ctx_handle) != nullptr;
    // Returns the buffer to its allocator; with the context gone only the
    // record goes (its memory stayed where a device may reach it).
    slot->value = BufEntry{};
    bufs().recycle(slot);
    if (!ctx_alive) return misuse("dmakit_buffer_free", "the buffer's context was destroyed; the handle is released");
    return DMAKIT_OK;
  });
}

// ---------------------------------------------------------------------------
// Translation and caller memory

int dmakit_vtophys(dmakit_ctx* h, const void* vaddr, uint64_t* iova, uint64_t* len) {
  core::Context* ctx = ctx_of(h);
  if (ctx == nullptr) return misuse("dmakit_vtophys", kStaleCtx);
  if (iova == nullptr) return misuse("dmakit_vtophys", "iova is NULL");
  auto run = ctx->domain().translate_host(vaddr);
  if (!run) [[unlikely]]
    return guarded("dmakit_vtophys", [&] { return report(ctx->translate(vaddr).error()); });
  *iova = run->iova;
  if (len != nullptr) *len = run->len;
  return DMAKIT_OK;
}

int dmakit_mem_map(dmakit_ctx* h, void* vaddr, uint64_t len, uint32_t flags, uint64_t dma_limit, uint64_t* iova) {
  return guarded("dmakit_mem_map", [&]() -> int {
    core::Context* ctx = ctx_of(h);
    if (ctx == nullptr) return misuse("dmakit_mem_map", kStaleCtx);
    if (iova == nullptr) return misuse("dmakit_mem_map", "iova is NULL");
    constexpr uint32_t kKnown = DMAKIT_BUF_DEVICE_READ | DMAKIT_BUF_DEVICE_WRITE;
    if ((flags & ~kKnown) != 0)
      return misuse("dmakit_mem_map", fmt::format("flag bits {:#x} are unknown here (only DEVICE_READ/WRITE)",
                                                  flags & ~kKnown));
    auto r = ctx->map_memory(vaddr, len, prot_of(flags), dma_limit);
    if (!r) return report(r.error());
    *iova = *r;
    return DMAKIT_OK;
  });
}

int dmakit_mem_unmap(dmakit_ctx* h, void* vaddr) {
  return guarded("dmakit_mem_unmap", [&]() -> int {
    core::Context* ctx = ctx_of(h);
    if (ctx == nullptr) return misuse("dmakit_mem_unmap", kStaleCtx);
    if (auto st = ctx->unmap_memory(vaddr); !st) return report(st.error());
    return DMAKIT_OK;
  });
}

// ---------------------------------------------------------------------------
// Pools

void dmakit_pool_params_init(dmakit_pool_params* p, const char* name, size_t size) {
  if (p == nullptr) return;
  *p = dmakit_pool_params{};
  p->struct_size = sizeof(dmakit_pool_params);
  p->name = name;
  p->size = size;
  p->dma_limit = UINT64_MAX;
  p->cache_size = UINT32_MAX;
}

int dmakit_pool_create_with(dmakit_ctx* h, const dmakit_pool_params* p, dmakit_pool** out) {
  return guarded("dmakit_pool_create", [&]() -> int {
    core::Context* ctx = ctx_of(h);
    if (ctx == nullptr) return misuse("dmakit_pool_create", kStaleCtx);
    if (out == nullptr) return misuse("dmakit_pool_create", "out is NULL");
    *out = nullptr;
    if (p == nullptr) return misuse("dmakit_pool_create", "params is NULL");
    if (p->struct_size != sizeof(dmakit_pool_params))
      return misuse("dmakit_pool_create", fmt::format("params.struct_size is {}, expected {}: fill it with "
                                                      "dmakit_pool_params_init()",
                                                      p->struct_size, sizeof(dmakit_pool_params)));
    if (p->name == nullptr) return misuse("dmakit_pool_create", "name is NULL");
    constexpr uint32_t kKnown = DMAKIT_POOL_ZERO | DMAKIT_POOL_POISON;
    if ((p->flags & ~kKnown) != 0)
      return misuse("dmakit_pool_create", fmt::format("unknown flag bits {:#x}", p->flags & ~kKnown));
    pool::PoolOptions opts;
    opts.cache_size = p->cache_size == UINT32_MAX ? ctx->config().pool.cache_size : p->cache_size;
    opts.poison = (p->flags & DMAKIT_POOL_POISON) != 0 || ctx->config().pool.poison;
    opts.zero = (p->flags & DMAKIT_POOL_ZERO) != 0;
    opts.dma_limit = p->dma_limit;
    auto* slot = pools().acquire();
    if (slot == nullptr)
      return pools().full() ? report({Errc::no_space, 0, "dmakit_pool_create: every pool handle is in use"})
                            : no_memory("dmakit_pool_create: a block of pool handles");
    auto created = ctx->create_pool(p->name, p->size, p->align, p->boundary, opts);
    if (!created) {
      pools().recycle(slot);
      return report(created.error());
    }
    slot->value = PoolEntry{*created, ctx, h};
    *out = static_cast<dmakit_pool*>(pools().publish(slot));
    return DMAKIT_OK;
  });
}

int dmakit_pool_create(dmakit_ctx* ctx, const char* name, size_t size, size_t align, size_t boundary,
                       dmakit_pool** out) {
  dmakit_pool_params p;
  dmakit_pool_params_init(&p, name, size);
  p.align = align;
  p.boundary = boundary;
  return dmakit_pool_create_with(ctx, &p, out);
}

// The hot calls are flattened: everything they call that can be inlined is
// (the handle lookup, its atomic loads, the pool's fast path); without it
// GCC left HandleTable::find and std::atomic::load as calls in this large
// unit. Their fast paths call nothing: every other case leaves through a
// tail call (pool_alloc_slow, pool_free_slow, bad_pool_call), so they need
// no stack frame and save no registers. Callgrind, the kernel pattern:
// 169 -> 147 -> 129 instructions per alloc+free pair (C++: 59); see
// docs/PERFORMANCE.md, "C API against C++".
[[gnu::hot, gnu::flatten]] int dmakit_pool_alloc(dmakit_pool* h, void** vaddr, uint64_t* iova) {
  auto* s = pools().find(h);
  if (s == nullptr || vaddr == nullptr || iova == nullptr) [[unlikely]]
    return bad_pool_call("dmakit_pool_alloc", h);
  pool::DmaPool& p = *s->value.pool;
  const pool::DmaBlock b = p.try_alloc();
  if (b.vaddr == nullptr) [[unlikely]]
    return pool_alloc_slow(p, vaddr, iova);
  *vaddr = b.vaddr;
  *iova = b.iova;
  return DMAKIT_OK;
}

[[gnu::hot, gnu::flatten]] int dmakit_pool_alloc_zeroed(dmakit_pool* h, void** vaddr, uint64_t* iova) {
  auto* s = pools().find(h);
  if (s == nullptr || vaddr == nullptr || iova == nullptr) [[unlikely]]
    return bad_pool_call("dmakit_pool_alloc_zeroed", h);
  auto b = s->value.pool->alloc();
  if (!b) [[unlikely]]
    return report(b.error());
  std::memset(b->vaddr, 0, s->value.pool->block_size());
  *vaddr = b->vaddr;
  *iova = b->iova;
  return DMAKIT_OK;
}

[[gnu::hot, gnu::flatten]] int dmakit_pool_free(dmakit_pool* h, void* vaddr, uint64_t iova) {
  auto* s = pools().find(h);
  if (s == nullptr) [[unlikely]]
    return bad_pool_call("dmakit_pool_free", h);
  pool::DmaPool& p = *s->value.pool;
  if (!p.try_free(vaddr, iova)) [[unlikely]]
    return pool_free_slow(p, vaddr, iova);
  return DMAKIT_OK;
}

int dmakit_pool_alloc_bulk(dmakit_pool* h, size_t n, void** vaddrs, uint64_t* iovas) {
  auto* s = pools().find(h);
  if (s == nullptr || (n != 0 && (vaddrs == nullptr || iovas == nullptr))) [[unlikely]]
    return bad_pool_call("dmakit_pool_alloc_bulk", h);
  pool::DmaPool& p = *s->value.pool;
  for (size_t i = 0; i < n; ++i) {
    auto b = p.alloc();
    if (!b) [[unlikely]] {
      int rc = report(b.error());
      while (i-- > 0) (void)p.free(vaddrs[i], iovas[i]);  // all or none
      return rc;
    }
    vaddrs[i] = b->vaddr;
    iovas[i] = b->iova;
  }
  return DMAKIT_OK;
}

int dmakit_pool_free_bulk(dmakit_pool* h, size_t n, void* const* vaddrs, const uint64_t* iovas) {
  auto* s = pools().find(h);
  if (s == nullptr || (n != 0 && (vaddrs == nullptr || iovas == nullptr))) [[unlikely]]
    return bad_pool_call("dmakit_pool_free_bulk", h);
  pool::DmaPool& p = *s->value.pool;
  int first = DMAKIT_OK;
  for (size_t i = 0; i < n; ++i) {
    auto st = p.free(vaddrs[i], iovas[i]);
    if (!st && first == DMAKIT_OK) [[unlikely]]
      first = report(st.error());
  }
  return first;
}

int dmakit_pool_get_stats(dmakit_pool* h, dmakit_pool_stats* out) {
  return guarded("dmakit_pool_get_stats", [&]() -> int {
    auto* s = pools().find(h);
    if (s == nullptr) return misuse("dmakit_pool_get_stats", kStalePool);
    if (out == nullptr) return misuse("dmakit_pool_get_stats", "out is NULL");
    if (out->struct_size != sizeof(dmakit_pool_stats))
      return misuse("dmakit_pool_get_stats", fmt::format("out->struct_size is {}, expected sizeof(dmakit_pool_stats) = {}",
                                                         out->struct_size, sizeof(dmakit_pool_stats)));
    const pool::PoolStats ps = s->value.pool->stats();
    *out = dmakit_pool_stats{};
    out->struct_size = sizeof(dmakit_pool_stats);
    out->size = ps.size;
    out->align = ps.align;
    out->boundary = ps.boundary;
    out->chunk_bytes = ps.chunk_bytes;
    out->blocks = ps.blocks;
    out->active = ps.active;
    out->chunks = ps.chunks;
    out->validation_failures = ps.validation_failures;
    out->grow_failures = ps.grow_failures;
    return DMAKIT_OK;
  });
}

int dmakit_pool_destroy(dmakit_pool* h) {
  return guarded("dmakit_pool_destroy", [&]() -> int {
    auto* slot = pools().retire(h);
    if (slot == nullptr) return misuse("dmakit_pool_destroy", kStalePool);
    PoolEntry e = slot->value;
    slot->value = PoolEntry{};
    pools().recycle(slot);
    if (auto st = e.ctx->destroy_pool(e.pool); !st) return report(st.error());
    return DMAKIT_OK;
  });
}

// ---- Devices ----------------------------------------------------------------

int dmakit_ctx_attach(dmakit_ctx* h, const char* bdf) {
  return guarded("dmakit_ctx_attach", [&]() -> int {
    core::Context* ctx = ctx_of(h);
    if (ctx == nullptr) return misuse("dmakit_ctx_attach", kStaleCtx);
    if (bdf == nullptr) return misuse("dmakit_ctx_attach", "bdf is NULL");
    return status_of(ctx->attach_device(bdf));
  });
}

int dmakit_ctx_detach(dmakit_ctx* h, const char* bdf) {
  return guarded("dmakit_ctx_detach", [&]() -> int {
    core::Context* ctx = ctx_of(h);
    if (ctx == nullptr) return misuse("dmakit_ctx_detach", kStaleCtx);
    if (bdf == nullptr) return misuse("dmakit_ctx_detach", "bdf is NULL");
    return status_of(ctx->detach_device(bdf));
  });
}

int dmakit_ctx_devices(const dmakit_ctx* h, char* buf, size_t cap, size_t* len) {
  return guarded("dmakit_ctx_devices", [&]() -> int {
    core::Context* ctx = ctx_of(h);
    if (ctx == nullptr) return misuse("dmakit_ctx_devices", kStaleCtx);
    if (buf == nullptr && cap != 0) return misuse("dmakit_ctx_devices", "buf is NULL but cap is not 0");
    std::string list;
    for (const auto& d : ctx->devices()) list += (list.empty() ? "" : ",") + d;
    if (len != nullptr) *len = list.size();
    if (cap < list.size() + 1)
      return report({Errc::no_space, 0,
                     fmt::format("dmakit_ctx_devices: the list needs {} bytes, buf has {}", list.size() + 1, cap)});
    std::memcpy(buf, list.c_str(), list.size() + 1);
    return DMAKIT_OK;
  });
}

int dmakit_device_open(dmakit_ctx* h, const char* bdf, dmakit_device** out) {
  return guarded("dmakit_device_open", [&]() -> int {
    core::Context* ctx = ctx_of(h);
    if (ctx == nullptr) return misuse("dmakit_device_open", kStaleCtx);
    if (out == nullptr) return misuse("dmakit_device_open", "out is NULL");
    *out = nullptr;
    if (bdf == nullptr) return misuse("dmakit_device_open", "bdf is NULL");
    auto* slot = devs().acquire();
    if (slot == nullptr)
      return devs().full() ? report({Errc::no_space, 0, "dmakit_device_open: every device handle is in use"})
                           : no_memory("dmakit_device_open: a block of device handles");
    auto dev = ctx->open_device(bdf);
    if (!dev) {
      devs().recycle(slot);
      return report(dev.error());
    }
    slot->value = DevEntry{*dev, ctx, h};
    *out = static_cast<dmakit_device*>(devs().publish(slot));
    return DMAKIT_OK;
  });
}

int dmakit_device_close(dmakit_device* h) {
  return guarded("dmakit_device_close", [&]() -> int {
    auto* slot = devs().retire(h);
    if (slot == nullptr) return misuse("dmakit_device_close", kStaleDev);
    DevEntry e = slot->value;
    slot->value = DevEntry{};
    devs().recycle(slot);
    return status_of(e.ctx->close_device(e.dev));
  });
}

const char* dmakit_device_bdf(const dmakit_device* h) {
  core::Device* d = dev_of(h);
  if (d == nullptr) {
    misuse("dmakit_device_bdf", kStaleDev);
    return nullptr;
  }
  return d->bdf().c_str();
}

int dmakit_device_region_info(dmakit_device* h, uint32_t index, dmakit_region_info* out) {
  return guarded("dmakit_device_region_info", [&]() -> int {
    core::Device* d = dev_of(h);
    if (d == nullptr) return misuse("dmakit_device_region_info", kStaleDev);
    if (out == nullptr) return misuse("dmakit_device_region_info", "out is NULL");
    if (out->struct_size != sizeof(dmakit_region_info))
      return misuse("dmakit_device_region_info",
                    fmt::format("out->struct_size is {}, expected sizeof(dmakit_region_info) = {}", out->struct_size,
                                sizeof(dmakit_region_info)));
    auto ri = d->region_info(index);
    if (!ri) return report(ri.error());
    *out = dmakit_region_info{};
    out->struct_size = sizeof(dmakit_region_info);
    out->index = index;
    out->flags = (ri->readable() ? DMAKIT_REGION_READ : 0u) | (ri->writable() ? DMAKIT_REGION_WRITE : 0u) |
                 (!ri->mmap_areas.empty() ? DMAKIT_REGION_MMAP : 0u);
    out->size = ri->size;
    return DMAKIT_OK;
  });
}

int dmakit_device_map_bar(dmakit_device* h, uint32_t bar, dmakit_bar* out) {
  return guarded("dmakit_device_map_bar", [&]() -> int {
    core::Device* d = dev_of(h);
    if (d == nullptr) return misuse("dmakit_device_map_bar", kStaleDev);
    if (out == nullptr) return misuse("dmakit_device_map_bar", "out is NULL");
    auto m = d->map_bar(bar);
    if (!m) return report(m.error());
    out->base = (*m)->data();
    out->size = (*m)->size();
    out->index = bar;
    return DMAKIT_OK;
  });
}

int dmakit_mmio_refused(const dmakit_bar* bar, uint64_t off, unsigned width, int write) {
  return guarded("dmakit_mmio", [&]() -> int {
    const std::string what =
        bar == nullptr
            ? fmt::format("dmakit_mmio_{}{}: bar is NULL", write ? "write" : "read", width * 8)
            : fmt::format("dmakit_mmio_{}{}: BAR{} offset {:#x} refused: {}", write ? "write" : "read", width * 8,
                          bar->index, off,
                          off % width != 0 ? fmt::format("not {}-byte aligned", width)
                                           : fmt::format("outside the {:#x}-byte mapping", bar->size));
    base::log().error("{}", what);
    set_message(what);
    return DMAKIT_EINVAL;
  });
}

int dmakit_device_config_read(dmakit_device* h, uint64_t off, void* buf, size_t len) {
  return guarded("dmakit_device_config_read", [&]() -> int {
    core::Device* d = dev_of(h);
    if (d == nullptr) return misuse("dmakit_device_config_read", kStaleDev);
    if (buf == nullptr && len != 0) return misuse("dmakit_device_config_read", "buf is NULL");
    return status_of(d->config_read(off, std::span(static_cast<std::byte*>(buf), len)));
  });
}

int dmakit_device_config_write(dmakit_device* h, uint64_t off, const void* buf, size_t len) {
  return guarded("dmakit_device_config_write", [&]() -> int {
    core::Device* d = dev_of(h);
    if (d == nullptr) return misuse("dmakit_device_config_write", kStaleDev);
    if (buf == nullptr && len != 0) return misuse("dmakit_device_config_write", "buf is NULL");
    return status_of(d->config_write(off, std::span(static_cast<const std::byte*>(buf), len)));
  });
}

int dmakit_device_set_bus_master(dmakit_device* h, int enable) {
  return guarded("dmakit_device_set_bus_master", [&]() -> int {
    core::Device* d = dev_of(h);
    if (d == nullptr) return misuse("dmakit_device_set_bus_master", kStaleDev);
    return status_of(d->set_bus_master(enable != 0));
  });
}

int dmakit_device_reset(dmakit_device* h) {
  return guarded("dmakit_device_reset", [&]() -> int {
    core::Device* d = dev_of(h);
    if (d == nullptr) return misuse("dmakit_device_reset", kStaleDev);
    return status_of(d->reset());
  });
}

int dmakit_device_irq_count(dmakit_device* h, int type, uint32_t* count) {
  return guarded("dmakit_device_irq_count", [&]() -> int {
    core::Device* d = dev_of(h);
    if (d == nullptr) return misuse("dmakit_device_irq_count", kStaleDev);
    if (count == nullptr) return misuse("dmakit_device_irq_count", "count is NULL");
    if (type < 0) return misuse("dmakit_device_irq_count", fmt::format("type {} is not a dmakit_irq_type", type));
    auto n = d->irq_count(static_cast<uint32_t>(type));
    if (!n) return report(n.error());
    *count = *n;
    return DMAKIT_OK;
  });
}

int dmakit_device_irq_enable(dmakit_device* h, int type, uint32_t count, int* efds) {
  return guarded("dmakit_device_irq_enable", [&]() -> int {
    core::Device* d = dev_of(h);
    if (d == nullptr) return misuse("dmakit_device_irq_enable", kStaleDev);
    if (type < 0) return misuse("dmakit_device_irq_enable", fmt::format("type {} is not a dmakit_irq_type", type));
    auto fds = d->irq_enable(static_cast<uint32_t>(type), count);
    if (!fds) return report(fds.error());
    if (efds != nullptr) std::copy(fds->begin(), fds->end(), efds);
    return DMAKIT_OK;
  });
}

int dmakit_device_irq_disable(dmakit_device* h, int type) {
  return guarded("dmakit_device_irq_disable", [&]() -> int {
    core::Device* d = dev_of(h);
    if (d == nullptr) return misuse("dmakit_device_irq_disable", kStaleDev);
    if (type < 0) return misuse("dmakit_device_irq_disable", fmt::format("type {} is not a dmakit_irq_type", type));
    return status_of(d->irq_disable(static_cast<uint32_t>(type)));
  });
}

namespace {
int irq_mask_call(const char* call, dmakit_device* h, int type, uint32_t vector, bool masked) {
  return guarded(call, [&]() -> int {
    core::Device* d = dev_of(h);
    if (d == nullptr) return misuse(call, kStaleDev);
    if (type < 0) return misuse(call, fmt::format("type {} is not a dmakit_irq_type", type));
    return status_of(d->irq_mask(static_cast<uint32_t>(type), vector, masked));
  });
}
}  // namespace

int dmakit_device_irq_mask(dmakit_device* h, int type, uint32_t vector) {
  return irq_mask_call("dmakit_device_irq_mask", h, type, vector, true);
}

int dmakit_device_irq_unmask(dmakit_device* h, int type, uint32_t vector) {
  return irq_mask_call("dmakit_device_irq_unmask", h, type, vector, false);
}

int dmakit_device_irq_wait(dmakit_device* h, int type, uint32_t vector, int timeout_ms, uint64_t* count) {
  return guarded("dmakit_device_irq_wait", [&]() -> int {
    core::Device* d = dev_of(h);
    if (d == nullptr) return misuse("dmakit_device_irq_wait", kStaleDev);
    if (type < 0) return misuse("dmakit_device_irq_wait", fmt::format("type {} is not a dmakit_irq_type", type));
    auto n = d->irq_wait(static_cast<uint32_t>(type), vector, timeout_ms < 0 ? -1 : timeout_ms);
    if (!n) return report(n.error());
    if (count != nullptr) *count = *n;
    return DMAKIT_OK;
  });
}

}  // extern "C"
