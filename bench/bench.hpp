// Benchmarks behind `dmakit bench NAME --json`. Each returns the object
// {"bench": NAME, "results": [...]} whose fields DESIGN.md and
// docs/PERFORMANCE.md describe. Times are medians of repeated runs in one
// process; every benchmark checks the work it timed and fails rather than
// print numbers from a broken run.
#pragma once

#include "json.hpp"
#include "core/context.hpp"
#include "base/error.hpp"

namespace dmakit::bench {

// quick: every case, with few repeats and small sizes (`dmakit bench
// --quick`, for checking that a benchmark runs, not for its figures).
Result<Json> run_arena(core::Context& ctx, bool quick = false);
Result<Json> run_buffer(core::Context& ctx, bool quick = false);
Result<Json> run_dmapool(core::Context& ctx, bool quick = false);

}  // namespace dmakit::bench
