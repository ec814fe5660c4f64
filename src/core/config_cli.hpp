// The settings table as CLI11 options. For .cpp files and the tool only:
// this header includes CLI11.
#pragma once

#include <string>

#include "base/config_cli.hpp"
#include "core/config.hpp"

namespace dmakit::core {

// Adds "--config FILE" and every setting as "--section.key" to app, bound to
// cfg. Values from the file are checked by the settings table before CLI11
// applies them; flags given on the command line override the file.
void add_config_options(CLI::App& app, Config& cfg, std::string default_path);

}  // namespace dmakit::core
