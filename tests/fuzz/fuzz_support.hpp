// Shared by the fuzz targets: a finding is an abort with one line that says
// which invariant broke (CI looks for "FUZZ INVARIANT"), and the library's
// logger is silenced once (refusals are expected and would flood the run).
#pragma once

#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>

#include "base/log.hpp"

namespace dmakit::fuzz {

template <class... Args>
[[noreturn]] void violation(fmt::format_string<Args...> f, Args&&... args) {
  std::fprintf(stderr, "FUZZ INVARIANT: %s\n", fmt::format(f, std::forward<Args>(args)...).c_str());
  std::fflush(stderr);
  std::abort();
}

inline void quiet_log() { (void)base::set_log_level("off"); }

}  // namespace dmakit::fuzz
