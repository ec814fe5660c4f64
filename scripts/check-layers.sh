#!/usr/bin/env bash
# Checks that calls go down only: base <- iommu <- alloc_buffer <- pool <- core <- tools,
# that ioctls stay in src/iommu and DPDK calls in the memory sources and the EAL owner,
# that the public headers (include/dmakit/) and the examples do not reach into src/,
# and that no header under src/ but the config_cli ones brings in CLI11.
set -euo pipefail
root=${1:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$root"
layers=(base iommu alloc_buffer pool core)
fail=0
for i in "${!layers[@]}"; do
  layer=${layers[$i]}
  for j in "${!layers[@]}"; do
    [ "$j" -gt "$i" ] || continue
    upper=${layers[$j]}
    if hits=$(grep -rnE "#include \"${upper}/" "src/$layer" 2>/dev/null); then
      echo "layer violation: src/$layer includes src/$upper:"; echo "$hits"; fail=1
    fi
  done
done
if hits=$(grep -rnE '\bioctl\s*\(' src tools bench --include='*.cpp' --include='*.hpp' | grep -v '^src/iommu/'); then
  echo "ioctl outside src/iommu:"; echo "$hits"; fail=1
fi
# DPDK: only the EAL owner and the memory sources (src/alloc_buffer) include rte_ headers;
# bench/ may use rte_mempool as a baseline.
if hits=$(grep -rnE '#include <rte_' src tools | grep -vE '^src/base/(eal|log)\.cpp:|^src/alloc_buffer/'); then
  echo "DPDK include outside the EAL owner and memory sources:"; echo "$hits"; fail=1
fi
# include/dmakit/ is what gets installed: public headers include each other and
# outside headers only, never the internal ones under src/.
if hits=$(grep -rnE '#include\s*[<"](base|iommu|alloc_buffer|pool|core)/' include); then
  echo "public header includes an internal one:"; echo "$hits"; fail=1
fi
# The example drivers see the public API alone: no internal header, no DPDK.
if [ -d examples ] && hits=$(grep -rnE '#include\s*[<"]((base|iommu|alloc_buffer|pool|core)/|rte_)' examples); then
  echo "example includes an internal or DPDK header:"; echo "$hits"; fail=1
fi
# CLI11 stays out of every layer's interface: under src/ only base/config_cli.hpp
# includes it, and only .cpp files (and core/config_cli.hpp) include a config_cli.hpp.
if hits=$(grep -rnE '#include <CLI/|#include "[a-z_]+/config_cli\.hpp"' src --include='*.hpp' |
          grep -vE '^src/base/config_cli\.hpp:[0-9]+:#include <CLI/|^src/core/config_cli\.hpp:[0-9]+:#include "base/config_cli\.hpp"'); then
  echo "CLI11 in a header under src/:"; echo "$hits"; fail=1
fi
[ $fail -eq 0 ] && echo "layers: ok"
exit $fail
