#include "base/log.hpp"

#include <rte_eal.h>
#include <rte_lcore.h>
#include <rte_log.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

namespace dmakit::base {

namespace {

// The sink of dmakit's own logger: stderr, or the embedding application's
// callback. Switching happens under the sink's lock, so no line is lost or
// sent to a callback that was just replaced.
class RouteSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  void route(LogCallback fn) {
    std::lock_guard lock(mutex_);
    callback_ = std::move(fn);
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    if (callback_) {
      callback_(msg.level, std::string_view(msg.payload.data(), msg.payload.size()));
      return;
    }
    stderr_.log(msg);
  }
  void flush_() override { stderr_.flush(); }
  void set_pattern_(const std::string& pattern) override { stderr_.set_pattern(pattern); }
  void set_formatter_(std::unique_ptr<spdlog::formatter> f) override { stderr_.set_formatter(std::move(f)); }

 private:
  spdlog::sinks::stderr_color_sink_st stderr_;
  LogCallback callback_;
};

struct Logger {
  std::shared_ptr<spdlog::logger> logger;
  std::shared_ptr<RouteSink> route;  // null when the application registered the logger
};

Logger make_logger() {
  if (auto existing = spdlog::get("dmakit")) return {existing, nullptr};  // the host application's
  auto route = std::make_shared<RouteSink>();
  auto logger = std::make_shared<spdlog::logger>("dmakit", route);
  logger->set_pattern("[%H:%M:%S.%e] [dmakit] [%^%l%$] %v");
  logger->set_level(env_log_level().value_or(spdlog::level::warn));
  // Registered so an application can find it; a registration race is harmless.
  try {
    spdlog::register_logger(logger);
  } catch (const spdlog::spdlog_ex&) {
  }
  return {logger, route};
}

Logger& the_logger() {
  static Logger l = make_logger();
  return l;
}

}  // namespace

spdlog::logger& log() { return *the_logger().logger; }

Status set_log_callback(LogCallback fn) {
  auto& route = the_logger().route;
  if (route == nullptr)
    return fail(Errc::busy, "the application registered its own spdlog logger 'dmakit'; its sinks receive the lines");
  route->route(std::move(fn));
  return ok();
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
