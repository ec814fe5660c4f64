#!/usr/bin/env bash
# Configures the clang-16 tree (DMAKIT_FUZZ=ON: ASan + UBSan + libFuzzer
# coverage everywhere) that scripts/ci/sanitize.sh asan and
# scripts/ci/fuzz.sh share: the library, the tool (the unit tests run it),
# the unit tests and the fuzz targets. -O1 and line tables only: a
# sanitizer report needs file:line, and the tree builds in less time.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
CC=clang-16 CXX=clang++-16 cmake -S "$src" -B "${1:-$src/build-fuzz}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only -DNDEBUG" \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only -DNDEBUG" \
  -DDMAKIT_FUZZ=ON -DDMAKIT_BUILD_TESTS=ON -DDMAKIT_BUILD_TOOLS=ON -DDMAKIT_BUILD_EXAMPLES=OFF \
  -DDMAKIT_VM_TESTS=OFF -DDMAKIT_INSTALL=OFF >/dev/null
