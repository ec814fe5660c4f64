// The buffer benchmark's small-buffer cases, run small on the simulated
// backend: each row present with its fields, the figures the run counted
// consistent with what it did. No timing is asserted.
#include <gtest/gtest.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "bench_buffer.hpp"
#include "json.hpp"
#include "core/context.hpp"
#include "sim_config.hpp"

namespace dmakit::bench {
namespace {

// The result row whose fields include every (key, value) of `match`; null
// if there is none.
Json row(const Json& bench, const Json& match) {
  for (const auto& r : bench.at("results")) {
    bool all = true;
    for (const auto& [k, v] : match.items()) all = all && r.contains(k) && r.at(k) == v;
    if (all) return r;
  }
  return nullptr;
}

double field(const Json& row, const char* name) {
  return row.contains(name) && row.at(name).is_number() ? row.at(name).get<double>()
                                                         : std::numeric_limits<double>::quiet_NaN();
}

TEST(BufferBench, SmallBufferCasesRunAndCheckTheirWork) {
  auto ctx = core::Context::create(testing_support::sim_config());
  ASSERT_TRUE(ctx.has_value()) << ctx.error().what();
  BufferBenchOptions o;
  o.many_small = 70000;  // past the simulated dma_entry_limit of 65535
  o.mixed_bytes = 64ull << 20;
  o.pairs = 2000;
  o.repeats = 3;
  o.classic = false;
  auto j = run_buffer(**ctx, o);
  ASSERT_TRUE(j.has_value()) << j.error().what();
  // Parsed back from its text, as a reader of `dmakit bench buffer --json` would.
  const std::string s = j->dump();
  const Json parsed = Json::parse(s);
  ASSERT_EQ(parsed.at("bench"), "buffer") << s;
  ASSERT_TRUE(parsed.at("results").is_array()) << s;

  const Json many = row(parsed, {{"case", "many_small"}});
  ASSERT_FALSE(many.is_null()) << s;
  EXPECT_EQ(field(many, "bytes"), 4096.0);
  EXPECT_EQ(field(many, "buffers"), 70000.0) << many;
  EXPECT_FALSE(many.contains("refused")) << many;
  EXPECT_GE(field(many, "entries"), 1.0);
  EXPECT_LE(field(many, "entries_per_gib"), 512.0) << "more than one entry per 2 MiB: " << many;
  EXPECT_NEAR(field(many, "entries_per_gib"), field(many, "entries") * 1024.0 * 1024 * 1024 / (70000.0 * 4096), 1e-6);

  // The EAL runs without hugepages here: that row says so, the other is measured.
  const Json huge = row(parsed, {{"case", "mixed"}, {"hugepages", true}});
  ASSERT_FALSE(huge.is_null()) << s;
  EXPECT_TRUE(huge.contains("skipped")) << huge;
  const Json mixed = row(parsed, {{"case", "mixed"}, {"hugepages", false}});
  ASSERT_FALSE(mixed.is_null()) << s;
  EXPECT_GE(field(mixed, "live_bytes"), 64.0 * 1024 * 1024);
  EXPECT_GT(field(mixed, "buffers"), 64.0);  // 4 KiB-1 MiB each
  EXPECT_LE(field(mixed, "entries_per_gib"), 512.0) << mixed;
  EXPECT_NEAR(field(mixed, "entries_per_gib"), field(mixed, "entries") * 1024.0 * 1024 * 1024 / field(mixed, "live_bytes"),
              1e-6);

  for (const char* impl : {"dmakit", "rte_malloc", "dmakit-pool"}) {
    const Json r = row(parsed, {{"case", "small_alloc_free"}, {"bytes", 4096}, {"impl", impl}});
    ASSERT_FALSE(r.is_null()) << impl << " missing: " << s;
    EXPECT_GT(field(r, "ns_per_pair"), 0.0) << r;
    EXPECT_EQ(field(r, "live"), 512.0) << r;
    EXPECT_EQ(field(r, "pairs"), 2000.0) << r;
  }
  const Json d = row(parsed, {{"case", "small_alloc_free"}, {"impl", "dmakit"}});
  EXPECT_GT(field(d, "vs_pool"), 0.0) << d;
  EXPECT_GT(field(d, "vs_rte_malloc"), 0.0) << d;
  EXPECT_EQ(s.find("null"), std::string::npos) << s;
  // The benchmark leaves the context as it found it.
  EXPECT_EQ((*ctx)->buffers().stats().buffers_live, 0u);
}

TEST(BufferBench, RefusesZeroCounts) {
  auto ctx = core::Context::create(testing_support::sim_config());
  ASSERT_TRUE(ctx.has_value()) << ctx.error().what();
  BufferBenchOptions o;
  o.pairs = 0;
  auto j = run_buffer(**ctx, o);
  ASSERT_FALSE(j.has_value());
  EXPECT_EQ(j.error().code, Errc::invalid_argument);
}

}  // namespace
}  // namespace dmakit::bench
