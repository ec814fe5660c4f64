// The C API (include/dmakit/dmakit.h) as a C driver uses it, on the
// simulated IOMMU with real EAL memory: every entry point fed bad input
// returns its error code and a message naming the problem, and a normal call
// works afterwards; handles that are stale (freed, destroyed, of a destroyed
// context) or garbage are refused, never followed.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include "dmakit/dmakit.h"
#include "core/c_handles.hpp"
#include "core/context.hpp"
#include "iommu/sim_domain.hpp"

namespace {

std::string last() { return dmakit_last_error(); }

// The simulated IOMMU on 4 KiB pages: runs anywhere.
dmakit_settings sim_settings() {
  dmakit_settings s;
  dmakit_settings_init(&s);
  s.backend = "sim";
  s.eal_mode = "nohuge";
  return s;
}

// "message contains every one of these".
::testing::AssertionResult says(std::initializer_list<const char*> parts) {
  const std::string m = last();
  for (const char* p : parts)
    if (m.find(p) == std::string::npos) return ::testing::AssertionFailure() << "'" << p << "' not in: " << m;
  return ::testing::AssertionSuccess();
}

class CApi : public ::testing::Test {
 protected:
  void SetUp() override {
    dmakit_settings s = sim_settings();
    s.eal_memory_mb = 256;
    ASSERT_EQ(dmakit_ctx_create_with(&s, &ctx_), DMAKIT_OK) << last();
  }
  void TearDown() override {
    if (ctx_ != nullptr) {
      EXPECT_EQ(dmakit_ctx_destroy(ctx_), DMAKIT_OK) << last();
    }
  }

  // A normal call still works: proves a refusal left nothing broken.
  void still_works() {
    dmakit_buffer* b = nullptr;
    ASSERT_EQ(dmakit_buffer_alloc(ctx_, 4096, 0, 0, UINT64_MAX, &b), DMAKIT_OK) << last();
    ASSERT_EQ(dmakit_buffer_free(b), DMAKIT_OK) << last();
  }

  dmakit_ctx* ctx_ = nullptr;
};

dmakit_pool* const kGarbagePool = reinterpret_cast<dmakit_pool*>(uintptr_t{0xdeadbeef12345});
dmakit_buffer* const kGarbageBuffer = reinterpret_cast<dmakit_buffer*>(uintptr_t{0x7fff00000003});
dmakit_ctx* const kGarbageCtx = reinterpret_cast<dmakit_ctx*>(uintptr_t{0x1234});

}  // namespace

TEST(CApiBasics, InitializersTakeNullAndFillDefaults) {
  dmakit_settings_init(nullptr);  // nothing to fill: returns
  dmakit_pool_params_init(nullptr, "x", 64);
  dmakit_settings s;
  std::memset(&s, 0xff, sizeof s);
  dmakit_settings_init(&s);
  EXPECT_EQ(s.struct_size, sizeof s);
  EXPECT_EQ(s.backend, nullptr);
  EXPECT_EQ(s.eal_memory_mb, 512u);
  EXPECT_EQ(s.pool_cache_size, 256u);
  EXPECT_EQ(s.buffer_prezero, 1);
  EXPECT_EQ(s.buffer_slab_max, 1u << 20);
  EXPECT_EQ(s.buffer_isolation, 0);
  dmakit_pool_params p;
  dmakit_pool_params_init(&p, "x", 64);
  EXPECT_EQ(p.struct_size, sizeof p);
  EXPECT_EQ(p.dma_limit, UINT64_MAX);
  EXPECT_EQ(p.cache_size, UINT32_MAX);
}

// Small buffers share slab mappings by default; buffer_isolation gives each
// its own; a settings struct of the older size (before these fields) still
// creates a context, with their defaults. The stats struct likewise.
TEST(CApiBasics, SlabAndIsolationSettings) {
  auto small_buffers = [](const dmakit_settings& s, uint64_t& mappings, uint64_t& slabs) -> bool {
    dmakit_ctx* ctx = nullptr;
    if (dmakit_ctx_create_with(&s, &ctx) != DMAKIT_OK) return false;
    dmakit_ctx_stats before{};
    before.struct_size = sizeof before;
    EXPECT_EQ(dmakit_ctx_get_stats(ctx, &before), DMAKIT_OK) << last();
    std::vector<dmakit_buffer*> held(8, nullptr);
    for (auto& b : held) EXPECT_EQ(dmakit_buffer_alloc(ctx, 4096, 0, 0, UINT64_MAX, &b), DMAKIT_OK) << last();
    dmakit_ctx_stats st{};
    st.struct_size = sizeof st;
    EXPECT_EQ(dmakit_ctx_get_stats(ctx, &st), DMAKIT_OK) << last();
    mappings = st.mappings - before.mappings;
    slabs = st.buffer_slabs;
    if (slabs != 0) {
      EXPECT_EQ(st.buffer_slab_bytes_in_use, 8u * 4096);
      EXPECT_GE(st.buffer_slab_bytes, st.buffer_slab_bytes_in_use);
    }
    // An older caller's stats struct (up to `pools`) is filled as far as it goes.
    struct {
      dmakit_ctx_stats st;
    } old{};
    old.st.struct_size = offsetof(dmakit_ctx_stats, pools) + sizeof(uint64_t);
    old.st.buffer_slabs = 77;
    EXPECT_EQ(dmakit_ctx_get_stats(ctx, &old.st), DMAKIT_OK) << last();
    EXPECT_EQ(old.st.buffers_live, 8u);
    EXPECT_EQ(old.st.buffer_slabs, 77u) << "written past the caller's struct_size";
    for (auto* b : held) EXPECT_EQ(dmakit_buffer_free(b), DMAKIT_OK);
    return dmakit_ctx_destroy(ctx) == DMAKIT_OK;
  };
  uint64_t mappings = 0, slabs = 0;
  dmakit_settings s = sim_settings();
  ASSERT_TRUE(small_buffers(s, mappings, slabs)) << last();
  EXPECT_EQ(slabs, 1u);
  EXPECT_EQ(mappings, 1u) << "eight 4 KiB buffers share one slab mapping";
  s.buffer_isolation = 1;
  ASSERT_TRUE(small_buffers(s, mappings, slabs)) << last();
  EXPECT_EQ(slabs, 0u);
  EXPECT_EQ(mappings, 8u) << "isolation: a mapping per buffer";
  s.buffer_isolation = 0;
  s.buffer_slab_max = 0;
  ASSERT_TRUE(small_buffers(s, mappings, slabs)) << last();
  EXPECT_EQ(mappings, 8u) << "no slabs: a mapping per buffer";
  s = sim_settings();
  s.buffer_isolation = 1;  // past the older struct_size: not read
  s.struct_size = offsetof(dmakit_settings, sim_page_sizes) + sizeof(const char*);
  ASSERT_TRUE(small_buffers(s, mappings, slabs)) << last();
  EXPECT_EQ(slabs, 1u) << "an older struct gets the defaults of the newer fields";
  s = sim_settings();
  s.buffer_slab_max = 3000;
  dmakit_ctx* ctx = nullptr;
  EXPECT_EQ(dmakit_ctx_create_with(&s, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"buffer.slab_max", "3000"}));
}

