// dmakit: inspect the IOMMU, bind devices to vfio-pci, stress and benchmark
// the DMA allocators.
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <iostream>

#include "json.hpp"
#include "base/log.hpp"
#include "tool.hpp"

namespace dmakit::tool {

bool prepare(Tool& tool) {
  if (!tool.devices.empty()) {
    std::string list;
    for (const auto& d : tool.devices) list += (list.empty() ? "" : ",") + d;
    tool.cfg.iommu.devices = list;
  }
  if (auto st = core::validate(tool.cfg); !st) {
    report_error(tool, "config: " + st.error().message, kExitUsage);
    return false;
  }
  // Precedence: --log-level, then DMAKIT_LOG, then log.level from the config.
  std::string level = tool.log_level;
  if (level.empty() && !base::env_log_level()) level = tool.cfg.log.level;
  if (auto st = base::set_log_level(level); !st) {
    report_error(tool, "--log-level: " + st.error().message, kExitUsage);
    return false;
  }
  return true;
}

namespace {
int g_json_fd = STDOUT_FILENO;  // where emit_json writes: the real stdout
}  // namespace

void json_mode(Tool& tool) {
  tool.json = true;
  // Under --json stdout carries the one object alone: whatever else would
  // print there (the EAL, a library) goes to stderr instead.
  std::cout.flush();
  std::fflush(stdout);
  const int saved = ::dup(STDOUT_FILENO);
  if (saved < 0 || ::dup2(STDERR_FILENO, STDOUT_FILENO) < 0) return;
  g_json_fd = saved;
}

void emit_json(const Json& j) {
  const std::string text = j.dump() + "\n";
  for (size_t done = 0; done < text.size();) {
    const ssize_t n = ::write(g_json_fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

int report_error(const Tool& tool, const std::string& what, int code) {
  if (tool.json) {
    emit_json(Json{{"error", what}, {"exit_code", code}});
  } else {
    std::cerr << "dmakit: " << what << "\n";
  }
  return code;
}

}  // namespace dmakit::tool

int main(int argc, char** argv) {
  using namespace dmakit;
  tool::Tool tool;
  // --json is known before anything is parsed, so an error found while
  // parsing (or in DMAKIT_CONFIG) is reported as JSON too.
  for (int i = 1; i < argc && std::strcmp(argv[i], "--") != 0; ++i)
    if (std::strcmp(argv[i], "--json") == 0) tool::json_mode(tool);
  CLI::App app{"dmakit - DMA memory for user-space drivers over VFIO", "dmakit"};
  app.require_subcommand(1);
  app.fallthrough();  // global flags (--json, --config, settings) may follow the subcommand
  app.set_version_flag("--version", std::string("dmakit ") + DMAKIT_VERSION);
  app.add_flag("--json", tool.json, "print one JSON object");
  app.add_option("--log-level", tool.log_level,
                 "trace|debug|info|warn|error|critical|off (overrides DMAKIT_LOG and log.level)");
  app.add_option("--device", tool.devices,
                 "PCI device (BDF) whose IOMMU group the context attaches; repeat for several (replaces "
                 "iommu.devices)")
      ->allow_extra_args(false);
  // A config named by the environment must exist and be a small regular
  // file: ignoring it silently would run with other settings than meant.
  if (const char* env = std::getenv("DMAKIT_CONFIG"); env != nullptr && *env != '\0') {
    if (auto st = base::check_config_file(env); !st)
      return tool::report_error(tool, "DMAKIT_CONFIG: " + st.error().message, tool::kExitUsage);
  }
  core::add_config_options(app, tool.cfg, base::default_config_path());

  tool::add_info(app, tool);
  tool::add_bind(app, tool);
  tool::add_stress(app, tool);
  tool::add_bench(app, tool);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::FileError& e) {
    return tool::report_error(tool, std::string("config: ") + e.what(), tool::kExitUsage);
  } catch (const CLI::ParseError& e) {
    return tool::report_error(tool, base::describe_parse_error(e), tool::kExitUsage);
  }
  return tool.exit_code;
}
