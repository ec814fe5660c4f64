#!/usr/bin/env bash
# Configures the clang-16 tree (DMAKIT_FUZZ=ON: ASan + UBSan + libFuzzer
# coverage everywhere) that scripts/ci/sanitize.sh asan and
# scripts/ci/fuzz.sh share: the library, the unit tests and the fuzz targets.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
CC=clang-16 CXX=clang++-16 cmake -S "$src" -B "${1:-$src/build-fuzz}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DDMAKIT_FUZZ=ON -DDMAKIT_BUILD_TESTS=ON -DDMAKIT_BUILD_TOOLS=OFF -DDMAKIT_BUILD_EXAMPLES=OFF \
  -DDMAKIT_VM_TESTS=OFF -DDMAKIT_INSTALL=OFF >/dev/null
