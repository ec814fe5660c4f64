// Shared state of the dmakit command: the parsed config and global flags.
// Each subcommand lives in its own cmd_*.cpp and registers itself here.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "core/config_cli.hpp"
#include "json.hpp"

namespace dmakit::tool {

struct Tool {
  core::Config cfg;
  bool json = false;
  std::string log_level;  // --log-level; overrides DMAKIT_LOG and log.level
  std::vector<std::string> devices;  // --device, repeatable; replaces iommu.devices
  int exit_code = 0;
};

// Exit codes: 0 success, 1 the operation failed, 2 bad usage or config.
inline constexpr int kExitFailed = 1;
inline constexpr int kExitUsage = 2;

// Applies log level precedence and validates the config; prints and
// returns false on a bad value.
bool prepare(Tool& tool);

void add_info(CLI::App& app, Tool& tool);
void add_bind(CLI::App& app, Tool& tool);
void add_stress(CLI::App& app, Tool& tool);
void add_bench(CLI::App& app, Tool& tool);

// Turns --json on: stdout is kept for emit_json alone (anything else
// written to it goes to stderr).
void json_mode(Tool& tool);
// Prints the command's one JSON object on stdout.
void emit_json(const Json& j);

// Prints an error line "dmakit: <what>" to stderr (or {"error": ...} with --json).
int report_error(const Tool& tool, const std::string& what, int code = kExitFailed);

}  // namespace dmakit::tool
