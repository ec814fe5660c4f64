// The generic part of dmakit's configuration that needs no CLI11: checking
// and printing a setting's textual value, sizes ("2M"), size lists and where
// the config file is looked for. The flag and TOML reading is in
// base/config_cli.hpp (CLI11; for .cpp files and the tool only); each layer
// owns its section struct (its settings.hpp); core/config.hpp holds the Config
// aggregate and the table of every setting.
#pragma once

#include <charconv>
#include <cstdint>
#include <cstdlib>
#include <fmt/format.h>
#include <initializer_list>
#include <string>
#include <string_view>
#include <type_traits>

#include "base/error.hpp"

namespace dmakit::base {

// Checks that `text` is a value of type T (bool, unsigned/integer, floating
// point; any text for a string); the message names the key.
template <class T>
Status check_value(const std::string& key, const std::string& text) {
  if constexpr (std::is_same_v<T, bool>) {
    if (text == "true" || text == "false") return ok();
    return fail(Errc::invalid_argument, "key '{}': '{}' is not a boolean (true or false)", key, text);
  } else if constexpr (std::is_integral_v<T>) {
    T v{};
    auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc() || p != text.data() + text.size())
      return fail(Errc::invalid_argument, "key '{}': '{}' is not a non-negative integer in range", key, text);
    return ok();
  } else if constexpr (std::is_floating_point_v<T>) {
    char* end = nullptr;
    std::strtod(text.c_str(), &end);
    if (text.empty() || end != text.c_str() + text.size())
      return fail(Errc::invalid_argument, "key '{}': '{}' is not a number", key, text);
    return ok();
  } else {
    return ok();
  }
}

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

// Parses "4K", "2M", "1G", "65536" into bytes.
Result<uint64_t> parse_size(std::string_view text);

// Checks a comma-separated list of power-of-two sizes ("4K,2M,1G"); the
// message names the key.
Status check_size_list(const char* key, const std::string& list);

// Whether v is one of the options.
bool one_of(const std::string& v, std::initializer_list<std::string_view> options);

}  // namespace dmakit::base