TEST(CApiBasics, VersionAndErrorNames) {
  EXPECT_STREQ(dmakit_version(), DMAKIT_VERSION_STRING);
  EXPECT_STREQ(dmakit_errc_name(DMAKIT_ECORRUPTED), "ECORRUPTED");
  EXPECT_STREQ(dmakit_errc_name(DMAKIT_OK), "OK");
  EXPECT_STREQ(dmakit_errc_name(-99), "unknown");
  EXPECT_STREQ(dmakit_errc_name(3), "unknown");
}

TEST(CApiBasics, ContextCreateRefusesBadArguments) {
  dmakit_ctx* ctx = kGarbageCtx;
  // 4 KiB pages: other tests reserve and return hugepages meanwhile.
  const char* args[] = {"--iommu.backend", "sim", "--eal.mode", "nohuge"};
  EXPECT_EQ(dmakit_ctx_create(nullptr, 2, args, nullptr), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"dmakit_ctx_create", "out is NULL"}));
  EXPECT_EQ(dmakit_ctx_create(nullptr, 2, nullptr, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"argc is 2 but argv is NULL"}));
  EXPECT_EQ(ctx, nullptr) << "out is cleared on failure";
  EXPECT_EQ(dmakit_ctx_create(nullptr, -1, args, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"argc is -1"}));
  const char* holes[] = {"--iommu.backend", nullptr};
  EXPECT_EQ(dmakit_ctx_create(nullptr, 2, holes, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"argv[1] is NULL"}));
  const char* help[] = {"--help"};
  EXPECT_EQ(dmakit_ctx_create(nullptr, 1, help, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"--help"}));
  const char* bad[] = {"--arena.shards", "7"};
  EXPECT_EQ(dmakit_ctx_create(nullptr, 2, bad, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"arena.shards"}));
  EXPECT_EQ(dmakit_ctx_create("/nonexistent/dmakit.toml", 0, nullptr, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"/nonexistent/dmakit.toml"}));
  const char* prefix[] = {"--iommu.backend", "sim", "--eal.file_prefix", "../x"};
  EXPECT_EQ(dmakit_ctx_create(nullptr, 4, prefix, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"eal.file_prefix", "../x"}));

  dmakit_settings s = sim_settings();
  EXPECT_EQ(dmakit_ctx_create_with(nullptr, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"settings is NULL"}));
  EXPECT_EQ(dmakit_ctx_create_with(&s, nullptr), DMAKIT_EINVAL);
  s.struct_size = 8;
  EXPECT_EQ(dmakit_ctx_create_with(&s, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"struct_size is 8", "dmakit_settings_init"}));
  dmakit_settings_init(&s);
  s.backend = "warp";
  EXPECT_EQ(dmakit_ctx_create_with(&s, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"iommu.backend", "warp"}));
  dmakit_settings_init(&s);
  s.backend = "sim";
  s.log_level = "loud";
  EXPECT_EQ(dmakit_ctx_create_with(&s, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"log_level", "loud"}));

  // And after all that, a good one.
  ASSERT_EQ(dmakit_ctx_create(nullptr, 4, args, &ctx), DMAKIT_OK) << last();
  EXPECT_STREQ(dmakit_ctx_backend(ctx), "sim");
  EXPECT_EQ(dmakit_ctx_destroy(ctx), DMAKIT_OK);
  EXPECT_EQ(dmakit_ctx_destroy(ctx), DMAKIT_EINVAL) << "destroyed twice";
  EXPECT_TRUE(says({"dmakit_ctx_destroy", "not a live context"}));
  EXPECT_EQ(dmakit_ctx_backend(ctx), nullptr);
  EXPECT_EQ(dmakit_ctx_destroy(kGarbageCtx), DMAKIT_EINVAL);
  EXPECT_EQ(dmakit_ctx_destroy(nullptr), DMAKIT_EINVAL);
}

