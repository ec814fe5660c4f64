# Guest test: what the example driver (dmakit-nvme) writes, the guest
# kernel's own nvme driver reads back. The kernel's nvme driver claimed the
# controller at boot and the init moved it to vfio-pci; after the write it
# goes back to nvme and busybox dd reads the LBAs. Runs as `sh -e`.
set -eu

fail() { echo "FAIL: $*"; exit 1; }

bdf=0000:00:03.0
dev=/sys/bus/pci/devices/$bdf
lba=1000
blocks=1536   # 768 KiB: several commands, each with a PRP list

# The write, on three queues; the exact bytes go to /tmp/expected.
dmakit-nvme write $bdf --lba $lba --blocks $blocks --seed 7 --queues 3 --save /tmp/expected ||
  fail "dmakit-nvme write"
[ "$(wc -c </tmp/expected)" -eq $((blocks * 512)) ] || fail "/tmp/expected has $(wc -c </tmp/expected) bytes"
# The driver reads its own write back too.
dmakit-nvme read $bdf --lba $lba --blocks $blocks --seed 7 --msix || fail "dmakit-nvme read --seed 7"

# Back to the kernel: off vfio-pci, no override, probe with nvme.
echo $bdf > /sys/bus/pci/drivers/vfio-pci/unbind
echo > $dev/driver_override
[ -d /sys/bus/pci/drivers/nvme ] || fail "no nvme driver in the kernel (is NVME_DRIVER set?)"
echo $bdf > /sys/bus/pci/drivers/nvme/bind
i=0
while [ ! -b /dev/nvme0n1 ]; do
  i=$((i + 1))
  [ $i -le 300 ] || fail "/dev/nvme0n1 did not appear within 30 s"
  usleep 100000
done
echo "$bdf is on $(basename "$(readlink $dev/driver)"): $(cat /sys/block/nvme0n1/size) sectors"

dd if=/dev/nvme0n1 of=/tmp/got bs=512 skip=$lba count=$blocks 2>/dev/null || fail "dd from /dev/nvme0n1"
cmp /tmp/expected /tmp/got || fail "the kernel reads other bytes than dmakit-nvme wrote"

# The written data is not the disk's own, and the LBAs on both sides are.
[ "$(od -A n -t x8 -N 8 /tmp/got | tr -d ' ')" != "$(printf '%016x' $lba)" ] || fail "LBA $lba still holds its number"
for n in $((lba - 1)) $((lba + blocks)); do
  words=$(dd if=/dev/nvme0n1 bs=512 skip=$n count=1 2>/dev/null | od -A n -t x8 -v | tr -s ' \n' '\n' | grep . | sort -u)
  [ "$words" = "$(printf '%016x' $n)" ] || fail "LBA $n changed: $words"
done
echo "kernel readback: $blocks LBAs equal"
