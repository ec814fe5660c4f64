// The C boundary: catches everything, turns errors into dmakit_errc plus a
// thread-local message.
#include <new>
#include <string>

#include "alloc_buffer/buffer_allocator.hpp"
#include "base/config.hpp"
#include "core/context.hpp"
#include "dmakit/dmakit.h"
#include "pool/dma_pool.hpp"

struct dmakit_ctx {
  std::unique_ptr<dmakit::core::Context> ctx;
};
struct dmakit_buffer {
  dmakit::alloc_buffer::Buffer buf;
};
struct dmakit_pool {
  dmakit::core::Context* ctx;
  dmakit::pool::DmaPool* pool;
};

namespace {

thread_local std::string g_last_error;

int report(const dmakit::Error& e) {
  g_last_error = e.what();
  return -static_cast<int>(e.code);
}

template <class F>
int guarded(F&& f) noexcept {
  try {
    g_last_error.clear();
    return f();
  } catch (const std::bad_alloc&) {
    g_last_error = "out of host memory";
    return DMAKIT_ENOMEM;
  } catch (const std::exception& e) {
    g_last_error = std::string("internal error: ") + e.what();
    return DMAKIT_EINTERNAL;
  } catch (...) {
    g_last_error = "internal error";
    return DMAKIT_EINTERNAL;
  }
}

}  // namespace

extern "C" {

const char* dmakit_last_error(void) { return g_last_error.c_str(); }

int dmakit_ctx_create(const char* config_path, int argc, const char* const* argv, dmakit_ctx** out) {
  return guarded([&]() -> int {
    if (out == nullptr) return report({dmakit::Errc::invalid_argument, 0, "dmakit_ctx_create: out is NULL"});
    *out = nullptr;
    dmakit::base::Config cfg;
    CLI::App app{"dmakit"};
    dmakit::base::add_config_options(app, cfg, "");
    std::vector<std::string> args;
    for (int i = argc - 1; i >= 0; --i) args.emplace_back(argv[i]);  // CLI11 takes them reversed
    if (config_path != nullptr) {
      args.emplace_back(config_path);
      args.emplace_back("--config");
    }
    try {
      app.parse(args);
    } catch (const CLI::Error& e) {
      return report({dmakit::Errc::invalid_argument, 0, dmakit::base::describe_parse_error(e)});
    }
    auto ctx = dmakit::core::Context::create(cfg);
    if (!ctx) return report(ctx.error());
    *out = new dmakit_ctx{std::move(*ctx)};  // owned by the caller until dmakit_ctx_destroy
    return DMAKIT_OK;
  });
}

void dmakit_ctx_destroy(dmakit_ctx* ctx) {
  guarded([&] {
    delete ctx;
    return 0;
  });
}

int dmakit_buffer_alloc(dmakit_ctx* ctx, uint64_t len, uint32_t flags, uint64_t dma_limit, dmakit_buffer** out) {
  return guarded([&]() -> int {
    if (ctx == nullptr || out == nullptr)
      return report({dmakit::Errc::invalid_argument, 0, "dmakit_buffer_alloc: ctx or out is NULL"});
    dmakit::alloc_buffer::BufferRequest req;
    req.len = len;
    req.zeroed = (flags & DMAKIT_BUF_ZEROED) != 0;
    req.dma_limit = dma_limit;
    auto buf = ctx->ctx->buffers().alloc(req);
    if (!buf) return report(buf.error());
    *out = new dmakit_buffer{std::move(*buf)};
    return DMAKIT_OK;
  });
}

uint64_t dmakit_buffer_iova(const dmakit_buffer* b) { return b != nullptr ? b->buf.iova() : 0; }
uint64_t dmakit_buffer_size(const dmakit_buffer* b) { return b != nullptr ? b->buf.size() : 0; }
void* dmakit_buffer_at(const dmakit_buffer* b, uint64_t offset) {
  return b != nullptr ? b->buf.at(offset) : nullptr;
}

void dmakit_buffer_free(dmakit_buffer* b) {
  guarded([&] {
    delete b;
    return 0;
  });
}

int dmakit_pool_create(dmakit_ctx* ctx, const char* name, size_t size, size_t align, size_t boundary,
                       dmakit_pool** out) {
  return guarded([&]() -> int {
    if (ctx == nullptr || name == nullptr || out == nullptr)
      return report({dmakit::Errc::invalid_argument, 0, "dmakit_pool_create: ctx, name or out is NULL"});
    auto p = ctx->ctx->create_pool(name, size, align, boundary);
    if (!p) return report(p.error());
    *out = new dmakit_pool{ctx->ctx.get(), *p};
    return DMAKIT_OK;
  });
}

int dmakit_pool_alloc(dmakit_pool* pool, void** vaddr, uint64_t* iova) {
  return guarded([&]() -> int {
    if (pool == nullptr || vaddr == nullptr || iova == nullptr)
      return report({dmakit::Errc::invalid_argument, 0, "dmakit_pool_alloc: pool, vaddr or iova is NULL"});
    auto b = pool->pool->alloc();
    if (!b) return report(b.error());
    *vaddr = b->vaddr;
    *iova = b->iova;
    return DMAKIT_OK;
  });
}

int dmakit_pool_free(dmakit_pool* pool, void* vaddr, uint64_t iova) {
  return guarded([&]() -> int {
    if (pool == nullptr) return report({dmakit::Errc::invalid_argument, 0, "dmakit_pool_free: pool is NULL"});
    auto st = pool->pool->free(vaddr, iova);
    if (!st) return report(st.error());
    return DMAKIT_OK;
  });
}

void dmakit_pool_destroy(dmakit_pool* pool) {
  guarded([&] {
    if (pool != nullptr) (void)pool->ctx->destroy_pool(pool->pool);
    delete pool;
    return 0;
  });
}

}  // extern "C"
