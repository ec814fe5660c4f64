// The buffer benchmark's small-buffer cases, run small on the simulated
// backend: each row present with its fields, the figures the run counted
// consistent with what it did. No timing is asserted.
#include <gtest/gtest.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "bench_buffer.hpp"
#include "core/context.hpp"

namespace dmakit::bench {
namespace {

// The flat row that contains `key`; "" if there is none.
std::string row(const std::string& json, const std::string& key) {
  const size_t at = json.find(key);
  if (at == std::string::npos) return "";
  const size_t begin = json.rfind('{', at), end = json.find('}', at);
  return json.substr(begin, end - begin + 1);
}

double field(const std::string& row, const std::string& name) {
  const std::string key = "\"" + name + "\":";
  const size_t at = row.find(key);
  if (at == std::string::npos) return std::numeric_limits<double>::quiet_NaN();
  const char* begin = row.c_str() + at + key.size();
  char* end = nullptr;
  const double v = std::strtod(begin, &end);
  return end == begin ? std::numeric_limits<double>::quiet_NaN() : v;
}

TEST(BufferBench, SmallBufferCasesRunAndCheckTheirWork) {
  core::Config cfg;
  cfg.eal.mode = "nohuge";
  cfg.eal.memory_mb = 256;
  cfg.iommu.backend = "sim";
  auto ctx = core::Context::create(cfg);
  ASSERT_TRUE(ctx.has_value()) << ctx.error().what();
  BufferBenchOptions o;
  o.many_small = 70000;  // past the simulated dma_entry_limit of 65535
  o.mixed_bytes = 64ull << 20;
  o.pairs = 2000;
  o.repeats = 3;
  o.classic = false;
  auto j = run_buffer(**ctx, o);
  ASSERT_TRUE(j.has_value()) << j.error().what();
  const std::string s = j->str();
  EXPECT_EQ(s.rfind("{\"bench\":\"buffer\",\"results\":[", 0), 0u) << s;

  const std::string many = row(s, "\"case\":\"many_small\"");
  ASSERT_FALSE(many.empty()) << s;
  EXPECT_EQ(field(many, "bytes"), 4096.0);
  EXPECT_EQ(field(many, "buffers"), 70000.0) << many;
  EXPECT_EQ(many.find("refused"), std::string::npos) << many;
  EXPECT_GE(field(many, "entries"), 1.0);
  EXPECT_LE(field(many, "entries_per_gib"), 512.0) << "more than one entry per 2 MiB: " << many;
  EXPECT_NEAR(field(many, "entries_per_gib"), field(many, "entries") * 1024.0 * 1024 * 1024 / (70000.0 * 4096), 1e-6);

  // The EAL runs without hugepages here: that row says so, the other is measured.
  const std::string huge = row(s, "\"case\":\"mixed\",\"hugepages\":true");
  ASSERT_FALSE(huge.empty()) << s;
  EXPECT_NE(huge.find("\"skipped\""), std::string::npos) << huge;
  const std::string mixed = row(s, "\"case\":\"mixed\",\"hugepages\":false");
  ASSERT_FALSE(mixed.empty()) << s;
  EXPECT_GE(field(mixed, "live_bytes"), 64.0 * 1024 * 1024);
  EXPECT_GT(field(mixed, "buffers"), 64.0);  // 4 KiB-1 MiB each
  EXPECT_LE(field(mixed, "entries_per_gib"), 512.0) << mixed;
  EXPECT_NEAR(field(mixed, "entries_per_gib"), field(mixed, "entries") * 1024.0 * 1024 * 1024 / field(mixed, "live_bytes"),
              1e-6);

  for (const char* impl : {"dmakit", "rte_malloc", "dmakit-pool"}) {
    const std::string r = row(s, std::string("\"case\":\"small_alloc_free\",\"bytes\":4096,\"impl\":\"") + impl + "\"");
    ASSERT_FALSE(r.empty()) << impl << " missing: " << s;
    EXPECT_GT(field(r, "ns_per_pair"), 0.0) << r;
    EXPECT_EQ(field(r, "live"), 512.0) << r;
    EXPECT_EQ(field(r, "pairs"), 2000.0) << r;
  }
  const std::string d = row(s, "\"impl\":\"dmakit\"");
  EXPECT_GT(field(d, "vs_pool"), 0.0) << d;
  EXPECT_GT(field(d, "vs_rte_malloc"), 0.0) << d;
  EXPECT_EQ(s.find("null"), std::string::npos) << s;
  // The benchmark leaves the context as it found it.
  EXPECT_EQ((*ctx)->buffers().stats().buffers_live, 0u);
}

TEST(BufferBench, RefusesZeroCounts) {
  core::Config cfg;
  cfg.eal.mode = "nohuge";
  cfg.eal.memory_mb = 256;
  cfg.iommu.backend = "sim";
  auto ctx = core::Context::create(cfg);
  ASSERT_TRUE(ctx.has_value()) << ctx.error().what();
  BufferBenchOptions o;
  o.pairs = 0;
  auto j = run_buffer(**ctx, o);
  ASSERT_FALSE(j.has_value());
  EXPECT_EQ(j.error().code, Errc::invalid_argument);
}

}  // namespace
}  // namespace dmakit::bench
