# Guest test: strict overcommit (vm.overcommit_memory=2), where every
# writable private mapping is charged at mmap time, MAP_NORESERVE or not.
# On the real vfio-pci devices behind a 48-bit IOMMU, `dmakit stress` must
# start (the IOVA arena reserves nothing for the whole window) and finish
# with every check passed, on hugepages and on 4 KiB pages. Runs as `sh -e`
# in the guest; puts the overcommit settings back.
set -eu

fail() { echo "FAIL: $*"; exit 1; }

old_mode=$(cat /proc/sys/vm/overcommit_memory)
old_ratio=$(cat /proc/sys/vm/overcommit_ratio)
restore() {
  echo "$old_mode" >/proc/sys/vm/overcommit_memory
  echo "$old_ratio" >/proc/sys/vm/overcommit_ratio
}
trap restore EXIT
# The guest has no swap: CommitLimit = RAM * ratio / 100.
echo 100 >/proc/sys/vm/overcommit_ratio
echo 2 >/proc/sys/vm/overcommit_memory
grep -E '^(CommitLimit|Committed_AS)' /proc/meminfo

for mode in huge nohuge; do
  rc=0
  dmakit stress --device 0000:00:03.0 --eal.mode "$mode" --eal.memory_mb 64 --stress.seconds 3 --stress.threads 2 \
    --stress.max_bytes 33554432 --json >/tmp/stress.json 2>/tmp/stress.err || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "eal.mode=$mode: dmakit stress exited with status $rc"
    cat /tmp/stress.json
    tail -n 20 /tmp/stress.err
    fail "dmakit stress did not run under vm.overcommit_memory=2 (eal.mode=$mode)"
  fi
  tr ',' '\n' </tmp/stress.json | grep -E '"(ops|failures|backend)"' | tr '\n' ' '
  echo
  grep -q '"backend": *"vfio' /tmp/stress.json || fail "eal.mode=$mode: not on the VFIO backend"
  grep -q '"failures": *0[,}]' /tmp/stress.json || fail "eal.mode=$mode: the run reported failures"
  grep -q '"ops": *0[,}]' /tmp/stress.json && fail "eal.mode=$mode: the run did nothing"
  echo "eal.mode=$mode: stress ran under strict overcommit"
done