TEST(CApiBasics, LogCallbackReceivesLinesAndLevelIsChecked) {
  struct Seen {
    std::vector<std::string> lines;
    std::vector<int> levels;
  } seen;
  ASSERT_EQ(dmakit_set_log_callback(
                [](void* user, int level, const char* msg) {
                  static_cast<Seen*>(user)->lines.emplace_back(msg);
                  static_cast<Seen*>(user)->levels.push_back(level);
                },
                &seen),
            DMAKIT_OK)
      << last();
  ASSERT_EQ(dmakit_set_log_level(DMAKIT_LOG_INFO), DMAKIT_OK);
  dmakit_settings s = sim_settings();
  dmakit_ctx* ctx = nullptr;
  ASSERT_EQ(dmakit_ctx_create_with(&s, &ctx), DMAKIT_OK) << last();
  ASSERT_EQ(dmakit_ctx_destroy(ctx), DMAKIT_OK);
  EXPECT_EQ(dmakit_set_log_callback(nullptr, nullptr), DMAKIT_OK);
  EXPECT_EQ(dmakit_set_log_level(DMAKIT_LOG_WARN), DMAKIT_OK);
  bool context_line = false;
  for (size_t i = 0; i < seen.lines.size(); ++i)
    if (seen.lines[i].find("context: backend sim") != std::string::npos) {
      context_line = true;
      EXPECT_EQ(seen.levels[i], DMAKIT_LOG_INFO);
      EXPECT_EQ(seen.lines[i].find('\n'), std::string::npos);
    }
  EXPECT_TRUE(context_line) << seen.lines.size() << " lines, none about the context";
  EXPECT_EQ(dmakit_set_log_level(7), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"dmakit_set_log_level", "7"}));
  EXPECT_EQ(dmakit_set_log_level(-1), DMAKIT_EINVAL);
}

TEST_F(CApi, BuffersWithAlignmentLimitProtectionAndSegments) {
  dmakit_buffer* b = nullptr;
  ASSERT_EQ(dmakit_buffer_alloc(ctx_, 100000, 1 << 20, DMAKIT_BUF_ZEROED, 0xffffffff, &b), DMAKIT_OK) << last();
  EXPECT_EQ(dmakit_buffer_iova(b) % (1 << 20), 0u);
  EXPECT_LE(dmakit_buffer_iova(b) + dmakit_buffer_size(b) - 1, 0xffffffffu);
  EXPECT_EQ(dmakit_buffer_size(b), 100000u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(dmakit_buffer_vaddr(b)) % 4096, 0u);
  auto* last_byte = static_cast<unsigned char*>(dmakit_buffer_at(b, 99999));
  ASSERT_NE(last_byte, nullptr);
  EXPECT_EQ(*last_byte, 0);
  EXPECT_EQ(dmakit_buffer_at(b, 100000), nullptr);
  EXPECT_TRUE(says({"offset 100000", "100000 bytes"}));

  size_t n = 0;
  EXPECT_EQ(dmakit_buffer_segments(b, nullptr, 0, &n), DMAKIT_ENOSPC) << "a buffer has at least one segment";
  EXPECT_TRUE(says({"room for 0"}));
  ASSERT_GE(n, 1u);
  std::vector<dmakit_segment> segs(n);
  ASSERT_EQ(dmakit_buffer_segments(b, segs.data(), segs.size(), &n), DMAKIT_OK) << last();
  uint64_t total = 0, next_iova = dmakit_buffer_iova(b);
  for (const auto& s : segs) {
    EXPECT_EQ(s.iova, next_iova);
    // Every segment translates back, byte for byte.
    uint64_t iova = 0, len = 0;
    ASSERT_EQ(dmakit_vtophys(ctx_, static_cast<char*>(s.vaddr) + s.len - 1, &iova, &len), DMAKIT_OK) << last();
    EXPECT_EQ(iova, s.iova + s.len - 1);
    EXPECT_GE(len, 1u);
    next_iova += s.len;
    total += s.len;
  }
  EXPECT_EQ(total, 100000u);

  // Read-only for the device.
  dmakit_buffer* ro = nullptr;
  ASSERT_EQ(dmakit_buffer_alloc(ctx_, 8192, 0, DMAKIT_BUF_DEVICE_READ, UINT64_MAX, &ro), DMAKIT_OK) << last();
  dmakit_ctx_stats st{};
  st.struct_size = sizeof st;
  ASSERT_EQ(dmakit_ctx_get_stats(ctx_, &st), DMAKIT_OK) << last();
  EXPECT_EQ(st.buffers_live, 2u);
  EXPECT_GE(st.mappings, 2u);
  EXPECT_EQ(dmakit_buffer_free(ro), DMAKIT_OK);
  EXPECT_EQ(dmakit_buffer_free(b), DMAKIT_OK);
  EXPECT_EQ(dmakit_buffer_free(b), DMAKIT_EINVAL) << "freed twice";
  EXPECT_TRUE(says({"dmakit_buffer_free", "not a live buffer"}));
  still_works();
}

