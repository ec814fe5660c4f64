# Guest test: in a 256 MiB guest without hugepages, a stress run whose live
# buffers grow past what the guest has. Buffers come from anonymous memory;
# dmakit must refuse what the host cannot back (counted in the report) and
# finish with every check passed - never be ended by the OOM killer
# (status 137). Runs as `sh -e` in the guest.
set -eu

fail() { echo "FAIL: $*"; exit 1; }

rc=0
dmakit stress --iommu.backend sim --eal.mode nohuge --eal.memory_mb 32 \
  --stress.seconds 6 --stress.threads 2 --stress.max_bytes 67108864 >/tmp/stress.out 2>/tmp/stress.err || rc=$?
cat /tmp/stress.out
if [ -s /tmp/stress.err ]; then
  echo "stderr (last lines):"
  tail -n 5 /tmp/stress.err
fi
[ "$rc" -ne 137 ] || fail "the OOM killer ended dmakit stress"
[ "$rc" -eq 0 ] || fail "dmakit stress exited with status $rc"
refused=$(sed -n 's/.*allocations refused for lack of memory: *\([0-9]*\).*/\1/p' /tmp/stress.out)
[ -n "$refused" ] || fail "no refusal count in the report"
[ "$refused" -gt 0 ] || fail "the run never ran out of memory: the test asks for too little"
grep -q ', 0 failures' /tmp/stress.out || fail "the run reported failures"
grep -q 'mappings left after freeing everything: *0$' /tmp/stress.out || fail "mappings were left"
dmesg | grep -qi 'out of memory' && fail "the kernel logged an OOM kill"
echo "stress in 256 MiB: $refused allocations refused, no OOM kill"
