// The generic part of dmakit's configuration that needs no CLI11: checking
// and printing a setting's textual value, sizes ("2M"), size lists and where
// the config file is looked for. The flag and TOML reading is in
// base/config_cli.hpp (CLI11; for .cpp files and the tool only); each layer
// owns its section struct (its settings.hpp); core/config.hpp holds the Config
// aggregate and the table of every setting.
#pragma once

#include <charconv>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstdlib>
#include <fmt/format.h>
#include <initializer_list>
#include <string>
#include <string_view>
#include <type_traits>

#include "base/error.hpp"

namespace dmakit::base {

// Parses sizes: "4K", "2M", "1G", "65536" (decimal) into bytes.
Result<uint64_t> parse_size(std::string_view text);

// A setting's textual value as T, strictly, so the same text means the same
// value in a file and on the command line: bool is true or false; integers
// are decimal without a sign, in T's range (64-bit ones may carry a K, M or
// G suffix); floating point is a finite, non-negative decimal number; a
// string is taken as it is. The message names the key.
template <class T>
Result<T> parse_value(const std::string& key, const std::string& text) {
  if constexpr (std::is_same_v<T, bool>) {
    if (text == "true") return true;
    if (text == "false") return false;
    return fail(Errc::invalid_argument, "key '{}': '{}' is not a boolean (true or false)", key, text);
  } else if constexpr (std::is_integral_v<T>) {
    static_assert(std::is_unsigned_v<T>, "settings are unsigned");
    if constexpr (sizeof(T) == 8) {
      const bool digits = !text.empty() && text.find_first_not_of("0123456789KMGiB") == std::string::npos &&
                          text.front() >= '0' && text.front() <= '9';
      auto v = parse_size(text);
      if (!digits || !v)
        return fail(Errc::invalid_argument, "key '{}': '{}' is not a non-negative decimal number (K, M, G allowed)",
                    key, text);
      return *v;
    } else {
      T v{};
      auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v, 10);
      if (text.empty() || ec != std::errc() || p != text.data() + text.size())
        return fail(Errc::invalid_argument, "key '{}': '{}' is not a decimal number from 0 to {}", key, text,
                    std::numeric_limits<T>::max());
      return v;
    }
  } else if constexpr (std::is_floating_point_v<T>) {
    double v = 0;
    auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v, std::chars_format::fixed);
    if (text.empty() || ec != std::errc() || p != text.data() + text.size() || !std::isfinite(v) || v < 0)
      return fail(Errc::invalid_argument, "key '{}': '{}' is not a finite, non-negative decimal number", key, text);
    return static_cast<T>(v);
  } else {
    return text;
  }
}

template <class T>
Status check_value(const std::string& key, const std::string& text) {
  auto v = parse_value<T>(key, text);
  if (!v) return std::unexpected(std::move(v).error());
  return ok();
}

// A config file dmakit will read: a regular file of at most 1 MiB (not a
// directory, a device or a pipe). Errors name the path.
Status check_config_file(const std::string& path);

// A setting's value as the config file spells it.
template <class T>
std::string show_value(const T& v) {
  if constexpr (std::is_same_v<T, bool>) return v ? "true" : "false";
  else if constexpr (std::is_same_v<T, std::string>) return v;
  else if constexpr (std::is_floating_point_v<T>) return fmt::format("{}", v);
  else return std::to_string(v);
}

// Where the tool looks for its config when --config is not given:
// $DMAKIT_CONFIG, then ./config/dmakit.toml, then /etc/dmakit/dmakit.toml; "" if none.
std::string default_config_path();

// Checks a comma-separated list of power-of-two sizes ("4K,2M,1G"); the
// message names the key.
Status check_size_list(const char* key, const std::string& list);

// Whether v is one of the options.
bool one_of(const std::string& v, std::initializer_list<std::string_view> options);

}  // namespace dmakit::base
