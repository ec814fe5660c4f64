// The one owner of DPDK's EAL in a process. rte_eal_init can run once per
// process (a second call fails with EALREADY, even after rte_eal_cleanup), so
// every layer that needs DPDK memory goes through ensure_eal(). If the host
// application already started the EAL, dmakit uses it as it is.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/settings.hpp"
#include "base/error.hpp"

namespace dmakit::base {

struct HugepageCounts {
  uint64_t total = 0, free = 0, reserved = 0, surplus = 0, overcommit = 0;
  // Pages an --in-memory EAL can still take: free - reserved + (overcommit - surplus).
  uint64_t available() const;
};

// Reads /sys/kernel/mm/hugepages/hugepages-<kb>kB/*; all zero when absent.
HugepageCounts read_hugepages(uint64_t page_kb = 2048);

// eal.extra_args, checked before the EAL sees them: only options that tune
// memory and logging are passed on. Anything else - --help or -h (DPDK
// prints its usage and exits), an unknown option (usage on stdout, init
// fails), a second -l or --file-prefix (dmakit sets them) or a bare word - is
// Errc::invalid_argument naming the argument.
Status check_eal_extra_args(const std::string& extra_args);

struct EalInfo {
  bool started_by_dmakit = false;  // false: the host application owns the EAL
  bool hugepages = false;          // EAL memory is hugepage backed
  std::string reason;              // why this mode was chosen, for the user
  std::string file_prefix;
  std::vector<std::string> args;   // the argument list given to rte_eal_init
};

// The argument list ensure_eal would use for these settings and hugepage
// counts, plus the reason; no EAL call. Exposed for tests.
Result<EalInfo> plan_eal(const EalSettings& s, const HugepageCounts& huge);

// Starts the EAL once (later calls return the same info). Mode "auto" picks
// "--in-memory --iova-mode=va --no-pci" when a 2 MiB hugepage can be had,
// else "--no-huge --no-shconf -m N". Logs the choice and its reason at info.
Result<const EalInfo*> ensure_eal(const EalSettings& s);

// The EAL state if ensure_eal succeeded, else nullptr.
const EalInfo* eal_info();

}  // namespace dmakit::base
