// The config file: defaults match config/dmakit.toml, bad files are refused
// with the file, key and reason, flags override the file.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/config_cli.hpp"

using namespace dmakit;

namespace {

class TempFile {
 public:
  explicit TempFile(const std::string& text) {
    path_ = std::filesystem::temp_directory_path() /
            ("dmakit-config-" + std::to_string(::getpid()) + "-" + std::to_string(counter_++) + ".toml");
    std::ofstream(path_) << text;
  }
  ~TempFile() { std::filesystem::remove(path_); }
  std::string path() const { return path_.string(); }

 private:
  static inline int counter_ = 0;
  std::filesystem::path path_;
};

}  // namespace

TEST(Config, ShippedFileListsEverySettingWithItsDefault) {
  const std::string shipped = std::string(DMAKIT_SOURCE_DIR) + "/config/dmakit.toml";
  auto cfg = core::load_config_file(shipped);
  ASSERT_TRUE(cfg) << cfg.error().message;
  const core::Config defaults;
  for (const auto& s : core::settings()) {
    EXPECT_EQ(s.show(*cfg), s.show(defaults)) << "config/dmakit.toml and the compiled default differ for " << s.key;
  }
  // Every setting must appear in the file: a key missing from it would also
  // compare equal above, so check the text.
  std::ifstream in(shipped);
  std::string text((std::istreambuf_iterator<char>(in)), {});
  for (const auto& s : core::settings()) {
    auto dot = s.key.find('.');
    std::string section = "[" + s.key.substr(0, dot) + "]";
    std::string name = s.key.substr(dot + 1) + " =";
    auto at = text.find(section);
    ASSERT_NE(at, std::string::npos) << section;
    EXPECT_NE(text.find(name, at), std::string::npos) << s.key << " missing from config/dmakit.toml";
  }
}

TEST(Config, ValuesAreRead) {
  TempFile f("[arena]\nshards = 4\nstrict = true\n[log]\nlevel = \"debug\"\n[buffer]\norders = \"2M,4K\"\n");
  auto cfg = core::load_config_file(f.path());
  ASSERT_TRUE(cfg) << cfg.error().message;
  EXPECT_EQ(cfg->arena.shards, 4u);
  EXPECT_TRUE(cfg->arena.strict);
  EXPECT_EQ(cfg->log.level, "debug");
  EXPECT_EQ(cfg->buffer.orders, "2M,4K");
  EXPECT_EQ(cfg->arena.stale_max_pages, core::Config{}.arena.stale_max_pages);
}

TEST(Config, UnknownKeyNamesFileAndKey) {
  TempFile f("[arena]\nshardz = 4\n");
  auto cfg = core::load_config_file(f.path());
  ASSERT_FALSE(cfg);
  EXPECT_EQ(cfg.error().code, Errc::invalid_argument);
  EXPECT_EQ(cfg.error().message, f.path() + ": key 'arena.shardz': unknown setting");
}

