#!/usr/bin/env bash
# run-guest.sh — runs one test inside the QEMU guest and maps the result to
# an exit status (0 pass, 1 fail).
#
#   run-guest.sh --guest DIR [options] -- COMMAND [ARGS...]
#
#   --guest DIR        output directory of build-guest.sh (built if needed)
#   --name NAME        test name for the log (default: basename of COMMAND)
#   --kind gtest|cmd   gtest: pass/fail counts parsed from GoogleTest output;
#                      cmd: the command's exit status decides (default)
#   --bin SRC[:DEST]   executable to pack (default DEST /bin/NAME), with every
#                      shared library ldd finds, at the host's paths
#   --file SRC:DEST    extra file to pack as is
#   --hugepages N      2 MiB pages the guest reserves (default 64)
#   --memory SIZE      guest memory (default 512M)
#   --bind "BDF ..."   devices the init binds to vfio-pci (default: every
#                      NVMe controller and the NIC; "" binds none)
#   --nvme-driver      let the kernel's nvme driver claim the NVMe controllers first
#   --nvme-count N     NVMe controllers (default 1): the first at 00:03.0, the
#                      others at 00:05.0, 00:06.0, ..., each with its own disk
#   --disk-mib N       size of each NVMe disk (default 16)
#   --iommu-aw-bits N  address width of the guest's IOMMU (QEMU 7.2: 39, the
#                      default, or 48); the init checks the guest got it
#   --timeout SEC      limit for the whole boot (default 240)
#   --keep DIR         keep the initramfs and the serial log in DIR
#
# The guest: q35 with an emulated Intel IOMMU (interrupt remapping on),
# an NVMe controller at 00:03.0 (serial dmakit0) backed by a raw disk whose
# every 512-byte LBA holds its own LBA number as 64-bit little-endian words,
# and an e1000e NIC at 00:04.0; with --nvme-count, controller k (serial
# dmakitK) at 00:0(4+k).0 with a disk of the same pattern. The guest reports through isa-debug-exit: QEMU exits (N << 1) | 1
# for guest-exit N, so 1 = pass; 0 means the guest died without a report.
set -euo pipefail

die() { echo "run-guest: error: $*" >&2; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
guest="" name="" kind=cmd hugepages=64 memory=512M disk_mib=16 timeout_s=240 keep=""
bind="" bind_given=0
nvme_driver=0 nvme_count=1
iommu_aw=""
bins=() files=()
while [ $# -gt 0 ]; do
  case $1 in
    --guest) guest=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --kind) kind=$2; shift 2 ;;
    --bin) bins+=("$2"); shift 2 ;;
    --file) files+=("$2"); shift 2 ;;
    --hugepages) hugepages=$2; shift 2 ;;
    --memory) memory=$2; shift 2 ;;
    --bind) bind=$2; bind_given=1; shift 2 ;;
    --nvme-driver) nvme_driver=1; shift ;;
    --nvme-count) nvme_count=$2; shift 2 ;;
    --disk-mib) disk_mib=$2; shift 2 ;;
    --iommu-aw-bits) iommu_aw=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (see the header of $0)" ;;
  esac
done
[ -n "$guest" ] || die "--guest DIR is required"
[ $# -gt 0 ] || die "no command given after --"
case $kind in gtest|cmd) ;; *) die "--kind must be gtest or cmd, not '$kind'" ;; esac
[[ $hugepages =~ ^[0-9]+$ ]] || die "--hugepages '$hugepages' is not a number"
[[ $disk_mib =~ ^[1-9][0-9]*$ ]] || die "--disk-mib '$disk_mib' is not a positive number"
[ -z "$iommu_aw" ] || [[ $iommu_aw =~ ^[1-9][0-9]*$ ]] || die "--iommu-aw-bits '$iommu_aw' is not a number"
[[ $nvme_count =~ ^[1-4]$ ]] || die "--nvme-count '$nvme_count': want 1 to 4"
# NVMe controller k: slot 3 for the first (as always), then 5, 6, 7.
nvme_slot() { if [ "$1" -eq 0 ]; then echo 3; else echo $((4 + $1)); fi; }
if [ "$bind_given" = 0 ]; then
  bind="0000:00:03.0 0000:00:04.0"
  for ((k = 1; k < nvme_count; k++)); do bind="$bind 0000:00:0$(nvme_slot $k).0"; done
fi
[ -n "$name" ] || name=$(basename "$1")

