# Guest test: the dmakit tool with two NVMe controllers on vfio-pci
# (00:03.0 and 00:05.0): info lists both, stress runs on both in one
# container and finds no failure. Runs as `sh -e`.
set -eu

fail() { echo "FAIL: $*"; exit 1; }

a=0000:00:03.0
b=0000:00:05.0

out=$(dmakit info) || fail "dmakit info: $out"
echo "$out"
for bdf in $a $b; do
  echo "$out" | grep -q "$bdf  driver vfio-pci" || fail "dmakit info does not list $bdf on vfio-pci"
done

out=$(dmakit stress --device $a --device $b --stress.seconds 2 --json) || fail "dmakit stress: $out"
echo "$out"
echo "$out" | grep -q '"failures": *0[,}]' || fail "stress reports failures"
echo "$out" | grep -q '"backend": *"vfio' || fail "stress did not run on VFIO"
devices=$(echo "$out" | sed -n 's/.*"devices": *\[\([^]]*\)\].*/\1/p')
for bdf in $a $b; do
  echo "$devices" | grep -q "\"$bdf\"" || fail "stress devices [$devices] lack $bdf"
done
echo "two controllers: info and stress ok"