TEST_F(CApi, BufferCallsRefuseBadInput) {
  dmakit_buffer* b = nullptr;
  EXPECT_EQ(dmakit_buffer_alloc(nullptr, 4096, 0, 0, UINT64_MAX, &b), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"dmakit_buffer_alloc", "ctx is not a live context"}));
  EXPECT_EQ(dmakit_buffer_alloc(ctx_, 4096, 0, 0, UINT64_MAX, nullptr), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"out is NULL"}));
  EXPECT_EQ(dmakit_buffer_alloc(ctx_, 4096, 0, 0x80, UINT64_MAX, &b), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"unknown flag bits 0x80"}));
  EXPECT_EQ(dmakit_buffer_alloc(ctx_, 0, 0, 0, UINT64_MAX, &b), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"0 bytes"}));
  EXPECT_EQ(dmakit_buffer_alloc(ctx_, 4096, 3000, 0, UINT64_MAX, &b), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"alignment 3000"}));
  EXPECT_EQ(dmakit_buffer_alloc(ctx_, 8192, 0, 0, 4095, &b), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"0xfff"}));
  EXPECT_EQ(b, nullptr);

  for (dmakit_buffer* bad : {static_cast<dmakit_buffer*>(nullptr), kGarbageBuffer}) {
    EXPECT_EQ(dmakit_buffer_iova(bad), 0u);
    EXPECT_TRUE(says({"dmakit_buffer_iova", "not a live buffer"}));
    EXPECT_EQ(dmakit_buffer_size(bad), 0u);
    EXPECT_EQ(dmakit_buffer_vaddr(bad), nullptr);
    EXPECT_EQ(dmakit_buffer_at(bad, 0), nullptr);
    size_t n = 0;
    EXPECT_EQ(dmakit_buffer_segments(bad, nullptr, 0, &n), DMAKIT_EINVAL);
    EXPECT_EQ(dmakit_buffer_free(bad), DMAKIT_EINVAL);
  }
  ASSERT_EQ(dmakit_buffer_alloc(ctx_, 4096, 0, 0, UINT64_MAX, &b), DMAKIT_OK);
  EXPECT_EQ(dmakit_buffer_segments(b, nullptr, 0, nullptr), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"count is NULL"}));
  size_t n = 0;
  EXPECT_EQ(dmakit_buffer_segments(b, nullptr, 1, &n), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"segs is NULL"}));
  EXPECT_EQ(dmakit_buffer_segments(b, nullptr, 0, &n), DMAKIT_ENOSPC);
  EXPECT_EQ(n, 1u);
  EXPECT_EQ(dmakit_buffer_free(b), DMAKIT_OK);
  // A freed handle is stale for every call, even once its slot is reused.
  dmakit_buffer* reuse = nullptr;
  ASSERT_EQ(dmakit_buffer_alloc(ctx_, 4096, 0, 0, UINT64_MAX, &reuse), DMAKIT_OK);
  EXPECT_NE(reuse, b);
  EXPECT_EQ(dmakit_buffer_iova(b), 0u);
  EXPECT_EQ(dmakit_buffer_free(b), DMAKIT_EINVAL);
  EXPECT_NE(dmakit_buffer_iova(reuse), 0u) << "the stale free must not have touched the new buffer";
  EXPECT_EQ(dmakit_buffer_free(reuse), DMAKIT_OK);
  still_works();
}

TEST_F(CApi, CallerMemoryIsMappedLookedUpAndUnmappedAtOnce) {
  const size_t len = 3 * 4096;
  void* mem = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  char* unaligned = static_cast<char*>(mem) + 100;
  uint64_t iova = 0;
  ASSERT_EQ(dmakit_mem_map(ctx_, unaligned, 5000, 0, UINT64_MAX, &iova), DMAKIT_OK) << last();
  EXPECT_EQ(iova % 4096, 100u);
  uint64_t got = 0, run = 0;
  ASSERT_EQ(dmakit_vtophys(ctx_, unaligned + 4000, &got, &run), DMAKIT_OK) << last();
  EXPECT_EQ(got, iova + 4000);
  EXPECT_EQ(run, 2 * 4096 - 100 - 4000) << "to the end of the mapped pages";
  dmakit_ctx_stats st{};
  st.struct_size = sizeof st;
  ASSERT_EQ(dmakit_ctx_get_stats(ctx_, &st), DMAKIT_OK);
  EXPECT_EQ(st.caller_maps, 1u);
  EXPECT_EQ(st.caller_map_bytes, 2 * 4096u);

  EXPECT_EQ(dmakit_mem_map(ctx_, static_cast<char*>(mem) + 4096, 10, 0, UINT64_MAX, &got), DMAKIT_EEXIST);
  EXPECT_TRUE(says({"shares a page"}));
  EXPECT_EQ(dmakit_mem_map(ctx_, nullptr, 10, 0, UINT64_MAX, &got), DMAKIT_EINVAL);
  EXPECT_EQ(dmakit_mem_map(ctx_, mem, 0, 0, UINT64_MAX, &got), DMAKIT_EINVAL);
  EXPECT_EQ(dmakit_mem_map(ctx_, mem, 10, DMAKIT_BUF_ZEROED, UINT64_MAX, &got), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"flag bits 0x1"}));
  EXPECT_EQ(dmakit_mem_map(ctx_, mem, 10, 0, UINT64_MAX, nullptr), DMAKIT_EINVAL);
  EXPECT_EQ(dmakit_mem_map(nullptr, mem, 10, 0, UINT64_MAX, &got), DMAKIT_EINVAL);
  dmakit_buffer* b = nullptr;
  ASSERT_EQ(dmakit_buffer_alloc(ctx_, 4096, 0, 0, UINT64_MAX, &b), DMAKIT_OK);
  EXPECT_EQ(dmakit_mem_map(ctx_, dmakit_buffer_vaddr(b), 4096, 0, UINT64_MAX, &got), DMAKIT_EEXIST);
  EXPECT_TRUE(says({"memory dmakit already maps"}));
  EXPECT_EQ(dmakit_buffer_free(b), DMAKIT_OK);

  EXPECT_EQ(dmakit_mem_unmap(ctx_, mem), DMAKIT_ENOTFOUND) << "not the address that was mapped";
  EXPECT_TRUE(says({"not an address given to map_memory"}));
  ASSERT_EQ(dmakit_ctx_get_stats(ctx_, &st), DMAKIT_OK);
  const uint64_t maps_before = st.mappings;
  ASSERT_EQ(dmakit_mem_unmap(ctx_, unaligned), DMAKIT_OK) << last();
  ASSERT_EQ(dmakit_ctx_get_stats(ctx_, &st), DMAKIT_OK);
  EXPECT_EQ(st.mappings, maps_before - 1) << "unmapped before the call returned";
  EXPECT_EQ(st.caller_maps, 0u);
  EXPECT_EQ(dmakit_vtophys(ctx_, unaligned, &got, &run), DMAKIT_ENOTFOUND);
  EXPECT_TRUE(says({"not memory dmakit maps"}));
  EXPECT_EQ(dmakit_mem_unmap(ctx_, unaligned), DMAKIT_ENOTFOUND) << "unmapped twice";
  EXPECT_EQ(dmakit_vtophys(ctx_, mem, nullptr, &run), DMAKIT_EINVAL);
  EXPECT_EQ(dmakit_vtophys(kGarbageCtx, mem, &got, &run), DMAKIT_EINVAL);
  ::munmap(mem, len);
  still_works();
}

