// The config file reader (CLI11's TOML parser behind core::load_config_file)
// on arbitrary bytes. The file is a memfd, read through /proc/self/fd: no
// disk I/O per input. The reader must answer every input with a Config or an
// error value - an exception escaping it or a crash is a finding - and a
// Config it accepts must pass validate().
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/config.hpp"
#include "fuzz_support.hpp"

using namespace dmakit;

namespace {
int memfd = -1;
std::string path;
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet_log();
  memfd = ::memfd_create("dmakit-fuzz-config", MFD_CLOEXEC);
  if (memfd < 0) fuzz::violation("memfd_create failed");
  path = "/proc/self/fd/" + std::to_string(memfd);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 64 * 1024) return 0;  // the reader refuses files above 1 MiB; keep runs fast
  if (::ftruncate(memfd, 0) != 0 || ::pwrite(memfd, data, size, 0) != static_cast<ssize_t>(size))
    fuzz::violation("cannot write the memfd");
  auto cfg = core::load_config_file(path);
  if (cfg) {
    if (auto st = core::validate(*cfg); !st) fuzz::violation("accepted config fails validate(): {}", st.error().message);
  } else if (cfg.error().message.empty()) {
    fuzz::violation("config refused without a message");
  }
  return 0;
}
