# Guest smoke test: what every other guest test relies on. Runs as
# `sh -e` in the guest; any failed check exits non-zero.
set -eu

fail() { echo "FAIL: $*"; exit 1; }

# The init bound both test devices to vfio-pci and VFIO made group nodes.
for bdf in 0000:00:03.0 0000:00:04.0; do
  drv=$(basename "$(readlink /sys/bus/pci/devices/$bdf/driver)")
  [ "$drv" = vfio-pci ] || fail "$bdf is on '$drv', not vfio-pci"
  group=$(basename "$(readlink /sys/bus/pci/devices/$bdf/iommu_group)")
  [ -c "/dev/vfio/$group" ] || fail "/dev/vfio/$group (group of $bdf) is missing"
done
[ -c /dev/vfio/vfio ] || fail "/dev/vfio/vfio is missing"

# Hugepages reserved and hugetlbfs mounted where DPDK looks.
[ "$(cat /proc/sys/vm/nr_hugepages)" -ge 64 ] || fail "fewer than 64 hugepages reserved"
grep -q ' /dev/hugepages hugetlbfs ' /proc/mounts || fail "hugetlbfs is not mounted at /dev/hugepages"

# The dmakit tool runs with the shared libraries packed next to it.
dmakit --version | grep -q '^dmakit ' || fail "dmakit --version"

# ... and sees real VFIO with the guest IOMMU: 4K|2M|1G pages, 39-bit
# window split by the MSI hole.
out=$(dmakit info --json)
echo "$out"
echo "$out" | grep -q '"vfio": *true' || fail "dmakit info does not see VFIO"
echo "$out" | grep -q '"page_sizes": *"0x40201000"' || fail "dmakit info shows no 4K|2M|1G IOMMU page sizes"
echo "$out" | grep -q '"last": *"0xfedfffff"' || fail "dmakit info shows no IOVA window ending below the MSI hole"
echo "guest smoke: ok"