TEST(Config, MalformedValuesNameFileKeyAndReason) {
  struct Case {
    std::string text, expect;
  } cases[] = {
      {"[arena]\nshards = four\n", "key 'arena.shards': 'four' is not a decimal number from 0 to 4294967295"},
      {"[arena]\nstrict = maybe\n", "key 'arena.strict': 'maybe' is not a boolean"},
      {"[arena]\nlarge_share = lots\n", "key 'arena.large_share': 'lots' is not a finite, non-negative"},
      {"[arena]\nlarge_share = inf\n", "key 'arena.large_share': 'inf' is not a finite, non-negative"},
      {"[arena]\nshards = -1\n", "key 'arena.shards': '-1' is not a decimal number"},
      {"[arena]\nstale_max_pages = -1\n", "key 'arena.stale_max_pages': '-1' is not a non-negative decimal"},
      {"[stress]\nmax_bytes = 0\n", "key 'stress.max_bytes': 0 is outside 4096..1T"},
      {"[stress]\nmix = \"40:55\"\n", "key 'stress.mix': '40:55' is not three weights buffers:blocks:maps"},
      {"[stress]\nmix = \"0:0:0\"\n", "key 'stress.mix': '0:0:0' gives every kind of operation weight 0"},
      {"[pool]\ncache_size = 4294967295\n", "key 'pool.cache_size': 4294967295 is above 65536 blocks"},
      {"[eal]\nextra_args = \"--help\"\n", "key 'eal.extra_args': '--help' is not passed to the EAL"},
      {"[eal]\nextra_args = \"--log-level\"\n", "key 'eal.extra_args': --log-level needs a value"},
      {"[arena]\nshards = 3\n", "key 'arena.shards': 3 is not 0 or a power of two up to 16"},
      {"[eal]\nmode = \"fast\"\n", "key 'eal.mode': 'fast' is not auto, huge or nohuge"},
      {"[buffer]\norders = \"2M,3K\"\n", "key 'buffer.orders': '3K' is not a power of two"},
      {"[log]\nlevel = \"loud\"\n", "key 'log.level': unknown level 'loud'"},
      {"[eal]\nmemory_mb = 2000000\n", "key 'eal.memory_mb': 2000000 is above 1048576"},
      {"[arena]\nlarge_threshold_pages = 1G\n", "key 'arena.large_threshold_pages': 1073741824 is above"},
      {"[arena]\nstale_max_pages = 8G\n", "key 'arena.stale_max_pages': 8589934592 is above"},
      {"[arena]\nstale_max_age_ms = 86400000\n", "key 'arena.stale_max_age_ms': 86400000 is above 3600000"},
      {"[buffer]\nbackoff_ms = 4000000\n", "key 'buffer.backoff_ms': 4000000 is above 3600000"},
      {"[buffer]\nrecycle_high_mb = 1G\n", "key 'buffer.recycle_high_mb': 1073741824 is above"},
      {"[stress]\nops = 1000000G\n", "key 'stress.ops': 1073741824000000 is above 2^48"},
  };
  for (const auto& c : cases) {
    TempFile f(c.text);
    auto cfg = core::load_config_file(f.path());
    ASSERT_FALSE(cfg) << c.text;
    EXPECT_EQ(cfg.error().message.rfind(f.path() + ": ", 0), 0u) << cfg.error().message;
    EXPECT_NE(cfg.error().message.find(c.expect), std::string::npos) << cfg.error().message;
  }
}

TEST(Config, MissingFileIsNamed) {
  auto cfg = core::load_config_file("/nonexistent/dmakit.toml");
  ASSERT_FALSE(cfg);
  EXPECT_EQ(cfg.error().code, Errc::not_found);
  EXPECT_NE(cfg.error().message.find("/nonexistent/dmakit.toml"), std::string::npos);
}

TEST(Config, FlagsOverrideTheFile) {
  TempFile f("[arena]\nshards = 4\n[stress]\nthreads = 3\n");
  core::Config cfg;
  CLI::App app{"t"};
  core::add_config_options(app, cfg, "");
  std::vector<std::string> args = {"8", "--arena.shards", f.path(), "--config"};  // reversed
  app.parse(args);
  EXPECT_EQ(cfg.arena.shards, 8u) << "the flag wins over the file";
  EXPECT_EQ(cfg.stress.threads, 3u) << "the file wins over the default";
}

// The same text means the same value in a file and on the command line:
// decimal only ("010" is ten, not eight), sizes with K/M/G on 64-bit keys.
TEST(Config, FlagsAndFileReadNumbersAlike) {
  TempFile f("[stress]\nthreads = 010\nmax_bytes = \"16M\"\n[arena]\nstale_max_pages = 8K\n");
  auto from_file = core::load_config_file(f.path());
  ASSERT_TRUE(from_file) << from_file.error().what();
  EXPECT_EQ(from_file->stress.threads, 10u);
  EXPECT_EQ(from_file->stress.max_bytes, 16u << 20);
  EXPECT_EQ(from_file->arena.stale_max_pages, 8192u);

  core::Config cfg;
  CLI::App app{"t"};
  core::add_config_options(app, cfg, "");
  std::vector<std::string> args = {"16M", "--stress.max_bytes", "010", "--stress.threads"};  // reversed
  ASSERT_NO_THROW(app.parse(args));
  EXPECT_EQ(cfg.stress.threads, 10u);
  EXPECT_EQ(cfg.stress.max_bytes, 16u << 20);

  for (std::vector<std::string> bad : {std::vector<std::string>{"-1", "--stress.max_bytes"},
                                       {"inf", "--stress.seconds"}, {"0x10", "--stress.threads"},
                                       {"1e3", "--stress.seconds"}, {"4294967296", "--stress.threads"}}) {
    core::Config c2;
    CLI::App app2{"t"};
    core::add_config_options(app2, c2, "");
    EXPECT_THROW(app2.parse(bad), CLI::ValidationError) << bad[1] << " " << bad[0];
  }
}
