// The library's side of the error model (dmakit/error.hpp): building errors
// with formatted messages, mapping errno, and propagating them.
#pragma once

#include <cerrno>
#include <fmt/format.h>
#include <string>
#include <string_view>
#include <utility>

#include "dmakit/error.hpp"

namespace dmakit {

// Maps an errno value to the closest Errc.
Errc errc_from_errno(int err) noexcept;

inline std::unexpected<Error> fail(Errc code, std::string message) {
  return std::unexpected(Error{code, 0, std::move(message)});
}

template <class... Args>
std::unexpected<Error> fail(Errc code, fmt::format_string<Args...> f, Args&&... args) {
  return std::unexpected(Error{code, 0, fmt::format(f, std::forward<Args>(args)...)});
}

// Error from an errno value; the message should name the call and the object,
// e.g. fail_errno(errno, "VFIO_GROUP_GET_STATUS on /dev/vfio/7").
inline std::unexpected<Error> fail_errno(int err, std::string message) {
  return std::unexpected(Error{errc_from_errno(err), err, std::move(message)});
}

template <class... Args>
std::unexpected<Error> fail_errno(int err, fmt::format_string<Args...> f, Args&&... args) {
  return std::unexpected(
      Error{errc_from_errno(err), err, fmt::format(f, std::forward<Args>(args)...)});
}

inline Status ok() { return {}; }

// Prefixes context onto an error travelling up: "while X: <inner message>".
inline Error with_context(Error e, std::string_view context) {
  e.message = std::string(context) + ": " + e.message;
  return e;
}

}  // namespace dmakit

// Propagates the error of a Result expression, or yields its value
// (a GNU statement expression: GCC and Clang, which is all dmakit targets).
#define DMAKIT_TRY(expr)                                      \
  __extension__({                                             \
    auto&& dmakit_try_r_ = (expr);                            \
    if (!dmakit_try_r_) return std::unexpected(std::move(dmakit_try_r_).error()); \
    std::move(dmakit_try_r_).value();                         \
  })
