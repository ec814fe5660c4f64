// A minimal JSON writer for the tool's --json output and the benchmarks:
// objects and arrays built in order, strings escaped, nothing parsed.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace dmakit::base {

class Json {
 public:
  static Json object() { return Json('{'); }
  static Json array() { return Json('['); }

  // Object members.
  Json& add(std::string_view key, const Json& value);
  Json& add(std::string_view key, std::string_view value);
  Json& add(std::string_view key, const char* value) { return add(key, std::string_view(value)); }
  Json& add(std::string_view key, const std::string& value) { return add(key, std::string_view(value)); }
  Json& add(std::string_view key, bool value);
  Json& add(std::string_view key, double value);
  template <class T>
    requires(std::is_integral_v<T> && !std::is_same_v<T, bool>)
  Json& add(std::string_view key, T value) {
    return raw(key, std::to_string(value));
  }

  // Array elements.
  Json& push(const Json& value);
  Json& push(std::string_view value);
  template <class T>
    requires(std::is_integral_v<T> && !std::is_same_v<T, bool>)
  Json& push(T value) {
    return raw({}, std::to_string(value));
  }

  std::string str() const { return body_ + (open_ == '{' ? "}" : "]"); }

  static std::string quote(std::string_view s);

 private:
  explicit Json(char open) : open_(open), body_(1, open) {}
  Json& raw(std::string_view key, const std::string& value);

  char open_;
  std::string body_;
  bool first_ = true;
};

}  // namespace dmakit::base
