#!/usr/bin/env bash
# build-guest.sh OUTDIR — builds the parts of the dmakit test guest that do
# not depend on a test:
#   OUTDIR/vmlinuz      Debian's cloud kernel (NVMe, hugetlbfs, Intel IOMMU built in)
#   OUTDIR/modules/     the VFIO modules, uncompressed
#   OUTDIR/guest-exit   static helper that ends QEMU with a result code
#   OUTDIR/base.cpio    initramfs common part (newc): busybox, init, modules
#   OUTDIR/cache/       the downloaded kernel package
# run-guest.sh appends a per-test archive to base.cpio.
#
# Cached: when OUTDIR/.stamp matches the current inputs (this script, the
# guest init, guest-exit.c, busybox) nothing is done. The kernel package is
# taken from apt without installing it on the host. Every missing tool or
# package is an error: the guest tests must never be skipped silently.
set -euo pipefail

die() { echo "build-guest: error: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: build-guest.sh OUTDIR"
out=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
guest_src=$here/guest

# Load order matters: each module needs the ones before it.
modules="irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci"

for tool in qemu-system-x86_64 gcc cpio dpkg-deb apt-get apt-cache sha256sum flock; do
  command -v "$tool" >/dev/null ||
    die "'$tool' not found (apt-get install qemu-system-x86 gcc cpio dpkg apt coreutils util-linux)"
done
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || die "busybox not found (apt-get install busybox-static)"
# The guest has no libraries before init runs, so busybox must be static.
if LC_ALL=C readelf -l "$busybox" 2>/dev/null | grep -q 'Requesting program interpreter'; then
  die "$busybox is dynamically linked; install busybox-static"
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)

# Parallel test runs call this script too; one builder at a time.
exec 9>"$out/.lock"
flock 9

inputs_hash=$(cat "${BASH_SOURCE[0]}" "$guest_src/init" "$guest_src/guest-exit.c" "$busybox" |
              sha256sum | cut -d' ' -f1)
stamp=$out/.stamp
if [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$inputs_hash" ] &&
   [ -f "$out/vmlinuz" ] && [ -f "$out/base.cpio" ] && [ -x "$out/guest-exit" ]; then
  exit 0
fi
rm -f "$stamp"

# --- kernel package -------------------------------------------------------
# linux-image-cloud-amd64 is a metapackage; the real image is the package it
# depends on (its name carries the ABI number, which changes with updates).
resolve_kernel_pkg() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n 1
}
pkg=$(resolve_kernel_pkg)
if [ -z "$pkg" ]; then
  echo "build-guest: linux-image-cloud-amd64 unknown to apt; running apt-get update" >&2
  apt-get update -qq || die "apt-get update failed"
  pkg=$(resolve_kernel_pkg)
fi
[ -n "$pkg" ] || die "cannot resolve the package linux-image-cloud-amd64 depends on (apt-cache depends)"

cache=$out/cache
mkdir -p "$cache"
deb=$(ls "$cache/${pkg}"_*.deb 2>/dev/null | head -n 1 || true)
if [ -z "$deb" ]; then
  echo "build-guest: downloading $pkg" >&2
  if ! (cd "$cache" && apt-get download -q "$pkg" >&2); then
    echo "build-guest: apt-get download $pkg failed; running apt-get update and retrying" >&2
    apt-get update -qq || die "apt-get update failed"
    (cd "$cache" && apt-get download -q "$pkg" >&2) || die "apt-get download $pkg failed"
  fi
  deb=$(ls "$cache/${pkg}"_*.deb 2>/dev/null | head -n 1 || true)
  [ -n "$deb" ] || die "apt-get download $pkg left no .deb in $cache"
fi

# --- kernel image and VFIO modules ----------------------------------------
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

kver=${pkg#linux-image-}
moddir=./lib/modules/$kver/kernel
dpkg-deb --fsys-tarfile "$deb" |
  tar -x -C "$work" --wildcards "./boot/vmlinuz-*" "$moddir/virt/lib/*" "$moddir/drivers/vfio/*" ||
  die "cannot unpack vmlinuz and the VFIO modules from $deb"
vmlinuz=$(ls "$work"/boot/vmlinuz-* 2>/dev/null | head -n 1 || true)
[ -n "$vmlinuz" ] || die "$deb has no boot/vmlinuz-*"

rm -rf "$out/modules"
mkdir -p "$out/modules"
present=""
for m in $modules; do
  # Debian 6.1 ships plain .ko; later kernels compress them. busybox insmod
  # may not read compressed modules, so decompress here on the host.
  f=$(find "$work/$moddir" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) |
      head -n 1)
  if [ -z "$f" ]; then
    # vfio_virqfd was merged into vfio.ko in later kernels; everything else is required.
    [ "$m" = vfio_virqfd ] && continue
    die "module $m not found in $deb"
  fi
  case $f in
    *.ko.xz)  xz -dc "$f" > "$out/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$out/modules/$m.ko" ;;
    *.ko.gz)  gzip -dc "$f" > "$out/modules/$m.ko" ;;
    *)        cp "$f" "$out/modules/$m.ko" ;;
  esac
  present="$present $m"
done
cp "$vmlinuz" "$out/vmlinuz"

# --- guest-exit -----------------------------------------------------------
gcc -static -O2 -Wall -Wextra -Werror -o "$out/guest-exit" "$guest_src/guest-exit.c" ||
  die "cannot build guest-exit (static glibc: apt-get install libc6-dev)"

# --- common initramfs part ------------------------------------------------
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib/modules,proc,sys,dev,run,tmp,root,etc,test}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
cp "$out"/modules/*.ko "$root/lib/modules/"
cp "$out/guest-exit" "$root/bin/guest-exit"
install -m 0755 "$guest_src/init" "$root/init"
# The init reads the module list from the test's env; record what exists.
echo "VFIO_MODULES=\"${present# }\"" > "$root/etc/dmakit-vm-modules"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$work/base.cpio" ||
  die "cpio failed packing the common initramfs"
mv "$work/base.cpio" "$out/base.cpio"

{ echo "$inputs_hash"; echo "kernel=$pkg"; echo "modules=${present# }"; } > "$stamp"
echo "build-guest: guest ready in $out ($pkg)" >&2
