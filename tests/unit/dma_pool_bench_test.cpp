// The dmapool benchmark, run small: it must produce one result per shape,
// thread count and implementation with the documented fields, and refuse
// nonsense options. No timing is asserted.
#include <gtest/gtest.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "host_backing.hpp"
#include "bench_dmapool.hpp"
#include "core/context.hpp"

namespace dmakit::bench {
namespace {

size_t count(const std::string& hay, const std::string& needle) {
  size_t n = 0;
  for (size_t at = hay.find(needle); at != std::string::npos; at = hay.find(needle, at + 1)) ++n;
  return n;
}

// The row of one shape and implementation on one thread (rows are flat
// objects, their fields in the documented order); "" if there is none.
std::string row(const std::string& json, const std::string& shape, const std::string& impl) {
  const std::string key = shape + ",\"threads\":1,\"impl\":\"" + impl + "\"";
  const size_t at = json.find(key);
  if (at == std::string::npos) return "";
  const size_t begin = json.rfind('{', at), end = json.find('}', at);
  return json.substr(begin, end - begin + 1);
}

// A numeric field of a row; NaN when it is missing or not a number.
double field(const std::string& row, const std::string& name) {
  const std::string key = "\"" + name + "\":";
  const size_t at = row.find(key);
  if (at == std::string::npos) return std::numeric_limits<double>::quiet_NaN();
  const char* begin = row.c_str() + at + key.size();
  char* end = nullptr;
  const double v = std::strtod(begin, &end);
  return end == begin ? std::numeric_limits<double>::quiet_NaN() : v;
}

TEST(DmapoolBench, ProducesEveryCaseWithItsFields) {
  core::Config cfg;
  cfg.eal.mode = "nohuge";
  cfg.eal.memory_mb = 256;
  cfg.iommu.backend = "sim";
  // On a context, as `dmakit bench dmapool` runs it: the C++ pools over its
  // buffer allocator, the C API's pools in the same context.
  auto ctx = core::Context::create(cfg);
  ASSERT_TRUE(ctx.has_value()) << ctx.error().what();
  DmapoolBenchOptions o;
  o.rounds = 3;
  o.repeats = 1;
  o.max_blocks = 1024;
  auto j = run_dmapool(**ctx, o);
  ASSERT_TRUE(j.has_value()) << j.error().what();
  const std::string s = j->dump();
  EXPECT_EQ(s.rfind("{\"bench\":\"dmapool\",\"results\":[", 0), 0u) << s;
  // Per shape: dmakit on 1 and 2 threads, the same one-thread loop through
  // the C API, dmakit with a pool per thread, rte_mempool get/put, with
  // IOVAs, and with an explicit cache on 1 and 2 threads; every 2-thread case
  // with its ratio, one-thread dmakit with its ratios to both rte_mempool
  // baselines, the C API's row with its ratio to dmakit's.
  EXPECT_EQ(count(s, "\"impl\":\"dmakit\""), 12u) << s;
  EXPECT_EQ(count(s, "\"impl\":\"dmakit-c\",\"cache\":256"), 6u) << s;
  EXPECT_EQ(count(s, "\"vs_dmakit\":"), 6u) << s;
  for (const char* shape : {"\"size\":16,\"align\":16,\"boundary\":0", "\"size\":64,\"align\":64,\"boundary\":0",
                            "\"size\":256,\"align\":256,\"boundary\":0", "\"size\":1024,\"align\":1024,\"boundary\":0",
                            "\"size\":4096,\"align\":4096,\"boundary\":0", "\"size\":68,\"align\":32,\"boundary\":4096"}) {
    const std::string c = row(s, std::string(shape) + ",\"blocks\":1024", "dmakit-c");
    ASSERT_FALSE(c.empty()) << shape << " has no dmakit-c row: " << s;
    EXPECT_GT(field(c, "ns_per_pair"), 0.0) << c;
    EXPECT_GT(field(c, "vs_dmakit"), 0.0) << c;  // a ratio of two times: present, no bound on it
    EXPECT_EQ(field(c, "rounds"), 3.0) << c;
  }
  EXPECT_EQ(count(s, "\"impl\":\"dmakit-own-pools\",\"cache\":256"), 6u) << s;
  EXPECT_EQ(count(s, "\"impl\":\"rte_mempool\",\"cache\":256"), 6u) << s;
  EXPECT_EQ(count(s, "\"impl\":\"rte_mempool+explicit_cache\",\"cache\":256"), 12u) << s;
  EXPECT_EQ(count(s, "\"impl\":\"rte_mempool+iova\",\"cache\":256"), 6u) << s;
  EXPECT_EQ(count(s, "\"threads\":2"), 18u) << s;
  EXPECT_EQ(count(s, "\"throughput_vs_one_thread\":"), 18u) << s;
  EXPECT_EQ(count(s, "\"vs_rte_mempool\":"), 6u) << s;
  EXPECT_EQ(count(s, "\"vs_rte_mempool_explicit_cache\":"), 6u) << s;
  EXPECT_EQ(count(s, "\"size\":68,\"align\":32,\"boundary\":4096,\"blocks\":1024"), 8u) << s;
  EXPECT_EQ(count(s, "\"ns_per_pair\":"), 48u) << s;
  EXPECT_EQ(count(s, "\"total_us\":"), 48u) << s;
  EXPECT_EQ(count(s, "null"), 0u) << s;
}

TEST(DmapoolBench, RefusesZeroRounds) {
  DmapoolBenchOptions o;
  o.rounds = 0;
  o.mempool = false;
  auto j = run_dmapool(core::Config{}, o, [] { return pool::make_host_backing(); });
  ASSERT_FALSE(j.has_value());
  EXPECT_EQ(j.error().code, Errc::invalid_argument);
}

TEST(DmapoolBench, FailsWhenThePoolCannotGrow) {
  DmapoolBenchOptions o;
  o.rounds = 1;
  o.repeats = 1;
  o.mempool = false;
  auto j = run_dmapool(core::Config{}, o, [] {
    pool::HostBackingOptions ho;
    ho.max_regions = 1;  // far too little for 8192 blocks of 16 bytes
    return pool::make_host_backing(ho);
  });
  ASSERT_FALSE(j.has_value());
  EXPECT_NE(j.error().message.find("cannot grow"), std::string::npos) << j.error().message;
}

}  // namespace
}  // namespace dmakit::bench
