// C handles for C++ objects: lets C++ code that owns a Context drive it
// through the C API as well (the dmapool bench times dmakit_pool_alloc/free
// on the same context, so on the same buffer allocator, as DmaPool's own
// calls). Internal: not part of include/dmakit/.
#pragma once

#include "core/context.hpp"
#include "dmakit/dmakit.h"

namespace dmakit::core {

// A context handle for ctx, which the caller keeps owning (and must keep
// alive until the handle is destroyed). dmakit_ctx_destroy() ends the
// handle: the pools made through it are destroyed and their handles turn
// stale, but ctx itself stays. nullptr when every context handle is in use.
dmakit_ctx* borrow_c_handle(Context& ctx) noexcept;

}  // namespace dmakit::core
