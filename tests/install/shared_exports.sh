#!/usr/bin/env bash
# shared_exports.sh: libdmakit.so carries its SONAME and exports the public
# API and nothing else.
#   - every dmakit_* function declared in dmakit.h is exported (the names are
#     read from the preprocessed header), and no other C symbol;
#   - no C++ symbol at all: the C++ API (dmakit.hpp) is header-only over the
#     C one, so nothing of the internal namespaces, std::, fmt, spdlog, CLI11
#     or DPDK may leave the library.
set -euo pipefail

die() { echo "shared_exports: FAIL: $*" >&2; exit 1; }

lib= soname= header= cc=cc includes=()
while [ $# -gt 0 ]; do
  case $1 in
    --lib) lib=$2; shift 2 ;;
    --soname) soname=$2; shift 2 ;;
    --header) header=$2; shift 2 ;;
    --cc) cc=$2; shift 2 ;;
    --include) includes+=("-I$2"); shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
[ -f "$lib" ] || die "$lib is not built (build the project before running the tests)"
[ -f "$header" ] || die "no header $header"

actual_soname=$(LC_ALL=C readelf -d "$lib" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
echo "SONAME: $actual_soname"
[ -n "$actual_soname" ] || die "$lib has no SONAME"
[[ $actual_soname =~ ^libdmakit\.so\.[0-9]+$ ]] || die "SONAME $actual_soname is not libdmakit.so.<major>"
[ -z "$soname" ] || [ "$actual_soname" = "$soname" ] || die "SONAME $actual_soname, the build says $soname"

# The declared API: function names from the preprocessed header (no comments).
# Static inline helpers (the MMIO accessors) live in the caller's code, not
# in the library.
preprocessed=$("$cc" -E -P -x c "${includes[@]}" "$header")
mapfile -t inline_fns < <(grep -oE 'static inline [^(]*\bdmakit_[A-Za-z0-9_]+[[:space:]]*\(' <<<"$preprocessed" |
  grep -oE 'dmakit_[A-Za-z0-9_]+' | sort -u)
mapfile -t declared < <(grep -oE '\bdmakit_[A-Za-z0-9_]+[[:space:]]*\(' <<<"$preprocessed" | sed 's/[[:space:](]//g' |
  sort -u | grep -vxF -f <(printf '%s\n' "${inline_fns[@]}" ""))
[ ${#declared[@]} -gt 0 ] || die "no dmakit_* function found in $header"

mapfile -t exported < <(nm -D --defined-only "$lib" | awk '{print $NF}' | sed 's/@.*//' | sort -u)
mapfile -t demangled < <(nm -D --defined-only -C "$lib" | cut -d' ' -f3- | sed 's/@.*//' | sort -u)
echo "exported: ${#exported[@]} symbols; declared in $(basename "$header"): ${#declared[@]} functions"

# Sets, not `printf | grep -q` pipelines: with pipefail, grep -q quitting
# early makes printf's SIGPIPE fail the test at random.
declare -A is_exported=() is_declared=()
for name in "${exported[@]}"; do is_exported[$name]=1; done
for name in "${declared[@]}"; do is_declared[$name]=1; done

fail=0
for name in "${declared[@]}"; do
  if [ -z "${is_exported[$name]:-}" ]; then
    echo "missing: $name (declared in $(basename "$header"), not exported; DMAKIT_API?)"; fail=1
  fi
done

for sym in "${demangled[@]}"; do
  if [[ $sym =~ ^dmakit_[A-Za-z0-9_]+$ ]]; then
    [ -n "${is_declared[$sym]:-}" ] || { echo "unexpected C symbol: $sym (not in $(basename "$header"))"; fail=1; }
  else
    echo "unexpected symbol: $sym"; fail=1
  fi
done
[ $fail -eq 0 ] || die "libdmakit.so exports differ from the public API"
printf '  %s\n' "${demangled[@]}"
echo "shared_exports: ok"
