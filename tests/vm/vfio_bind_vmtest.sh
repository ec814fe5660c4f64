# Guest test: `dmakit bind` / `dmakit unbind` on the real vfio-pci driver.
# The init binds nothing for this test: both devices start without a driver
# (the guest kernel's nvme driver is held back, it has no e1000e driver).
set -eu

fail() { echo "FAIL: $*"; exit 1; }
driver_of() {
  if [ -e "/sys/bus/pci/devices/$1/driver" ]; then basename "$(readlink "/sys/bus/pci/devices/$1/driver")"; fi
}

bdf=0000:00:04.0
[ -z "$(driver_of $bdf)" ] || fail "$bdf starts on '$(driver_of $bdf)'"
group=$(basename "$(readlink /sys/bus/pci/devices/$bdf/iommu_group)")

out=$(dmakit bind 00:04.0 --json) || fail "dmakit bind: $out"
echo "$out"
echo "$out" | grep -q '"bdf": *"0000:00:04.0"' || fail "bind --json lacks the canonical BDF"
echo "$out" | grep -q '"previous_driver": *""' || fail "bind --json lacks previous_driver"
echo "$out" | grep -q "\"iommu_group\": *$group" || fail "bind --json lacks iommu_group $group"
[ "$(driver_of $bdf)" = vfio-pci ] || fail "after bind $bdf is on '$(driver_of $bdf)'"
[ -c "/dev/vfio/$group" ] || fail "/dev/vfio/$group did not appear"
[ -f "/run/dmakit/$bdf.driver" ] || fail "no state file /run/dmakit/$bdf.driver"

out=$(dmakit bind $bdf) || fail "second bind: $out"
echo "$out" | grep -q "already bound" || fail "second bind did not say already bound: $out"

# The other device is untouched.
[ -z "$(driver_of 0000:00:03.0)" ] || fail "00:03.0 changed driver"

out=$(dmakit unbind $bdf --json) || fail "dmakit unbind: $out"
echo "$out"
echo "$out" | grep -q '"was_bound": *true' || fail "unbind --json lacks was_bound"
[ -z "$(driver_of $bdf)" ] || fail "after unbind $bdf is on '$(driver_of $bdf)'"
[ ! -e "/run/dmakit/$bdf.driver" ] || fail "state file left behind"
[ ! -e "/dev/vfio/$group" ] || fail "/dev/vfio/$group still exists"
[ -z "$(tr -d '\n' < /sys/bus/pci/devices/$bdf/driver_override | sed 's/(null)//')" ] || fail "driver_override not cleared"

out=$(dmakit unbind $bdf) || fail "unbind of an unbound device: $out"
echo "$out" | grep -q "nothing to do" || fail "unbind of an unbound device: $out"

# Bad input: exit status 1 and a message naming the problem.
set +e
out=$(dmakit bind 0000:00:09.0 2>&1); rc=$?
set -e
[ $rc -eq 1 ] || fail "bind of a missing device exited $rc"
echo "$out" | grep -q "no PCI device 0000:00:09.0" || fail "missing device message: $out"
set +e
out=$(dmakit bind 00:4.0 --json 2>&1); rc=$?
set -e
[ $rc -eq 1 ] || fail "bind of a malformed BDF exited $rc"
echo "$out" | grep -q '"error": *"bind: malformed PCI address' || fail "malformed BDF message: $out"
echo "vfio bind: ok"
