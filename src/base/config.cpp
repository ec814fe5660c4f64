#include "base/config.hpp"

#include <filesystem>
#include <sstream>

namespace dmakit::base {

Result<uint64_t> parse_size(std::string_view text) {
  if (text.empty()) return fail(Errc::invalid_argument, "empty size");
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || p == text.data()) return fail(Errc::invalid_argument, "'{}' is not a size", text);
  std::string_view suffix(p, static_cast<size_t>(text.data() + text.size() - p));
  uint64_t mult = 1;
  if (suffix.empty() || suffix == "B") mult = 1;
  else if (suffix == "K" || suffix == "KiB") mult = 1ull << 10;
  else if (suffix == "M" || suffix == "MiB") mult = 1ull << 20;
  else if (suffix == "G" || suffix == "GiB") mult = 1ull << 30;
  else return fail(Errc::invalid_argument, "'{}': unknown size suffix '{}' (K, M or G)", text, suffix);
  if (v > UINT64_MAX / mult) return fail(Errc::invalid_argument, "'{}' overflows 64 bits", text);
  return v * mult;
}

bool one_of(const std::string& v, std::initializer_list<std::string_view> options) {
  for (auto o : options)
    if (v == o) return true;
  return false;
}

Status check_size_list(const char* key, const std::string& list) {
  std::stringstream ss(list);
  std::string item;
  int n = 0;
  while (std::getline(ss, item, ',')) {
    auto sz = parse_size(item);
    if (!sz) return fail(Errc::invalid_argument, "key '{}': {}", key, sz.error().message);
    if (*sz == 0 || (*sz & (*sz - 1)) != 0)
      return fail(Errc::invalid_argument, "key '{}': '{}' is not a power of two", key, item);
    ++n;
  }
  if (n == 0) return fail(Errc::invalid_argument, "key '{}': empty list", key);
  return ok();
}

Status check_config_file(const std::string& path) {
  constexpr uint64_t kMaxBytes = 1ull << 20;
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(st)) return fail(Errc::not_found, "{}: config file not found", path);
  if (!std::filesystem::is_regular_file(st))
    return fail(Errc::invalid_argument, "{}: not a regular file (a config file is TOML text)", path);
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) return fail(Errc::io, "{}: cannot read its size: {}", path, ec.message());
  if (size > kMaxBytes)
    return fail(Errc::invalid_argument, "{}: {} bytes; a config file may have at most {}", path, size, kMaxBytes);
  return ok();
}

std::string default_config_path() {
  if (const char* env = std::getenv("DMAKIT_CONFIG"); env != nullptr && *env != '\0') return env;
  for (const char* p : {"config/dmakit.toml", "/etc/dmakit/dmakit.toml"})
    if (std::filesystem::exists(p)) return p;
  return "";
}

}  // namespace dmakit::base
