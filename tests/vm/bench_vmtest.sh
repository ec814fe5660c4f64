# Guest test: `dmakit bench arena` on the real VFIO container of the NVMe
# controller. The output must be one JSON object {"bench":"arena",...} whose
# map_unmap results show lazy flushing issuing at most 1% of the unmap calls
# strict mode issues for the same cycles. Runs as `sh -e` in the guest.
set -eu

fail() { echo "FAIL: $*"; exit 1; }

start=$(date +%s)
rc=0
dmakit bench arena --json --iommu.backend vfio --device 0000:00:03.0 >/tmp/bench.out 2>/tmp/bench.err || rc=$?
end=$(date +%s)
out=$(cat /tmp/bench.out)
echo "$out"
echo "bench arena: $((end - start)) s in the guest"
if [ -s /tmp/bench.err ]; then
  echo "stderr:"
  cat /tmp/bench.err
fi
[ "$rc" -eq 0 ] || fail "dmakit bench arena exited with status $rc"

# One object on one line, nothing else on stdout.
[ "$(wc -l </tmp/bench.out)" -eq 1 ] || fail "expected one line of JSON, got $(wc -l </tmp/bench.out)"
case "$out" in
  '{'*'}') ;;
  *) fail "output is not one JSON object" ;;
esac
echo "$out" | grep -q '^{"bench":"arena","results":\[' || fail 'no {"bench":"arena","results":[...]}'

# One result object per line, then the two map_unmap ones.
results=$(echo "$out" | awk '{ gsub(/\},\{/, "}\n{"); print }')
field() { echo "$1" | sed -n "s/.*\"$2\":\([0-9.e+-]*\).*/\1/p"; }
lazy=$(echo "$results" | grep '"case":"map_unmap"' | grep '"mode":"lazy"' || true)
strict=$(echo "$results" | grep '"case":"map_unmap"' | grep '"mode":"strict"' || true)
[ "$(echo "$lazy" | grep -c .)" -eq 1 ] || fail "want one map_unmap lazy result, got: $lazy"
[ "$(echo "$strict" | grep -c .)" -eq 1 ] || fail "want one map_unmap strict result, got: $strict"
echo "$lazy" | grep -q '"backend":"vfio-type1' || fail "lazy case did not run on the VFIO container: $lazy"
echo "$strict" | grep -q '"backend":"vfio-type1' || fail "strict case did not run on the VFIO container: $strict"

lazy_unmaps=$(field "$lazy" unmap_calls)
strict_unmaps=$(field "$strict" unmap_calls)
lazy_cycles=$(field "$lazy" cycles)
strict_cycles=$(field "$strict" cycles)
for v in "$lazy_unmaps" "$strict_unmaps" "$lazy_cycles" "$strict_cycles"; do
  case "$v" in
    '' | *[!0-9]*) fail "unmap_calls/cycles missing or not an integer in: $lazy / $strict" ;;
  esac
done
[ "$lazy_cycles" -eq "$strict_cycles" ] || fail "lazy ran $lazy_cycles cycles, strict $strict_cycles"
[ "$lazy_cycles" -gt 0 ] || fail "no cycles were run"
# Strict unmaps every freed range: one call per cycle.
[ "$strict_unmaps" -eq "$strict_cycles" ] || fail "strict: $strict_unmaps unmap calls for $strict_cycles cycles"
[ "$lazy_unmaps" -ge 1 ] || fail "lazy issued no unmap at all"
[ $((lazy_unmaps * 100)) -le "$strict_unmaps" ] ||
  fail "lazy issued $lazy_unmaps unmap calls, more than 1% of strict's $strict_unmaps"

echo "map_unmap: lazy $lazy_unmaps unmap calls (wall_ms $(field "$lazy" wall_ms)), strict $strict_unmaps (wall_ms $(field "$strict" wall_ms)) for $lazy_cycles cycles"
echo "bench arena: ok"
