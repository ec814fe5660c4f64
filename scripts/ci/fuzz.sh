#!/usr/bin/env bash
# The fuzzing job of CI (.ci/run); also run by hand from any directory:
#
#   scripts/ci/fuzz.sh [SECONDS]    (default 60 per target)
#
# Builds the libFuzzer targets of tests/fuzz with clang-16 (-DDMAKIT_FUZZ=ON:
# libFuzzer + ASan + UBSan) in build-fuzz/ (the tree of the ASan job), runs each target for SECONDS
# from a copy of its seed corpus (tests/fuzz/corpus/<target>), two at a time,
# then runs fuzz_api once more with the planted bug of the fuzz build
# (DMAKIT_PLANT_BUG=arena-double-handout), which it must find. Fails on any
# finding (the crashing input is kept in build-fuzz/artifacts/) and when the
# planted bug goes unnoticed. Prints executions, corpus size and time per run.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
secs=${1:-60}
dir=$src/build-fuzz
targets=(fuzz_api fuzz_vfio_caps fuzz_config fuzz_parse)

symbolizer=$(command -v llvm-symbolizer-16 || command -v llvm-symbolizer || true)
[ -n "$symbolizer" ] && export ASAN_SYMBOLIZER_PATH="$symbolizer"
export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

t0=$SECONDS
bash "$src/scripts/ci/clang-tree.sh" "$dir"
cmake --build "$dir" -j2 --target "${targets[@]}"
echo "fuzz: build took $((SECONDS - t0)) s"

mkdir -p "$dir/artifacts" "$dir/logs"
run() {  # target, seconds, log name, work corpus
  local t=$1 s=$2 log=$dir/logs/$3.log work=$4
  rm -rf "$work" && mkdir -p "$work" && cp "$src/tests/fuzz/corpus/$t/"* "$work/"
  "$dir/tests/fuzz/$t" -max_total_time="$s" -timeout=20 -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 \
    -artifact_prefix="$dir/artifacts/$3-" "$work" >"$log" 2>&1
}
summary() {  # name, log, work corpus, status
  local execs secs
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$2" | tail -1)
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$2" | tail -1)
  printf 'fuzz: %-16s %-7s executions %-9s seconds %-4s corpus %s files (%s seeds)\n' "$1" "$4" "${execs:-?}" \
    "${secs:-?}" "$(ls "$3" | wc -l)" "$(ls "$src/tests/fuzz/corpus/${1%%+*}" | wc -l)"
}

t0=$SECONDS
failed=0
# Two at a time on the two cores.
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  pids=()
  for t in "${targets[@]:i:2}"; do
    run "$t" "$secs" "$t" "$dir/corpus/$t" &
    pids+=($!)
  done
  for k in "${!pids[@]}"; do
    t=${targets[i + k]}
    if wait "${pids[$k]}"; then
      summary "$t" "$dir/logs/$t.log" "$dir/corpus/$t" ok
    else
      summary "$t" "$dir/logs/$t.log" "$dir/corpus/$t" FINDING
      grep -m1 -E 'FUZZ INVARIANT|ERROR: (Address|Leak)Sanitizer|runtime error|deadly signal|timeout' "$dir/logs/$t.log" || true
      tail -40 "$dir/logs/$t.log"
      failed=1
    fi
  done
done

# The planted bug: fuzz_api must stop with its model's message.
if DMAKIT_PLANT_BUG=arena-double-handout run fuzz_api "$secs" planted "$dir/corpus/planted"; then
  summary fuzz_api+planted "$dir/logs/planted.log" "$dir/corpus/planted" missed
  echo "fuzz: the planted bug (arena-double-handout) was not found in ${secs} s" >&2
  failed=1
elif grep -q 'FUZZ INVARIANT' "$dir/logs/planted.log"; then
  summary fuzz_api+planted "$dir/logs/planted.log" "$dir/corpus/planted" found
  grep -m1 'FUZZ INVARIANT' "$dir/logs/planted.log"
  grep -m1 -o 'Test unit written to .*' "$dir/logs/planted.log" || true
else
  echo "fuzz: the planted run failed without the model's message:" >&2
  tail -40 "$dir/logs/planted.log"
  failed=1
fi
echo "fuzz: runs took $((SECONDS - t0)) s"
exit $failed
