# Guest test: the operator's view on a machine with VFIO. `dmakit info` with
# no device named shows the real IOMMU's windows and page sizes (from a probe
# of the bound groups) and says why a context would use the simulated model;
# with --device it would use VFIO; `dmakit stress --device <nvme>` passes on
# the real vfio-pci driver. Runs as `sh -e` in the guest.
set -eu

fail() { echo "FAIL: $*"; exit 1; }
nvme=0000:00:03.0

dmakit info >/tmp/info.out 2>&1 || fail "dmakit info exited with $?: $(cat /tmp/info.out)"
cat /tmp/info.out
grep -q 'VFIO is present but no device is named' /tmp/info.out || fail "info does not say why auto picks sim"
grep -q "$nvme  driver vfio-pci" /tmp/info.out || fail "info does not list $nvme on vfio-pci"
grep -q 'IOVA window: 0x0-0xfedfffff' /tmp/info.out || fail "info does not show the real IOMMU's first window"
grep -q 'page sizes: 0x40201000' /tmp/info.out || fail "info does not show the real IOMMU's page sizes"

dmakit info --device "$nvme" --json >/tmp/info.json || fail "dmakit info --device exited with $?"
grep -q '"backend":"vfio"' /tmp/info.json || fail "with --device, auto does not pick vfio: $(cat /tmp/info.json)"
grep -q "\"bdf\":\"$nvme\",\"group\":[0-9]*,\"driver\":\"vfio-pci\"" /tmp/info.json ||
  fail "info --json does not list the device: $(cat /tmp/info.json)"

rc=0
dmakit stress --device "$nvme" --seconds 5 >/tmp/stress.out 2>&1 || rc=$?
cat /tmp/stress.out
[ "$rc" -eq 0 ] || fail "dmakit stress --device $nvme exited with $rc"
grep -q '^stress on vfio-type1v2 backend' /tmp/stress.out || fail "stress did not run on the VFIO container"
grep -q ', 0 failures' /tmp/stress.out || fail "stress reported failures"
grep -q 'mappings left after freeing everything: *0$' /tmp/stress.out || fail "stress left mappings"
echo "info and stress on the real IOMMU: ok"
