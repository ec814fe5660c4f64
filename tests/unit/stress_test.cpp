// The stress workload of the dmakit command (tools/stress.*): a short run
// on the simulated IOMMU, and the soak rule on made-up samples.
#include <gtest/gtest.h>

#include "core/context.hpp"
#include "sim_config.hpp"
#include "stress.hpp"

using namespace dmakit;

namespace {

using testing_support::sim_config;

// n samples 100 ms apart; f(i) gives sample i's values.
template <class F>
std::vector<tool::SoakSample> samples(size_t n, F f) {
  std::vector<tool::SoakSample> v;
  for (size_t i = 0; i < n; ++i) {
    tool::SoakSample s = f(i);
    s.seconds = 0.1 * static_cast<double>(i);
    v.push_back(s);
  }
  return v;
}

// A healthy working set: a bounded wobble around a steady level. The leaks
// below grow one series steadily: 4 MiB of RSS, 4 mappings or one fd per
// sample.
tool::SoakSample steady(size_t i) {
  const uint64_t wobble = (i * 7919) % 13;
  return {0, (200ull << 20) + wobble * (256 << 10), 40 + wobble, 12 + wobble % 3};
}

}  // namespace

TEST(Stress, ShortRunFindsNoFailuresAndLeavesNoMappings) {
  auto ctx = core::Context::create(sim_config());
  ASSERT_TRUE(ctx) << ctx.error().what();
  core::StressSettings s;
  s.seconds = 0.5;
  s.threads = 2;
  s.max_bytes = 1 << 20;
  auto r = tool::run_stress(**ctx, s);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_EQ(r->failures, 0u) << r->first_failure;
  for (size_t k = 0; k < tool::kStressKinds; ++k) EXPECT_GT(r->kinds[k].ops, 0u) << tool::kStressKindNames[k];
  EXPECT_GT(r->device_checks, 0u);
  EXPECT_GT(r->misuse_checks, 0u);
  EXPECT_EQ(r->validation_failures, 0u);
  EXPECT_GT(r->peak_live_bytes, 0u);
  EXPECT_EQ(r->mappings_at_end, r->mappings_at_start);
}

TEST(Soak, FlatSamplesPass) {
  auto v = tool::check_soak(samples(40, steady));
  EXPECT_TRUE(v.flat) << v.why;
  EXPECT_EQ(v.warmup, 10u);
  // Warm-up may climb: the caches fill before the steady state.
  auto warm = samples(40, [](size_t i) {
    auto s = steady(i);
    if (i < 10) s.rss_bytes = (50ull << 20) * (i + 1);
    return s;
  });
  EXPECT_TRUE(tool::check_soak(warm).flat);
}

TEST(Soak, EachLeakFailsAndIsNamed) {
  struct Case {
    const char* name;
    tool::SoakSample (*f)(size_t);
  } cases[] = {
      {"RSS", [](size_t i) { auto s = steady(i); s.rss_bytes += i * (4ull << 20); return s; }},
      {"mappings", [](size_t i) { auto s = steady(i); s.mappings += i * 4; return s; }},
      {"open fds", [](size_t i) { auto s = steady(i); s.fds += i; return s; }},
  };
  for (const auto& c : cases) {
    auto v = tool::check_soak(samples(40, c.f));
    EXPECT_FALSE(v.flat) << c.name;
    EXPECT_NE(v.why.find(c.name), std::string::npos) << c.name << ": " << v.why;
    EXPECT_EQ(v.why.find(";"), std::string::npos) << "only " << c.name << " grew: " << v.why;
  }
}

TEST(Soak, TooFewSamplesGiveNoVerdict) {
  auto v = tool::check_soak(samples(10, steady));  // 2 of warm-up, 8 after: enough
  EXPECT_TRUE(v.flat) << v.why;
  v = tool::check_soak(samples(9, steady));  // 2 of warm-up, 7 after
  EXPECT_FALSE(v.flat);
  EXPECT_NE(v.why.find("too few samples"), std::string::npos) << v.why;
  EXPECT_FALSE(tool::check_soak({}).flat);
}
