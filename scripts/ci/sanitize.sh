#!/usr/bin/env bash
# The sanitizer jobs of CI (.ci/run); also run by hand from any directory:
#
#   scripts/ci/sanitize.sh asan   unit tests (label unit) under AddressSanitizer
#                                 + UndefinedBehaviorSanitizer, in build-fuzz/
#   scripts/ci/sanitize.sh tsan   the tests that start threads (label threads)
#                                 under ThreadSanitizer, in build-tsan/
#   scripts/ci/sanitize.sh        both
#   scripts/ci/sanitize.sh --build-only [asan] [tsan]
#                                 only build the trees (CI builds them in the
#                                 background while the README's tests run)
#
# ASan + UBSan share the clang-16 tree of the fuzz targets (scripts/ci/fuzz.sh
# builds in it too): one sanitized library serves both jobs. TSan builds with
# gcc. DPDK from Debian is not instrumented, which ASan and UBSan accept as
# it is. The trees hold the library, the tests and the fuzz targets only: no
# examples or guest tests (the tool is built: the unit tests run it). Any finding stops the test that hit it
# (-fno-sanitize-recover=all, halt_on_error) and fails the job. Each job
# prints its build and test times.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
build_only=0
if [ "${1:-}" = --build-only ]; then build_only=1; shift; fi
which=("$@")
[ ${#which[@]} -eq 0 ] && which=(asan tsan)

symbolizer=$(command -v llvm-symbolizer-16 || command -v llvm-symbolizer || true)
[ -n "$symbolizer" ] && export ASAN_SYMBOLIZER_PATH="$symbolizer"

configure() {  # dir, extra cmake args...
  local dir=$1; shift
  cmake -S "$src" -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=gcc -DCMAKE_CXX_COMPILER=g++ \
    -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" \
    -DDMAKIT_BUILD_TOOLS=OFF -DDMAKIT_BUILD_EXAMPLES=OFF -DDMAKIT_VM_TESTS=OFF -DDMAKIT_INSTALL=OFF "$@" >/dev/null
}

timed() {  # label, command...
  local label=$1; shift
  local t0=$SECONDS
  "$@"
  echo "sanitize: $label took $((SECONDS - t0)) s"
}

asan() {
  local dir=$src/build-fuzz
  bash "$src/scripts/ci/clang-tree.sh" "$dir"
  timed "asan build" cmake --build "$dir" -j2
  [ $build_only -eq 1 ] && return 0
  # detect_leaks: a leak is a finding too. The unit tests that check the
  # library's threads and memory read /proc; nothing here needs ptrace.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    timed "asan+ubsan unit tests" ctest --test-dir "$dir" -L unit -j2 --output-on-failure
}

tsan() {
  local dir=$src/build-tsan
  configure "$dir" -DDMAKIT_TSAN=ON
  # Only the executables that hold tests labelled `threads` (tests/CMakeLists.txt).
  local targets
  targets=$(sed -n 's/^set(threads_\([a-z_]*\) .*/\1/p' "$src/tests/CMakeLists.txt")
  timed "tsan build" cmake --build "$dir" -j2 --target $targets
  [ $build_only -eq 1 ] && return 0
  TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$src/scripts/ci/tsan.supp" \
    timed "tsan threaded tests" ctest --test-dir "$dir" -L threads -j2 --output-on-failure
}

for j in "${which[@]}"; do
  case $j in
    asan) asan ;;
    tsan) tsan ;;
    *) echo "usage: $0 [asan] [tsan]" >&2; exit 2 ;;
  esac
done