TEST_F(CApi, PoolsZeroedBulkLimitStatsAndEveryMisuse) {
  dmakit_pool_params p;
  dmakit_pool_params_init(&p, "prp", 4096);
  p.align = 4096;
  p.dma_limit = 0xffffffff;
  dmakit_pool* pool = nullptr;
  ASSERT_EQ(dmakit_pool_create_with(ctx_, &p, &pool), DMAKIT_OK) << last();

  void* va = nullptr;
  uint64_t iova = 0;
  ASSERT_EQ(dmakit_pool_alloc(pool, &va, &iova), DMAKIT_OK);
  std::memset(va, 0xee, 4096);
  ASSERT_EQ(dmakit_pool_free(pool, va, iova), DMAKIT_OK);
  ASSERT_EQ(dmakit_pool_alloc_zeroed(pool, &va, &iova), DMAKIT_OK);
  auto* bytes = static_cast<unsigned char*>(va);
  EXPECT_EQ(bytes[0], 0);
  EXPECT_EQ(bytes[4095], 0);
  EXPECT_LE(iova + 4095, 0xffffffffu);
  uint64_t looked = 0;
  ASSERT_EQ(dmakit_vtophys(ctx_, bytes + 17, &looked, nullptr), DMAKIT_OK);
  EXPECT_EQ(looked, iova + 17) << "pool blocks translate";
  EXPECT_EQ(dmakit_pool_free(pool, va, iova + 4096), DMAKIT_ECORRUPTED) << "wrong IOVA";
  EXPECT_EQ(dmakit_pool_free(pool, va, iova), DMAKIT_OK);
  EXPECT_EQ(dmakit_pool_free(pool, va, iova), DMAKIT_ECORRUPTED) << "double free";
  EXPECT_FALSE(last().empty());

  std::vector<void*> vas(100);
  std::vector<uint64_t> iovas(100);
  ASSERT_EQ(dmakit_pool_alloc_bulk(pool, 100, vas.data(), iovas.data()), DMAKIT_OK) << last();
  dmakit_pool_stats ps{};
  ps.struct_size = sizeof ps;
  ASSERT_EQ(dmakit_pool_get_stats(pool, &ps), DMAKIT_OK) << last();
  EXPECT_EQ(ps.active, 100u);
  EXPECT_EQ(ps.size, 4096u);
  EXPECT_EQ(ps.validation_failures, 2u);
  std::swap(vas[10], vas[11]);  // two bad pairs among 100
  EXPECT_EQ(dmakit_pool_free_bulk(pool, 100, vas.data(), iovas.data()), DMAKIT_ECORRUPTED);
  ASSERT_EQ(dmakit_pool_get_stats(pool, &ps), DMAKIT_OK);
  EXPECT_EQ(ps.active, 2u) << "the 98 good ones were freed";
  std::swap(vas[10], vas[11]);
  void* const two_va[] = {vas[10], vas[11]};
  const uint64_t two_iova[] = {iovas[10], iovas[11]};
  EXPECT_EQ(dmakit_pool_free_bulk(pool, 2, two_va, two_iova), DMAKIT_OK) << last();
  EXPECT_EQ(dmakit_pool_alloc_bulk(pool, 0, nullptr, nullptr), DMAKIT_OK);

  // Misuse of each pool call.
  EXPECT_EQ(dmakit_pool_alloc(pool, nullptr, &iova), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"dmakit_pool_alloc", "NULL"}));
  EXPECT_EQ(dmakit_pool_alloc_zeroed(pool, &va, nullptr), DMAKIT_EINVAL);
  EXPECT_EQ(dmakit_pool_alloc_bulk(pool, 3, nullptr, iovas.data()), DMAKIT_EINVAL);
  EXPECT_EQ(dmakit_pool_free_bulk(pool, 3, vas.data(), nullptr), DMAKIT_EINVAL);
  EXPECT_EQ(dmakit_pool_get_stats(pool, nullptr), DMAKIT_EINVAL);
  ps.struct_size = 4;
  EXPECT_EQ(dmakit_pool_get_stats(pool, &ps), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"struct_size is 4"}));
  for (dmakit_pool* bad : {static_cast<dmakit_pool*>(nullptr), kGarbagePool}) {
    EXPECT_EQ(dmakit_pool_alloc(bad, &va, &iova), DMAKIT_EINVAL);
    EXPECT_TRUE(says({"dmakit_pool_alloc", "not a live pool"}));
    EXPECT_EQ(dmakit_pool_alloc_zeroed(bad, &va, &iova), DMAKIT_EINVAL);
    EXPECT_EQ(dmakit_pool_free(bad, va, iova), DMAKIT_EINVAL);
    EXPECT_EQ(dmakit_pool_alloc_bulk(bad, 1, vas.data(), iovas.data()), DMAKIT_EINVAL);
    EXPECT_EQ(dmakit_pool_free_bulk(bad, 1, vas.data(), iovas.data()), DMAKIT_EINVAL);
    ps.struct_size = sizeof ps;
    EXPECT_EQ(dmakit_pool_get_stats(bad, &ps), DMAKIT_EINVAL);
    EXPECT_EQ(dmakit_pool_destroy(bad), DMAKIT_EINVAL);
  }
  EXPECT_EQ(dmakit_pool_destroy(pool), DMAKIT_OK) << last();
  EXPECT_EQ(dmakit_pool_destroy(pool), DMAKIT_EINVAL) << "destroyed twice";
  EXPECT_EQ(dmakit_pool_alloc(pool, &va, &iova), DMAKIT_EINVAL) << "used after destroy";

  // Creation errors.
  dmakit_pool* q = nullptr;
  EXPECT_EQ(dmakit_pool_create(ctx_, "bad", 100, 3, 0, &q), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"3"}));
  EXPECT_EQ(dmakit_pool_create(ctx_, nullptr, 64, 64, 0, &q), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"name is NULL"}));
  EXPECT_EQ(dmakit_pool_create(ctx_, "x", 64, 64, 0, nullptr), DMAKIT_EINVAL);
  EXPECT_EQ(dmakit_pool_create(kGarbageCtx, "x", 64, 64, 0, &q), DMAKIT_EINVAL);
  EXPECT_EQ(dmakit_pool_create_with(ctx_, nullptr, &q), DMAKIT_EINVAL);
  dmakit_pool_params_init(&p, "flags", 64);
  p.flags = 0x100;
  EXPECT_EQ(dmakit_pool_create_with(ctx_, &p, &q), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"unknown flag bits 0x100"}));
  p.flags = 0;
  p.struct_size = 1;
  EXPECT_EQ(dmakit_pool_create_with(ctx_, &p, &q), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"dmakit_pool_params_init"}));
  ASSERT_EQ(dmakit_pool_create(ctx_, "dup", 64, 64, 0, &q), DMAKIT_OK);
  dmakit_pool* q2 = nullptr;
  EXPECT_EQ(dmakit_pool_create(ctx_, "dup", 64, 64, 0, &q2), DMAKIT_EEXIST);
  EXPECT_TRUE(says({"'dup' already exists"}));
  EXPECT_EQ(dmakit_pool_destroy(q), DMAKIT_OK);
  still_works();
}

