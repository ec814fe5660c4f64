#include "base/fault_inject.hpp"

#include <array>
#include <mutex>

namespace dmakit::base::fault {

namespace {
struct State {
  bool armed = false;
  uint64_t nth = 0, times = 0, err = 0;
  uint64_t calls = 0, fired = 0;
};
std::mutex g_mu;
std::array<State, static_cast<size_t>(Point::count)> g_state;
uint32_t g_armed_points = 0;

constexpr std::array<std::string_view, static_cast<size_t>(Point::count)> kNames = {
    "sim_map",           "sim_unmap",        "anon_reserve_mmap",
    "anon_commit_mprotect", "anon_madvise_dontfork", "anon_madvise_populate", "anon_release_mmap",
    "hugepage_memzone",  "eal_init",         "allocator_eventfd",     "device_eventfd",
};
}  // namespace

std::string_view name(Point p) {
  const auto i = static_cast<size_t>(p);
  return i < kNames.size() ? kNames[i] : "unknown";
}

namespace detail {
std::atomic<bool> g_armed{false};

int fire(Point p) {
  std::lock_guard lock(g_mu);
  State& s = g_state[static_cast<size_t>(p)];
  if (!s.armed) return 0;
  const uint64_t n = s.calls++;
  if (n < s.nth || n - s.nth >= s.times) return 0;
  ++s.fired;
  return static_cast<int>(s.err);
}
}  // namespace detail

Arm::Arm(Point point, uint64_t nth, int err, uint64_t times) : point_(point) {
  std::lock_guard lock(g_mu);
  State& s = g_state[static_cast<size_t>(point)];
  s = State{true, nth, times, static_cast<uint64_t>(err), 0, 0};
  ++g_armed_points;
  detail::g_armed.store(true, std::memory_order_seq_cst);
}

Arm::~Arm() {
  std::lock_guard lock(g_mu);
  g_state[static_cast<size_t>(point_)].armed = false;
  if (--g_armed_points == 0) detail::g_armed.store(false, std::memory_order_seq_cst);
}

uint64_t Arm::calls() const {
  std::lock_guard lock(g_mu);
  return g_state[static_cast<size_t>(point_)].calls;
}

uint64_t Arm::fired() const {
  std::lock_guard lock(g_mu);
  return g_state[static_cast<size_t>(point_)].fired;
}

}  // namespace dmakit::base::fault
