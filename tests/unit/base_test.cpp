// Error model, JSON writer, sizes and log levels.
#include <gtest/gtest.h>

#include "base/config.hpp"
#include "base/log.hpp"
#include "base/error.hpp"

using namespace dmakit;

namespace {

Result<int> parse_positive(int v) {
  if (v <= 0) return fail(Errc::invalid_argument, "value {} is not positive", v);
  return v;
}

Result<int> doubled(int v) {
  int x = DMAKIT_TRY(parse_positive(v));
  return 2 * x;
}

}  // namespace

TEST(Error, CarriesCodeAndMessageNamingTheObject) {
  auto r = doubled(-3);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::invalid_argument);
  EXPECT_EQ(r.error().message, "value -3 is not positive");
  EXPECT_EQ(r.error().sys_errno, 0);
  EXPECT_EQ(r.error().what(), "value -3 is not positive");
  ASSERT_TRUE(doubled(4));
  EXPECT_EQ(*doubled(4), 8);
}

TEST(Error, ErrnoErrorsAddStrerror) {
  Status st = fail_errno(EBUSY, "open /dev/vfio/{}", 7);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::busy);
  EXPECT_EQ(st.error().what(), "open /dev/vfio/7: Device or resource busy (errno 16)");
  EXPECT_EQ(errc_from_errno(EEXIST), Errc::exists);
  EXPECT_EQ(errc_from_errno(ENOSPC), Errc::no_space);
  EXPECT_EQ(errc_from_errno(EINVAL), Errc::invalid_argument);
  EXPECT_EQ(errc_from_errno(ENOENT), Errc::not_found);
  EXPECT_EQ(errc_from_errno(EACCES), Errc::permission);
  EXPECT_EQ(errc_from_errno(EIO), Errc::io);
  EXPECT_EQ(errc_name(Errc::not_viable), "not_viable");
}

TEST(Error, ContextIsPrefixed) {
  Error e{Errc::no_memory, 0, "no 2 MiB chunk"};
  EXPECT_EQ(with_context(e, "buffer of 4194304 bytes").message, "buffer of 4194304 bytes: no 2 MiB chunk");
}

TEST(Sizes, ParseSuffixes) {
  EXPECT_EQ(*base::parse_size("4K"), 4096u);
  EXPECT_EQ(*base::parse_size("2M"), 2u << 20);
  EXPECT_EQ(*base::parse_size("1G"), 1u << 30);
  EXPECT_EQ(*base::parse_size("65536"), 65536u);
  auto bad = base::parse_size("12Q");
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("unknown size suffix 'Q'"), std::string::npos);
  EXPECT_FALSE(base::parse_size(""));
  EXPECT_FALSE(base::parse_size("M"));
  EXPECT_FALSE(base::parse_size("99999999999999G"));
}

TEST(Log, LevelsParseAndApply) {
  EXPECT_EQ(*base::parse_log_level("debug"), spdlog::level::debug);
  EXPECT_EQ(*base::parse_log_level("off"), spdlog::level::off);
  auto bad = base::parse_log_level("loud");
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("'loud'"), std::string::npos);
  ASSERT_TRUE(base::set_log_level("error"));
  EXPECT_EQ(base::log().level(), spdlog::level::err);
  EXPECT_FALSE(base::set_log_level("nonsense"));
  EXPECT_EQ(base::log().level(), spdlog::level::err) << "a bad level must not change the current one";
  ASSERT_TRUE(base::set_log_level("warn"));
}

TEST(Log, EnvironmentSetsTheLevel) {
  ::setenv("DMAKIT_LOG", "trace", 1);
  EXPECT_EQ(base::env_log_level(), spdlog::level::trace);
  ::setenv("DMAKIT_LOG", "bogus", 1);
  EXPECT_EQ(base::env_log_level(), std::nullopt);
  ::unsetenv("DMAKIT_LOG");
  EXPECT_EQ(base::env_log_level(), std::nullopt);
}