TEST_F(CApi, ContextCallsRefuseBadInput) {
  dmakit_ctx_stats st{};
  EXPECT_EQ(dmakit_ctx_get_stats(ctx_, &st), DMAKIT_EINVAL) << "struct_size 0";
  EXPECT_TRUE(says({"struct_size is 0"}));
  EXPECT_EQ(dmakit_ctx_get_stats(ctx_, nullptr), DMAKIT_EINVAL);
  st.struct_size = sizeof st;
  EXPECT_EQ(dmakit_ctx_get_stats(kGarbageCtx, &st), DMAKIT_EINVAL);
  EXPECT_EQ(dmakit_ctx_flush(nullptr), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"dmakit_ctx_flush", "not a live context"}));
  EXPECT_EQ(dmakit_mem_unmap(nullptr, &st), DMAKIT_EINVAL);

  // A freed buffer's IOVA range is stale until the flush; then it is unmapped.
  dmakit_buffer* b = nullptr;
  ASSERT_EQ(dmakit_buffer_alloc(ctx_, 4096, 0, 0, UINT64_MAX, &b), DMAKIT_OK);
  ASSERT_EQ(dmakit_buffer_free(b), DMAKIT_OK);
  ASSERT_EQ(dmakit_ctx_flush(ctx_), DMAKIT_OK) << last();
  ASSERT_EQ(dmakit_ctx_get_stats(ctx_, &st), DMAKIT_OK);
  EXPECT_EQ(st.iova_stale_pages, 0u);
  still_works();
}

