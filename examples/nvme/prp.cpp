// PRP entries and lists for a command's data (NVMe base spec, "Physical
// Region Page Entry and List"), built from the IOVAs of the data's segments.
#include "prp.hpp"

#include <algorithm>
#include <cinttypes>
#include <optional>

#include "errors.hpp"
#include "spec.hpp"

namespace nvme {

namespace {

constexpr uint64_t kPageMask = spec::kPage - 1;

// Walks a segment list front to back: the IOVA of a byte position, if the
// bytes needed from there are contiguous in IOVA (segments whose IOVAs
// adjoin count as one run).
class Cursor {
 public:
  explicit Cursor(std::span<const dmakit_segment> segs) : segs_(segs) {}

  // pos never goes backwards between calls.
  std::optional<uint64_t> iova(uint64_t pos, uint64_t need) {
    while (i_ < segs_.size() && pos - base_ >= segs_[i_].len) base_ += segs_[i_++].len;
    if (i_ == segs_.size()) return std::nullopt;
    const uint64_t start = segs_[i_].iova + (pos - base_);
    uint64_t have = segs_[i_].len - (pos - base_);
    for (size_t j = i_ + 1; have < need; ++j) {
      if (j == segs_.size() || segs_[j].iova != start + have) return std::nullopt;
      have += segs_[j].len;
    }
    return start;
  }

 private:
  std::span<const dmakit_segment> segs_;
  size_t i_ = 0;
  uint64_t base_ = 0;  // byte position of segs_[i_]
};

}  // namespace

Result<Prp> build_prp(const DataRef& data, dmakit::Pool& pool, std::vector<dmakit::Block>& lists) {
  if (data.bytes == 0) return Prp{};
  uint64_t total = 0;
  for (const auto& s : data.segments) total += s.len;
  if (data.offset > total || data.bytes > total - data.offset)
    return fail(Errc::invalid_argument, strf("PRP: bytes [%" PRIu64 ", +%" PRIu64 ") lie beyond the %" PRIu64
                                             " bytes of the data's %zu segments",
                                             data.offset, data.bytes, total, data.segments.size()));
  Cursor cur(data.segments);
  const auto start = cur.iova(data.offset, 1);
  if (!start || (*start & 3) != 0)
    return fail(Errc::invalid_argument,
                strf("PRP1: IOVA %#" PRIx64 " of the first byte is not dword aligned", start.value_or(0)));
  // PRP1 covers up to the end of its page; every later entry a whole page.
  const uint64_t first = std::min(data.bytes, spec::kPage - (*start & kPageMask));
  if (!cur.iova(data.offset, first))
    return fail(Errc::invalid_argument, strf("PRP1: IOVA %#" PRIx64 " is not contiguous for %" PRIu64 " bytes",
                                             *start, first));
  const uint64_t n = (data.bytes - first + kPageMask) / spec::kPage;  // entries after PRP1

  auto page = [&](uint64_t k) -> Result<uint64_t> {
    const uint64_t pos = first + k * spec::kPage;
    const auto iova = cur.iova(data.offset + pos, std::min(spec::kPage, data.bytes - pos));
    if (!iova || (*iova & kPageMask) != 0)
      return fail(Errc::invalid_argument,
                  strf("PRP entry %" PRIu64 ": byte %" PRIu64 " of the data (IOVA %#" PRIx64
                       ") does not start a contiguous 4 KiB page",
                       k + 1, data.offset + pos, iova.value_or(0)));
    return *iova;
  };

  Prp prp{*start, 0};
  if (n == 0) return prp;
  if (n == 1) {
    auto p = page(0);
    if (!p) return std::unexpected(p.error());
    prp.prp2 = *p;
    return prp;
  }

  // n entries in list pages of 512; all but the last page give their last
  // slot to the link to the next page.
  const size_t mark = lists.size();
  auto give_back = [&] {
    for (size_t i = mark; i < lists.size(); ++i) (void)pool.free(lists[i]);
    lists.resize(mark);
  };
  const uint64_t pages = (n - 1 + spec::kPrpPerPage - 2) / (spec::kPrpPerPage - 1);
  for (uint64_t i = 0; i < pages; ++i) {
    auto b = pool.alloc();
    if (!b) {
      give_back();
      return fail(b.error(), "PRP list page");
    }
    lists.push_back(*b);
  }
  size_t list = mark, slot = 0;
  auto* entries = static_cast<uint64_t*>(lists[list].vaddr);
  for (uint64_t k = 0; k < n; ++k) {
    if (slot == spec::kPrpPerPage - 1 && k + 1 < n) {
      entries[slot] = lists[list + 1].iova;
      entries = static_cast<uint64_t*>(lists[++list].vaddr);
      slot = 0;
    }
    auto p = page(k);
    if (!p) {
      give_back();
      return std::unexpected(p.error());
    }
    entries[slot++] = *p;
  }
  prp.prp2 = lists[mark].iova;
  return prp;
}

}  // namespace nvme