for tool in qemu-system-x86_64 cpio ldd strip perl timeout; do
  command -v "$tool" >/dev/null || die "'$tool' not found (qemu-system-x86, cpio, libc-bin, binutils, perl, coreutils)"
done
"$here/build-guest.sh" "$guest" || die "build-guest.sh $guest failed"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/dmakit-vm.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
stage=$tmp/root
mkdir -p "$stage/test"

# Copies a host file into the stage at the same path (symlinks resolved).
stage_file() {
  local src=$1 dest=$2
  [ -e "$stage$dest" ] && return 0
  mkdir -p "$(dirname "$stage$dest")"
  cp -L "$src" "$stage$dest" || die "cannot copy $src"
}

# Packs an ELF file's shared libraries (and the dynamic loader) at the paths
# the loader will look for them. ldd lists the whole dependency closure.
guest_libdir=/opt/dmakit-vm/lib  # in the guest: on LD_LIBRARY_PATH (set in /test/run)
stage_libs() {
  local elf=$1 out
  out=$(ldd "$elf" 2>&1) || {
    # Static binaries have nothing to pack.
    grep -q 'not a dynamic executable' <<<"$out" && return 0
    die "ldd $elf: $out"
  }
  if grep -q 'not found' <<<"$out"; then
    die "ldd $elf: missing libraries: $(grep 'not found' <<<"$out" | tr -s ' \t' ' ')"
  fi
  while read -r a b c _; do
    if [ "$b" = "=>" ] && [ "${c:0:1}" = / ]; then
      case $c in
        /usr/* | /lib*) stage_file "$c" "$c" ;;
        # Libraries of the build tree (libdmakit.so.N): their host path may lie
        # under /tmp or /run, where the guest mounts tmpfs over the initramfs.
        *) stage_file "$c" "$guest_libdir/$(basename "$c")" ;;
      esac
    elif [ "${a:0:1}" = / ]; then
      stage_file "$a" "$a"  # the dynamic loader
    fi
  done <<<"$out"
}

# DPDK's EAL loads every driver plugin in its plugin directory at init and
# fails when the directory is missing; the mempool drivers are needed for
# rte_mempool. Pack the few plugins a memory-only EAL uses.
dpdk_plugins="librte_mempool_ring librte_mempool_stack librte_bus_vdev"
stage_dpdk_plugins() {
  local eal plugdir p src
  eal=$(find "$stage" -name 'librte_eal.so.*' -print -quit)
  [ -n "$eal" ] || return 0
  eal=${eal#"$stage"}
  # The directory EAL scans is compiled into it (RTE_EAL_PMD_PATH); the guest
  # has no /lib -> /usr/lib symlink, so take the exact path from the library.
  plugdir=$(grep -ao '/[[:graph:]]*/pmds-[0-9.]*' "$eal" | head -n 1 || true)
  [ -n "$plugdir" ] && [ -d "$plugdir" ] || die "cannot find DPDK's plugin directory (RTE_EAL_PMD_PATH) in $eal"
  mkdir -p "$stage$plugdir"
  for p in $dpdk_plugins; do
    src=$plugdir/$p.so
    [ -e "$src" ] || die "DPDK plugin $src missing (libdpdk-dev / dpdk packages)"
    cp -L "$src" "$stage$src"
    stage_libs "$src"
  done
}

