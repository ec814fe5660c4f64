// Data helpers for guest tests on the public API: a buffer's bytes through
// its host runs (dmakit_buffer_segments), and a pattern a driver writes.
#pragma once

#include <dmakit/dmakit.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

namespace dmakit::vmtest {

// Calls fn(host address, byte position, length) for each host run that
// covers the bytes [offset, offset + len) of the segments.
template <class Fn>
void for_each_run(std::span<const dmakit_segment> segs, uint64_t offset, uint64_t len, Fn&& fn) {
  uint64_t base = 0;
  for (const auto& s : segs) {
    const uint64_t from = std::max(offset, base), to = std::min(offset + len, base + s.len);
    if (from < to) fn(static_cast<std::byte*>(s.vaddr) + (from - base), from, to - from);
    base += s.len;
  }
}

// Word k of LBA lba in pattern seed. The top byte 0xd3 never occurs in the
// pattern the test disks start with (their LBA numbers), so data that
// matches was written, not found.
inline uint64_t pattern_word(uint32_t seed, uint64_t lba, uint64_t k) {
  return (uint64_t{0xd3} << 56) | ((uint64_t{seed} & 0xff) << 48) | ((lba & 0xffffffffffull) << 8) | (k & 0xff);
}

// Fills [offset, offset + len) with the pattern of the LBAs from lba on.
inline void fill_pattern(std::span<const dmakit_segment> segs, uint64_t offset, uint64_t len, uint32_t seed,
                         uint64_t lba, uint32_t block_size) {
  for_each_run(segs, offset, len, [&](std::byte* host, uint64_t pos, uint64_t n) {
    for (uint64_t i = 0; i < n; i += 8) {
      const uint64_t w = (pos - offset + i) / 8;
      const uint64_t v = pattern_word(seed, lba + w / (block_size / 8), w % (block_size / 8));
      std::memcpy(host + i, &v, sizeof v);
    }
  });
}

inline void fill_bytes(std::span<const dmakit_segment> segs, uint64_t offset, uint64_t len, uint8_t value) {
  for_each_run(segs, offset, len, [&](std::byte* host, uint64_t, uint64_t n) { std::memset(host, value, n); });
}

inline std::vector<std::byte> copy_out(std::span<const dmakit_segment> segs, uint64_t offset, uint64_t len) {
  std::vector<std::byte> out(len);
  for_each_run(segs, offset, len,
               [&](std::byte* host, uint64_t pos, uint64_t n) { std::memcpy(out.data() + (pos - offset), host, n); });
  return out;
}

// Where two byte ranges first differ; -1 when equal.
inline int64_t first_difference(std::span<const std::byte> a, std::span<const std::byte> b) {
  if (a.size() != b.size()) return static_cast<int64_t>(std::min(a.size(), b.size()));
  auto [pa, pb] = std::mismatch(a.begin(), a.end(), b.begin());
  return pa == a.end() ? -1 : static_cast<int64_t>(pa - a.begin());
}

}  // namespace dmakit::vmtest
