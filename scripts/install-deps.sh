#!/usr/bin/env bash
# Installs everything dmakit needs to build and test on Debian bookworm, from
# Debian's packages only. Idempotent: packages already present are skipped and
# `apt-get update` runs at most once, only when something is missing.
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  libdpdk-dev libspdlog-dev libfmt-dev libcli11-dev googletest libgtest-dev libgmock-dev
  # JSON of the dmakit command and the benchmarks (header-only; not in installed headers)
  nlohmann-json3-dev
  # sanitizer and fuzzing jobs (scripts/ci): clang 16 is the first Debian
  # clang that compiles std::expected; libFuzzer and the sanitizer runtimes;
  # llvm-symbolizer for readable reports
  clang-16 libclang-rt-16-dev llvm-16
  # QEMU guest for the real-VFIO tests (tests/vm)
  qemu-system-x86 busybox-static cpio xz-utils zstd kmod
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages: ${missing[*]}; run as root (or with sudo)" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