for spec in "${bins[@]}"; do
  src=${spec%%:*}
  dest=/bin/$(basename "$src")
  [ "$spec" = "$src" ] || dest=${spec#*:}
  [ -x "$src" ] || die "--bin $src: not an executable file"
  mkdir -p "$(dirname "$stage$dest")"
  # Debug info is most of a test binary and the guest never reads it; a
  # smaller initramfs boots faster.
  strip --strip-debug -o "$stage$dest" "$src" || die "strip --strip-debug $src failed"
  stage_libs "$src"
done
stage_dpdk_plugins
for spec in "${files[@]}"; do
  src=${spec%%:*}
  dest=${spec#*:}
  [ "$spec" != "$src" ] && [ "${dest:0:1}" = / ] || die "--file wants SRC:/ABS/DEST, got '$spec'"
  [ -e "$src" ] || die "--file $src: no such file"
  mkdir -p "$(dirname "$stage$dest")"
  cp -L "$src" "$stage$dest"
done

# The test's settings for the init, and the command as a shell script.
{
  printf 'TEST_NAME=%q\n' "$name"
  printf 'TEST_KIND=%q\n' "$kind"
  printf 'HUGEPAGES=%q\n' "$hugepages"
  printf 'VFIO_BIND=%q\n' "$bind"
  printf 'IOMMU_AW_BITS=%q\n' "$iommu_aw"
} > "$stage/test/env"
{
  printf 'export LD_LIBRARY_PATH=%q\n' "$guest_libdir"
  printf 'exec'
  printf ' %q' "$@"
  printf '\n'
} > "$stage/test/run"

# The kernel unpacks concatenated newc archives in order, so the per-test
# part is simply appended to the cached common part.
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$tmp/test.cpio" ||
  die "cpio failed packing the test part"
cat "$guest/base.cpio" "$tmp/test.cpio" > "$tmp/initrd.cpio"

# Disk pattern: LBA n holds 64 copies of the little-endian u64 n, so a read
# test can tell exactly which block landed where.
perl -e 'my $n = shift; for my $i (0 .. $n - 1) { print pack("Q<", $i) x 64 }' \
  $((disk_mib * 2048)) > "$tmp/disk.raw" || die "cannot write the disk image"
nvme_args=(-drive if=none,id=nvm,file="$tmp/disk.raw",format=raw -device nvme,serial=dmakit0,drive=nvm,addr=0x3)
for ((k = 1; k < nvme_count; k++)); do
  cp "$tmp/disk.raw" "$tmp/disk$k.raw" || die "cannot copy the disk image"
  nvme_args+=(-drive if=none,id=nvm$k,file="$tmp/disk$k.raw",format=raw
              -device nvme,serial=dmakit$k,drive=nvm$k,addr=0x$(nvme_slot $k))
done

# no_timer_check: under emulation on a busy host the kernel's early check
# that the timer interrupt arrives through the interrupt-remapped IO-APIC
# can time out and panic the boot ("timer doesn't work through
# Interrupt-remapped IO-APIC"); the timer works, it is only slow.
append="console=ttyS0 intel_iommu=on panic=-1 quiet no_timer_check"
[ "$nvme_driver" = 1 ] || append="$append initcall_blacklist=nvme_init"

echo "run-guest: booting $name (memory $memory, $hugepages hugepages, $nvme_count NVMe, timeout ${timeout_s}s)"
start=$(date +%s.%N)
set +e
timeout -k 5 "$timeout_s" qemu-system-x86_64 \
  -machine q35 -accel tcg -cpu max -smp 1 -m "$memory" \
  -nodefaults -nographic -no-reboot -serial stdio -monitor none \
  -device "intel-iommu,intremap=on,caching-mode=on${iommu_aw:+,aw-bits=$iommu_aw}" \
  "${nvme_args[@]}" \
  -device e1000e,addr=0x4,romfile= \
  -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
  -kernel "$guest/vmlinuz" -initrd "$tmp/initrd.cpio" \
  -append "$append" </dev/null 2>&1 | tee "$tmp/serial.log"
rc=${PIPESTATUS[0]}
set -e
secs=$(echo "$start $(date +%s.%N)" | awk '{printf "%.1f", $2 - $1}')

if [ -n "$keep" ]; then
  mkdir -p "$keep"
  cp "$tmp/initrd.cpio" "$tmp/serial.log" "$keep/"
fi

summary=$(grep -a -o 'dmakit-vm: [0-9]* passed, [0-9]* failed' "$tmp/serial.log" | tail -n 1 || true)
case $rc in
  1)
    if [ -z "$summary" ]; then
      echo "run-guest: FAIL $name: QEMU reported a pass but the guest printed no summary (${secs}s)"
      exit 1
    fi
    echo "run-guest: PASS $name: ${summary#dmakit-vm: } (${secs}s)"
    exit 0 ;;
  3) echo "run-guest: FAIL $name: ${summary#dmakit-vm: } (${secs}s)" ;;
  5) echo "run-guest: FAIL $name: guest setup failed, see the log above (${secs}s)" ;;
  0) echo "run-guest: FAIL $name: the guest died without reporting (panic or poweroff) (${secs}s)" ;;
  124|137) echo "run-guest: FAIL $name: no result within ${timeout_s}s (hung guest?)" ;;
  *) echo "run-guest: FAIL $name: QEMU exited with $rc (guest code $(( (rc - 1) / 2 )) or a QEMU error) (${secs}s)" ;;
esac
exit 1
