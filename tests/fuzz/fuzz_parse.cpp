// The small text parsers on arbitrary strings: sizes ("2M"), setting values
// (integers, booleans, decimals), size lists and the buffer orders, PCI
// addresses (BDF) and BDF lists. Each accepted value must mean what its text
// says; each refusal must be an error value with a message.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "alloc_buffer/buffer_allocator.hpp"
#include "base/config.hpp"
#include "fuzz_support.hpp"
#include "iommu/pci.hpp"

using namespace dmakit;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet_log();
  return 0;
}

namespace {

template <class R>
void refused_with_message(const R& r, std::string_view what, std::string_view text) {
  if (!r && r.error().message.empty()) fuzz::violation("{} '{}' refused without a message", what, text);
}

void sizes(const std::string& text) {
  auto v = base::parse_size(text);
  refused_with_message(v, "size", text);
  if (!v) return;
  // The value is the leading decimal digits times the suffix's unit.
  size_t digits = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') ++digits;
  if (digits == 0) fuzz::violation("size '{}' accepted without digits", text);
  const std::string_view suffix = std::string_view(text).substr(digits);
  const uint64_t unit = suffix.empty() || suffix == "B"        ? 1
                        : suffix == "K" || suffix == "KiB"     ? 1ull << 10
                        : suffix == "M" || suffix == "MiB"     ? 1ull << 20
                        : suffix == "G" || suffix == "GiB"     ? 1ull << 30
                                                               : 0;
  if (unit == 0) fuzz::violation("size '{}' accepted with suffix '{}'", text, suffix);
  if (*v % unit != 0) fuzz::violation("size '{}' = {} is not a multiple of its unit", text, *v);
  uint64_t n = 0;
  for (size_t i = 0; i < digits; ++i) {
    const uint64_t d = static_cast<uint64_t>(text[i] - '0');
    if (n > (UINT64_MAX - d) / 10) fuzz::violation("size '{}' accepted though its digits overflow", text);
    n = n * 10 + d;
  }
  if (n * unit != *v) fuzz::violation("size '{}' parsed as {}", text, *v);
}

void values(const std::string& text) {
  auto b = base::parse_value<bool>("k", text);
  refused_with_message(b, "bool", text);
  if (b && text != "true" && text != "false") fuzz::violation("bool '{}' accepted", text);
  auto u32 = base::parse_value<uint32_t>("k", text);
  refused_with_message(u32, "u32", text);
  if (u32 && std::to_string(*u32) != text.substr(text.find_first_not_of('0') == std::string::npos
                                                     ? text.size() - 1
                                                     : text.find_first_not_of('0')))
    fuzz::violation("u32 '{}' parsed as {}", text, *u32);
  auto u64 = base::parse_value<uint64_t>("k", text);
  refused_with_message(u64, "u64", text);
  if (u64) {
    auto s = base::parse_size(text);
    if (!s || *s != *u64) fuzz::violation("u64 '{}' = {} disagrees with parse_size", text, *u64);
    if (text.front() < '0' || text.front() > '9') fuzz::violation("u64 '{}' accepted without a leading digit", text);
  }
  auto d = base::parse_value<double>("k", text);
  refused_with_message(d, "double", text);
  if (d && (!(*d >= 0) || !std::isfinite(*d))) fuzz::violation("double '{}' parsed as {}", text, *d);
}

void lists(const std::string& text) {
  auto st = base::check_size_list("k", text);
  refused_with_message(st, "size list", text);
  auto orders = alloc_buffer::parse_orders(text);
  refused_with_message(orders, "orders", text);
  if (orders) {
    if (orders->empty()) fuzz::violation("orders '{}' accepted as an empty list", text);
    for (size_t i = 0; i < orders->size(); ++i) {
      const uint64_t o = (*orders)[i];
      if (o == 0 || (o & (o - 1)) != 0) fuzz::violation("orders '{}': {} is not a power of two", text, o);
      if (i > 0 && (*orders)[i - 1] <= o) fuzz::violation("orders '{}' not strictly largest first", text);
    }
  }
}

void bdfs(const std::string& text) {
  using iommu::pci::Bdf;
  auto b = Bdf::parse(text);
  refused_with_message(b, "BDF", text);
  if (b) {
    if (b->device > 31 || b->function > 7) fuzz::violation("BDF '{}' has device {} function {}", text, b->device, b->function);
    const std::string canon = b->str();
    auto again = Bdf::parse(canon);
    if (!again || !(*again == *b)) fuzz::violation("BDF '{}' -> '{}' does not parse back to itself", text, canon);
    if (canon.size() != 12) fuzz::violation("BDF '{}' -> '{}' is not canonical", text, canon);
  }
  auto list = iommu::pci::parse_bdf_list(text);
  refused_with_message(list, "BDF list", text);
  if (list) {
    for (size_t i = 0; i < list->size(); ++i) {
      auto e = Bdf::parse((*list)[i]);
      if (!e || e->str() != (*list)[i]) fuzz::violation("BDF list '{}': entry '{}' is not canonical", text, (*list)[i]);
      for (size_t j = 0; j < i; ++j)
        if ((*list)[j] == (*list)[i]) fuzz::violation("BDF list '{}' names '{}' twice", text, (*list)[i]);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 256) return 0;
  const std::string text(reinterpret_cast<const char*>(data), size);
  sizes(text);
  values(text);
  lists(text);
  bdfs(text);
  return 0;
}
