// The EAL's runtime directory, owned with care.
//
// As root, rte_eal_init creates <base>/<prefix> (base = /var/run/dpdk; as a
// user $XDG_RUNTIME_DIR/dpdk or /tmp/dpdk) even with --in-memory, and leaves
// it behind on every abnormal end. dmakit removes only what it can prove it
// created:
//   - the prefix is a plain name (letters, digits, '_', '-', '.'; not "." or
//     ".."; at most 64 bytes), so <base>/<prefix> can never leave <base>;
//   - a directory that already exists is another process's: refused, unless
//     it is a stale one of a dead dmakit process (below);
//   - once the EAL made it, dmakit drops an owner file (dmakit.owner: pid and
//     the process start time) into it, and at exit removes that file and then
//     the directory with rmdir(), which fails on anything it did not expect;
//   - stale directories are those whose owner file names a process that is
//     gone (its pid is free, or now belongs to a process started at another
//     time), and empty ones named dmakit-<pid> of a pid that is gone (left by
//     a dmakit killed before it wrote its owner file). Only these are
//     reclaimed, again by unlink of the owner file and rmdir.
// Nothing is ever removed recursively.
#pragma once

#include <string>
#include <string_view>

#include "base/error.hpp"

namespace dmakit::base {

inline constexpr std::string_view kRuntimeOwnerFile = "dmakit.owner";

// Errc::invalid_argument naming the prefix and the rule it breaks.
Status check_file_prefix(std::string_view prefix);

// Where this process's EAL puts runtime directories (DPDK's rule).
std::string eal_runtime_base();

// Before rte_eal_init: reclaims stale dmakit directories under base, then
// checks that <base>/<prefix> does not exist (reclaiming it if it is stale).
// Errc::exists when another process's directory is there. Returns the
// number of stale directories reclaimed.
Result<unsigned> prepare_runtime_dir(const std::string& base, std::string_view prefix);

// After rte_eal_init created <base>/<prefix>: writes the owner file.
Status claim_runtime_dir(const std::string& dir);

// Removes the owner file and the directory if this process owns it and it
// holds nothing else; never recursive. Returns true when the directory is gone.
bool release_runtime_dir(const std::string& dir);

}  // namespace dmakit::base
