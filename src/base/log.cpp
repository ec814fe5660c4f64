#include "base/log.hpp"

#include <rte_log.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

namespace dmakit::base {

namespace {

std::shared_ptr<spdlog::logger> make_logger() {
  auto existing = spdlog::get("dmakit");
  if (existing) return existing;  // the host application registered its own
  auto logger = spdlog::stderr_color_mt("dmakit");
  logger->set_pattern("[%H:%M:%S.%e] [dmakit] [%^%l%$] %v");
  logger->set_level(env_log_level().value_or(spdlog::level::warn));
  return logger;
}

}  // namespace

spdlog::logger& log() {
  static std::shared_ptr<spdlog::logger> logger = make_logger();
  return *logger;
}

Result<spdlog::level::level_enum> parse_log_level(std::string_view name) {
  static constexpr std::pair<std::string_view, spdlog::level::level_enum> kLevels[] = {
      {"trace", spdlog::level::trace}, {"debug", spdlog::level::debug},
      {"info", spdlog::level::info},   {"warn", spdlog::level::warn},
      {"warning", spdlog::level::warn}, {"error", spdlog::level::err},
      {"critical", spdlog::level::critical}, {"off", spdlog::level::off}};
  for (const auto& [n, l] : kLevels)
    if (n == name) return l;
  return fail(Errc::invalid_argument,
              "unknown log level '{}' (expected trace, debug, info, warn, error, critical or off)",
              name);
}

Status set_log_level(std::string_view name) {
  if (name.empty()) return ok();
  auto level = DMAKIT_TRY(parse_log_level(name));
  log().set_level(level);
  return ok();
}

std::optional<spdlog::level::level_enum> env_log_level() {
  const char* env = std::getenv("DMAKIT_LOG");
  if (env == nullptr || *env == '\0') return std::nullopt;
  auto level = parse_log_level(env);
  if (!level) return std::nullopt;
  return *level;
}

namespace {

// fopencookie write hook: DPDK formats a message, then writes it, possibly in
// pieces; lines are assembled and emitted at the level of the current message.
ssize_t dpdk_log_write(void*, const char* buf, size_t size) {
  static std::mutex mu;
  static std::string pending;
  std::lock_guard lock(mu);
  pending.append(buf, size);
  size_t nl;
  while ((nl = pending.find('\n')) != std::string::npos) {
    std::string line = pending.substr(0, nl);
    pending.erase(0, nl + 1);
    if (line.empty()) continue;
    int lvl = rte_log_cur_msg_loglevel();
    spdlog::level::level_enum level = spdlog::level::debug;
    if (lvl > 0 && lvl <= static_cast<int>(RTE_LOG_ERR)) level = spdlog::level::err;
    else if (lvl == static_cast<int>(RTE_LOG_WARNING)) level = spdlog::level::warn;
    else if (lvl == static_cast<int>(RTE_LOG_DEBUG)) level = spdlog::level::trace;
    log().log(level, "eal: {}", line);
  }
  return static_cast<ssize_t>(size);
}

}  // namespace

Status route_dpdk_log() {
  static FILE* stream = [] {
    cookie_io_functions_t io{};
    io.write = dpdk_log_write;
    FILE* f = fopencookie(nullptr, "w", io);
    if (f != nullptr) setvbuf(f, nullptr, _IOLBF, 0);
    return f;
  }();
  if (stream == nullptr) return fail_errno(errno, "fopencookie for the DPDK log stream");
  if (rte_openlog_stream(stream) != 0) return fail(Errc::internal, "rte_openlog_stream refused the stream");
  return ok();
}

}  // namespace dmakit::base
