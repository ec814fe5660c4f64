#!/usr/bin/env bash
# install_consumers.sh: the installed package as a driver outside this tree
# sees it. Installs the current build into a temporary prefix, then builds
# and runs, against that prefix alone:
#   - consumer.c, C11 with -Wall -Wextra -Wpedantic -Werror, through
#     `pkg-config --cflags --libs dmakit` (libdmakit.so), and again against
#     libdmakit.a with `pkg-config --static --libs dmakit`;
#   - cxx/, a CMake project with find_package(dmakit): dmakit::dmakit and
#     dmakit::dmakit_static;
#   - examples/e1000e on its own (find_package(dmakit)), built only: it
#     needs an 82574L to run, so only its --help is run;
#   - examples/nvme the same way; without a controller its command is run
#     for its usage and for a clear error about a device that does not exist.
# With --tool, the dmakit command must be installed (bin/dmakit) and run.
# Each consumer runs on the simulated IOMMU without hugepages and must print
# its ok line. No compile or link line may name the source or build tree, or
# carry DPDK's compile flags.
set -euo pipefail

die() { echo "install_consumers: FAIL: $*" >&2; exit 1; }

build= source= consumers= cmake=cmake cc=cc shared= static= tool=0
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=$2; shift 2 ;;
    --source) source=$2; shift 2 ;;
    --consumers) consumers=$2; shift 2 ;;
    --cmake) cmake=$2; shift 2 ;;
    --cc) cc=$2; shift 2 ;;
    --shared) shared=$2; shift 2 ;;
    --static) static=$2; shift 2 ;;
    --tool) tool=1; shift ;;  # the build has the dmakit tool: it must be installed too
    *) die "unknown argument $1" ;;
  esac
done
[ -n "$build" ] && [ -n "$source" ] && [ -n "$consumers" ] || die "usage: --build DIR --source DIR --consumers DIR [--cmake X] [--cc X] [--shared F] [--static F]"
build=$(cd "$build" && pwd) source=$(cd "$source" && pwd) consumers=$(cd "$consumers" && pwd)
for f in "$shared" "$static"; do
  [ -z "$f" ] || [ -f "$f" ] || die "$f is not built (build the project before running the tests)"
done
command -v pkg-config >/dev/null || die "pkg-config not found"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/dmakit-install-consumers.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix

# Nothing of the trees may leak into a consumer's build.
check_clean() {  # check_clean WHAT FILE
  local what=$1 file=$2 pattern
  for pattern in "$source" "$build" "rte_config.h" "-march=corei7"; do
    if grep -qF -- "$pattern" "$file"; then
      grep -nF -- "$pattern" "$file" | head -5 >&2
      die "$what names '$pattern'"
    fi
  done
}

expect_ok() {  # expect_ok NAME BINARY
  local name=$1 bin=$2 out rc=0
  out=$("$bin" 2>&1) || rc=$?
  echo "$out"
  [ $rc -eq 0 ] || die "$name exited with $rc"
  grep -q "^${name}: dmakit [0-9.]*: .*: ok$" <<<"$out" || die "$name did not print its ok line"
}

echo "== cmake --install $build --prefix $prefix"
"$cmake" --install "$build" --prefix "$prefix" >"$tmp/install.log" || { cat "$tmp/install.log"; die "install failed"; }

pc=$(find "$prefix" -path '*/pkgconfig/dmakit.pc' | head -1)
[ -n "$pc" ] || die "no pkgconfig/dmakit.pc under $prefix"
libdir=$(dirname "$(dirname "$pc")")
for f in "$libdir/libdmakit.a" "$libdir/libdmakit.so" "$libdir/cmake/dmakit/dmakitConfig.cmake" \
         "$libdir/cmake/dmakit/dmakitConfigVersion.cmake" "$libdir/cmake/dmakit/dmakitTargets.cmake" \
         "$prefix/include/dmakit/dmakit.h" "$prefix/include/dmakit/export.h" \
         "$prefix/include/dmakit/version.h" "$prefix/share/dmakit/dmakit.toml"; do
  [ -e "$f" ] || die "$f not installed"
done
if [ $tool -eq 1 ]; then
  "$prefix/bin/dmakit" --version | grep -q '^dmakit [0-9]' || die "$prefix/bin/dmakit --version fails"
