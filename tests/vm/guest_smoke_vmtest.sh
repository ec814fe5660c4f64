# Guest smoke test: what every other guest test relies on. Runs as
# `sh -e` in the guest; any failed check exits non-zero.
set -eu

fail() { echo "FAIL: $*"; exit 1; }

# What run-guest.sh asked the init for (VFIO_BIND, HUGEPAGES).
. /test/env

# The init bound the devices to vfio-pci and VFIO made group nodes.
[ -n "$VFIO_BIND" ] || fail "the guest binds no device: nothing to check"
for bdf in $VFIO_BIND; do
  drv=$(basename "$(readlink /sys/bus/pci/devices/$bdf/driver)")
  [ "$drv" = vfio-pci ] || fail "$bdf is on '$drv', not vfio-pci"
  group=$(basename "$(readlink /sys/bus/pci/devices/$bdf/iommu_group)")
  [ -c "/dev/vfio/$group" ] || fail "/dev/vfio/$group (group of $bdf) is missing"
done
[ -c /dev/vfio/vfio ] || fail "/dev/vfio/vfio is missing"

# Hugepages reserved and hugetlbfs mounted where DPDK looks.
[ "$(cat /proc/sys/vm/nr_hugepages)" -ge "$HUGEPAGES" ] || fail "fewer than $HUGEPAGES hugepages reserved"
grep -q ' /dev/hugepages hugetlbfs ' /proc/mounts || fail "hugetlbfs is not mounted at /dev/hugepages"

# The dmakit tool runs with the shared libraries packed next to it.
dmakit --version | grep -q '^dmakit ' || fail "dmakit --version"

# ... and sees real VFIO with the guest IOMMU: 4K|2M|1G pages, the IOVA
# space split by the MSI hole and as wide as the capability register says.
out=$(dmakit info --json)
echo "$out"
echo "$out" | grep -q '"vfio": *true' || fail "dmakit info does not see VFIO"
echo "$out" | grep -q '"page_sizes": *"0x40201000"' || fail "dmakit info shows no 4K|2M|1G IOMMU page sizes"
echo "$out" | grep -q '"last": *"0xfedfffff"' || fail "dmakit info shows no IOVA window ending below the MSI hole"
aw=$(( ((0x$(cat /sys/class/iommu/*/intel-iommu/cap | head -n 1) >> 16) & 0x3f) + 1 ))
top=$(printf '0x%x' $(( (1 << aw) - 1 )))
echo "$out" | grep -q "\"last\": *\"$top\"" || fail "dmakit info shows no IOVA window ending at $top ($aw-bit IOMMU)"
echo "guest smoke: ok"
