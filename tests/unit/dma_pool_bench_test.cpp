// The dmapool benchmark, run small: it must produce one result per shape,
// thread count and implementation with the documented fields, and refuse
// nonsense options. No timing is asserted.
#include <gtest/gtest.h>

#include <string>

#include "bench_dmapool.hpp"

namespace dmakit::bench {
namespace {

size_t count(const std::string& hay, const std::string& needle) {
  size_t n = 0;
  for (size_t at = hay.find(needle); at != std::string::npos; at = hay.find(needle, at + 1)) ++n;
  return n;
}

TEST(DmapoolBench, ProducesEveryCaseWithItsFields) {
  core::Config cfg;
  cfg.eal.mode = "nohuge";
  cfg.eal.memory_mb = 256;
  DmapoolBenchOptions o;
  o.rounds = 3;
  o.repeats = 1;
  o.max_blocks = 1024;
  auto j = run_dmapool(cfg, o, [] { return pool::make_host_backing(); });
  ASSERT_TRUE(j.has_value()) << j.error().what();
  const std::string s = j->str();
  EXPECT_EQ(s.rfind("{\"bench\":\"dmapool\",\"results\":[", 0), 0u) << s;
  // Per shape: dmakit on 1 and 2 threads, dmakit with a pool per thread,
  // rte_mempool get/put, with IOVAs, and with an explicit cache on 1 and 2
  // threads; every 2-thread case with its ratio, one-thread dmakit with its
  // ratios to both rte_mempool baselines.
  EXPECT_EQ(count(s, "\"impl\":\"dmakit\""), 12u) << s;
  EXPECT_EQ(count(s, "\"impl\":\"dmakit-own-pools\",\"cache\":256"), 6u) << s;
  EXPECT_EQ(count(s, "\"impl\":\"rte_mempool\",\"cache\":256"), 6u) << s;
  EXPECT_EQ(count(s, "\"impl\":\"rte_mempool+explicit_cache\",\"cache\":256"), 12u) << s;
  EXPECT_EQ(count(s, "\"impl\":\"rte_mempool+iova\",\"cache\":256"), 6u) << s;
  EXPECT_EQ(count(s, "\"threads\":2"), 18u) << s;
  EXPECT_EQ(count(s, "\"throughput_vs_one_thread\":"), 18u) << s;
  EXPECT_EQ(count(s, "\"vs_rte_mempool\":"), 6u) << s;
  EXPECT_EQ(count(s, "\"vs_rte_mempool_explicit_cache\":"), 6u) << s;
  EXPECT_EQ(count(s, "\"size\":68,\"align\":32,\"boundary\":4096,\"blocks\":1024"), 7u) << s;
  EXPECT_EQ(count(s, "\"ns_per_pair\":"), 42u) << s;
  EXPECT_EQ(count(s, "\"total_us\":"), 42u) << s;
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