fi
ls "$libdir"/libdmakit.so.[0-9]* >/dev/null 2>&1 || die "no libdmakit.so.<major> in $libdir"
[ -L "$libdir/libdmakit.so" ] || die "$libdir/libdmakit.so is not the development symlink"
# Only include/dmakit's public headers: nothing from src/.
for h in "$prefix"/include/dmakit/*; do
  base=$(basename "$h")
  [ "$base" = version.h ] || [ -f "$source/include/dmakit/$base" ] || die "installed header $base is not one of include/dmakit/"
done
[ "$(find "$prefix/include" -type f | wc -l)" -eq "$(ls "$prefix"/include/dmakit | wc -l)" ] ||
  die "files outside include/dmakit/ installed"
check_clean "dmakit.pc" "$pc"
check_clean "the CMake package" <(cat "$libdir"/cmake/dmakit/*.cmake)

mkdir -p "$tmp/c" "$tmp/cxx-src"
cp "$consumers/consumer.c" "$tmp/c/"
cp "$consumers/cxx/CMakeLists.txt" "$consumers/cxx/consumer.cpp" "$tmp/cxx-src/"

echo "== C11 consumer through pkg-config"
export PKG_CONFIG_PATH="$(dirname "$pc")${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
flags=$(echo $(pkg-config --cflags --libs dmakit))  # one space between flags
echo "pkg-config --cflags --libs dmakit: $flags"
[ "$flags" = "-I$prefix/include -L$libdir -ldmakit" ] ||
  die "pkg-config gives '$flags', want '-I$prefix/include -L$libdir -ldmakit'"
cd "$tmp/c"
# shellcheck disable=SC2086
"$cc" -std=c11 -Wall -Wextra -Wpedantic -Werror consumer.c -o consumer $flags -Wl,-rpath,"$libdir"
readelf -d consumer | grep -q 'NEEDED.*\[libdmakit\.so\.[0-9]*\]' || die "consumer does not need libdmakit.so.<major>"
expect_ok consumer ./consumer

echo "== C11 consumer against libdmakit.a (pkg-config --static)"
static_libs=$(pkg-config --static --libs dmakit)
echo "pkg-config --static --libs dmakit: $static_libs"
# -l:libdmakit.a: the archive, although libdmakit.so sits beside it.
# shellcheck disable=SC2086
"$cc" -std=c11 -Wall -Wextra -Wpedantic -Werror consumer.c -o consumer_static \
  $(pkg-config --cflags dmakit) ${static_libs/-ldmakit/-l:libdmakit.a}
if readelf -d consumer_static | grep -q 'NEEDED.*libdmakit'; then die "consumer_static needs libdmakit.so"; fi
expect_ok consumer ./consumer_static

echo "== C++ consumer through find_package(dmakit)"
"$cmake" -S "$tmp/cxx-src" -B "$tmp/cxx-build" -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF >"$tmp/cxx-configure.log" 2>&1 ||
  { cat "$tmp/cxx-configure.log"; die "the C++ consumer does not configure"; }
grep -F "from $libdir/cmake/dmakit" "$tmp/cxx-configure.log" || { cat "$tmp/cxx-configure.log"; die "find_package(dmakit) did not take the installed package"; }
"$cmake" --build "$tmp/cxx-build" -j2 --verbose >"$tmp/cxx-build.log" 2>&1 ||
  { cat "$tmp/cxx-build.log"; die "the C++ consumer does not build"; }
check_clean "the C++ consumer's build" "$tmp/cxx-build.log"
expect_ok consumer_cxx "$tmp/cxx-build/consumer_cxx"
ldd "$tmp/cxx-build/consumer_cxx" | grep -F "libdmakit.so" | grep -qF "$libdir/" ||
  die "consumer_cxx does not load the installed libdmakit.so"
if readelf -d "$tmp/cxx-build/consumer_cxx_static" | grep -q 'NEEDED.*libdmakit'; then
  die "consumer_cxx_static needs libdmakit.so"
fi
expect_ok consumer_cxx "$tmp/cxx-build/consumer_cxx_static"

# Builds examples/NAME on its own against the installed package (a copy, so
# that no compile line names the source tree) and checks its command BIN
# loads the installed libdmakit.so and answers --help. Sets $example_bin.
build_example() {  # build_example NAME BIN
  local name=$1 bin=$2 src=$tmp/$1-src out=$tmp/$1-build libs
  echo "== examples/$name standalone through find_package(dmakit)"
  [ -f "$source/examples/$name/CMakeLists.txt" ] || die "$source/examples/$name/CMakeLists.txt missing"
  cp -r "$source/examples/$name" "$src"
  "$cmake" -S "$src" -B "$out" -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF >"$out.configure.log" 2>&1 ||
    { cat "$out.configure.log"; die "examples/$name does not configure on its own"; }
  grep -F "from $libdir/cmake/dmakit" "$out.configure.log" ||
    { cat "$out.configure.log"; die "examples/$name did not take the installed package"; }
  "$cmake" --build "$out" -j2 --verbose >"$out.build.log" 2>&1 ||
    { cat "$out.build.log"; die "examples/$name does not build on its own"; }
  check_clean "the $name example's build" "$out.build.log"
  example_bin=$out/$bin
  # Outputs captured first: grep -q leaving early must not fail a pipeline under pipefail.
  libs=$(ldd "$example_bin") || die "ldd $bin failed"
  grep -F "libdmakit.so" <<<"$libs" | grep -F "$libdir/" >/dev/null ||
    die "$bin does not load the installed libdmakit.so: $libs"
  example_help=$("$example_bin" --help) || die "$bin --help fails"
}

build_example e1000e dmakit-e1000e
grep -qF -- '--loopback' <<<"$example_help" || die "dmakit-e1000e --help does not list --loopback: $example_help"

build_example nvme dmakit-nvme
nvme=$example_bin
# Bad usage is 2; a device that cannot be opened is 1 with a message naming it.
rc=0; "$nvme" identify >/dev/null 2>&1 || rc=$?
[ $rc -eq 2 ] || die "dmakit-nvme identify without a device exited $rc, want 2"
rc=0; out=$("$nvme" identify 0000:00:1f.7 2>&1) || rc=$?
[ $rc -eq 1 ] && grep -qF "0000:00:1f.7" <<<"$out" || die "dmakit-nvme identify 0000:00:1f.7 exited $rc: $out"
echo "dmakit-nvme identify 0000:00:1f.7: $out"

echo "install_consumers: ok"