TEST(CApiLifetime, PoolsAndBuffersOfADestroyedContextAreRefused) {
  dmakit_settings s = sim_settings();
  dmakit_ctx* ctx = nullptr;
  ASSERT_EQ(dmakit_ctx_create_with(&s, &ctx), DMAKIT_OK) << last();
  dmakit_pool* pool = nullptr;
  ASSERT_EQ(dmakit_pool_create(ctx, "sqe", 64, 64, 0, &pool), DMAKIT_OK);
  dmakit_buffer* b = nullptr;
  ASSERT_EQ(dmakit_buffer_alloc(ctx, 4096, 0, 0, UINT64_MAX, &b), DMAKIT_OK);
  void* va = nullptr;
  uint64_t iova = 0;
  ASSERT_EQ(dmakit_pool_alloc(pool, &va, &iova), DMAKIT_OK);
  ASSERT_EQ(dmakit_pool_free(pool, va, iova), DMAKIT_OK);
  ASSERT_EQ(dmakit_ctx_destroy(ctx), DMAKIT_OK);

  EXPECT_EQ(dmakit_pool_alloc(pool, &va, &iova), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"not a live pool", "context was destroyed"}));
  EXPECT_EQ(dmakit_pool_destroy(pool), DMAKIT_EINVAL);
  EXPECT_EQ(dmakit_buffer_iova(b), 0u);
  EXPECT_TRUE(says({"context was destroyed"}));
  EXPECT_EQ(dmakit_buffer_free(b), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"context was destroyed", "released"}));
  EXPECT_EQ(dmakit_buffer_free(b), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"not a live buffer"}));

  // A new context works, and the old handles stay stale in it.
  ASSERT_EQ(dmakit_ctx_create_with(&s, &ctx), DMAKIT_OK) << last();
  dmakit_pool* fresh = nullptr;
  ASSERT_EQ(dmakit_pool_create(ctx, "sqe", 64, 64, 0, &fresh), DMAKIT_OK);
  EXPECT_NE(fresh, pool);
  EXPECT_EQ(dmakit_pool_alloc(pool, &va, &iova), DMAKIT_EINVAL);
  ASSERT_EQ(dmakit_pool_alloc(fresh, &va, &iova), DMAKIT_OK);
  ASSERT_EQ(dmakit_pool_free(fresh, va, iova), DMAKIT_OK);
  EXPECT_EQ(dmakit_ctx_destroy(ctx), DMAKIT_OK);
}

// A handle of a context that C++ code owns (core::borrow_c_handle, as the
// dmapool bench drives the C API): destroying the handle ends the pools
// made through it, handles and pools, but not the context.
TEST(CApiLifetime, ABorrowedContextHandleEndsItsPoolsNotTheContext) {
  dmakit::core::Config cfg;
  cfg.iommu.backend = "sim";
  cfg.eal.mode = "nohuge";
  auto ctx = dmakit::core::Context::create(cfg);
  ASSERT_TRUE(ctx.has_value()) << ctx.error().what();
  dmakit_ctx* h = dmakit::core::borrow_c_handle(**ctx);
  ASSERT_NE(h, nullptr);
  dmakit_pool* pool = nullptr;
  ASSERT_EQ(dmakit_pool_create(h, "prp", 64, 64, 0, &pool), DMAKIT_OK) << last();
  void* va = nullptr;
  uint64_t iova = 0;
  ASSERT_EQ(dmakit_pool_alloc(pool, &va, &iova), DMAKIT_OK) << last();
  ASSERT_EQ(dmakit_pool_free(pool, va, iova), DMAKIT_OK) << last();
  EXPECT_EQ((*ctx)->pool_stats().size(), 1u);

  ASSERT_EQ(dmakit_ctx_destroy(h), DMAKIT_OK) << last();
  EXPECT_EQ(dmakit_pool_alloc(pool, &va, &iova), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"not a live pool"}));
  EXPECT_EQ(dmakit_ctx_destroy(h), DMAKIT_EINVAL);
  EXPECT_TRUE((*ctx)->pool_stats().empty());
  auto again = (*ctx)->create_pool("prp", 64, 64, 0);  // the name is free again, the context alive
  ASSERT_TRUE(again.has_value()) << again.error().what();
  auto b = (*again)->alloc();
  ASSERT_TRUE(b.has_value()) << b.error().what();
  EXPECT_TRUE((*again)->free(*b).has_value());
}

namespace {

// The device calls on a host without VFIO: every one answers with a code and
// a message, never a crash. Their real work is checked in the guest
// (tests/vm/device_vmtest.cpp).
TEST_F(CApi, DeviceCallsOnTheSimulatedBackendSayItHasNoDevices) {
  dmakit_device* dev = reinterpret_cast<dmakit_device*>(0x1);
  EXPECT_EQ(dmakit_device_open(ctx_, "0000:00:03.0", &dev), DMAKIT_ENOTSUP);
  EXPECT_EQ(dev, nullptr);
  EXPECT_TRUE(says({"open device 0000:00:03.0", "sim backend has no devices"}));
  EXPECT_EQ(dmakit_ctx_attach(ctx_, "00:03.0"), DMAKIT_ENOTSUP);
  EXPECT_TRUE(says({"attach 00:03.0", "no devices"}));
  EXPECT_EQ(dmakit_ctx_detach(ctx_, "00:03.0"), DMAKIT_ENOTSUP);

  char list[8] = "x";
  size_t len = 99;
  ASSERT_EQ(dmakit_ctx_devices(ctx_, list, sizeof list, &len), DMAKIT_OK) << last();
  EXPECT_EQ(len, 0u);
  EXPECT_STREQ(list, "");
  EXPECT_EQ(dmakit_ctx_devices(ctx_, nullptr, 0, &len), DMAKIT_ENOSPC);  // room for the NUL is needed

  // Misuse of the arguments.
  EXPECT_EQ(dmakit_device_open(ctx_, nullptr, &dev), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"bdf is NULL"}));
  EXPECT_EQ(dmakit_device_open(ctx_, "0000:00:03.0", nullptr), DMAKIT_EINVAL);
  EXPECT_EQ(dmakit_ctx_devices(ctx_, nullptr, 4, &len), DMAKIT_EINVAL);
  still_works();
}

