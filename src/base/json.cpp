#include "base/json.hpp"

#include <cmath>
#include <fmt/format.h>

namespace dmakit::base {

std::string Json::quote(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) out += fmt::format("\\u{:04x}", static_cast<unsigned>(c));
        else out += c;
    }
  }
  return out + "\"";
}

Json& Json::raw(std::string_view key, const std::string& value) {
  if (!first_) body_ += ',';
  first_ = false;
  if (open_ == '{') body_ += quote(key) + ':';
  body_ += value;
  return *this;
}

Json& Json::add(std::string_view key, const Json& value) { return raw(key, value.str()); }
Json& Json::add(std::string_view key, std::string_view value) { return raw(key, quote(value)); }
Json& Json::add(std::string_view key, bool value) { return raw(key, value ? "true" : "false"); }
Json& Json::add(std::string_view key, double value) {
  return raw(key, std::isfinite(value) ? fmt::format("{}", value) : "null");
}
Json& Json::push(const Json& value) { return raw({}, value.str()); }
Json& Json::push(std::string_view value) { return raw({}, quote(value)); }

}  // namespace dmakit::base
