// One named spdlog logger ("dmakit") for the whole library, and the bridge
// that routes DPDK's EAL log into it.
#pragma once

#include <spdlog/spdlog.h>

#include <functional>
#include <optional>
#include <string_view>

#include "base/error.hpp"

namespace dmakit::base {

// The library's logger. Created on first use at the level named by the
// environment variable DMAKIT_LOG (default "warn").
spdlog::logger& log();

// Parses trace|debug|info|warn|error|critical|off.
Result<spdlog::level::level_enum> parse_log_level(std::string_view name);

// Sets the level; "" keeps the current one. Order of precedence used by the
// tool: --log-level flag, then DMAKIT_LOG, then log.level in the config file.
Status set_log_level(std::string_view name);

// Sends each log line's text (no prefix, no newline) to fn instead of
// stderr; an empty fn restores stderr. fn runs on the logging thread under
// the sink's lock, one line at a time. Errc::busy when the application
// registered its own spdlog logger named "dmakit" (its sinks decide then).
using LogCallback = std::function<void(spdlog::level::level_enum, std::string_view)>;
Status set_log_callback(LogCallback fn);

// The level DMAKIT_LOG asks for, if set and valid.
std::optional<spdlog::level::level_enum> env_log_level();

// Sends everything DPDK logs through log(): EAL INFO/NOTICE become debug,
// WARNING warn, ERR and worse error, so EAL is quiet at the default level.
// Must run before rte_eal_init to catch its start-up messages.
Status route_dpdk_log();

}  // namespace dmakit::base