TEST(CApiDevices, StaleOrGarbageDeviceHandlesAreRefused) {
  auto* garbage = reinterpret_cast<dmakit_device*>(uintptr_t{0x1234567800000001});
  for (dmakit_device* h : {static_cast<dmakit_device*>(nullptr), garbage}) {
    EXPECT_EQ(dmakit_device_close(h), DMAKIT_EINVAL);
    EXPECT_TRUE(says({"dmakit_device_close", "not an open device"}));
    EXPECT_EQ(dmakit_device_bdf(h), nullptr);
    dmakit_region_info ri{};
    ri.struct_size = sizeof ri;
    EXPECT_EQ(dmakit_device_region_info(h, 0, &ri), DMAKIT_EINVAL);
    dmakit_bar bar{};
    EXPECT_EQ(dmakit_device_map_bar(h, 0, &bar), DMAKIT_EINVAL);
    uint32_t v = 0;
    EXPECT_EQ(dmakit_device_config_read(h, 0, &v, 4), DMAKIT_EINVAL);
    EXPECT_EQ(dmakit_device_config_write(h, 0, &v, 4), DMAKIT_EINVAL);
    EXPECT_EQ(dmakit_device_set_bus_master(h, 1), DMAKIT_EINVAL);
    EXPECT_EQ(dmakit_device_reset(h), DMAKIT_EINVAL);
    EXPECT_EQ(dmakit_device_irq_count(h, DMAKIT_IRQ_MSIX, &v), DMAKIT_EINVAL);
    EXPECT_EQ(dmakit_device_irq_enable(h, DMAKIT_IRQ_MSIX, 1, nullptr), DMAKIT_EINVAL);
    EXPECT_EQ(dmakit_device_irq_disable(h, DMAKIT_IRQ_MSIX), DMAKIT_EINVAL);
    EXPECT_EQ(dmakit_device_irq_mask(h, DMAKIT_IRQ_INTX, 0), DMAKIT_EINVAL);
    EXPECT_EQ(dmakit_device_irq_unmask(h, DMAKIT_IRQ_INTX, 0), DMAKIT_EINVAL);
    EXPECT_EQ(dmakit_device_irq_wait(h, DMAKIT_IRQ_MSIX, 0, 0, nullptr), DMAKIT_EINVAL);
    EXPECT_TRUE(says({"dmakit_device_irq_wait", "not an open device"}));
  }
}

// The inline MMIO accessors check bounds and alignment before they touch the
// mapping; here the "BAR" is plain memory with guard bytes around it.
TEST(CApiDevices, MmioAccessorsRefuseOutOfBoundsAndMisalignedAccess) {
  alignas(8) uint8_t mem[64 + 16];
  std::memset(mem, 0xee, sizeof mem);
  dmakit_bar bar{};
  bar.base = mem + 8;
  bar.size = 64;
  bar.index = 2;

  dmakit_mmio_write32(&bar, 0, 0x11223344u);
  dmakit_mmio_write64(&bar, 56, 0x0102030405060708ull);
  EXPECT_EQ(dmakit_mmio_read32(&bar, 0), 0x11223344u);
  EXPECT_EQ(dmakit_mmio_read64(&bar, 56), 0x0102030405060708ull);

  // Past the end, straddling the end, misaligned: nothing is written and
  // reads give all ones, with the reason in the last error.
  dmakit_mmio_write32(&bar, 64, 0);
  EXPECT_TRUE(says({"dmakit_mmio_write32", "BAR2", "0x40", "outside the 0x40-byte mapping"}));
  dmakit_mmio_write64(&bar, 64, 0);
  EXPECT_TRUE(says({"dmakit_mmio_write64", "0x40", "outside"}));
  dmakit_mmio_write32(&bar, 2, 0);
  EXPECT_TRUE(says({"dmakit_mmio_write32", "not 4-byte aligned"}));
  dmakit_mmio_write64(&bar, UINT64_MAX - 7, 0);  // an offset where off + 8 wraps
  EXPECT_TRUE(says({"dmakit_mmio_write64", "0xfffffffffffffff8", "outside"}));
  EXPECT_EQ(dmakit_mmio_read32(&bar, 64), 0xffffffffu);
  EXPECT_TRUE(says({"dmakit_mmio_read32", "outside"}));
  EXPECT_EQ(dmakit_mmio_read64(&bar, 4), ~uint64_t{0});
  EXPECT_TRUE(says({"dmakit_mmio_read64", "not 8-byte aligned"}));
  EXPECT_EQ(dmakit_mmio_read32(nullptr, 0), 0xffffffffu);
  EXPECT_TRUE(says({"bar is NULL"}));

  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(mem[i], 0xee) << "guard byte " << i << " before the BAR was written";
    EXPECT_EQ(mem[72 + i], 0xee) << "guard byte " << i << " after the BAR was written";
  }
  EXPECT_EQ(mem[8 + 2], 0x22) << "the misaligned write reached memory";
}

TEST(CApiDevices, TheDeviceListIsCheckedAtCreation) {
  dmakit_settings s = sim_settings();
  dmakit_ctx* ctx = nullptr;
  s.devices = "0000:00:03.0,0000:00:05.0, 00:03.0";
  EXPECT_EQ(dmakit_ctx_create_with(&s, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"iommu.devices", "0000:00:03.0 is named twice"}));
  s.devices = "0000:00:03.0,,0000:00:05.0";
  EXPECT_EQ(dmakit_ctx_create_with(&s, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"iommu.devices", "empty entry"}));
  s.devices = "0000:00:03.0,nvme0";
  EXPECT_EQ(dmakit_ctx_create_with(&s, &ctx), DMAKIT_EINVAL);
  EXPECT_TRUE(says({"iommu.devices", "nvme0"}));
  EXPECT_EQ(ctx, nullptr);
}

}  // namespace
