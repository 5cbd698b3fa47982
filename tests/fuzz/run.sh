#!/bin/sh
# Runs libFuzzer targets built in BUILD_DIR (see tests/fuzz/README.md).
# Usage: tests/fuzz/run.sh fuzz|smoke BUILD_DIR SECONDS TARGET...
#   fuzz   one target after the other, each fuzzing SECONDS on BUILD_DIR/corpus/TARGET
#          (kept between runs: it grows) plus the committed tests/fuzz/corpus/TARGET
#          (read only: libFuzzer adds new inputs to the first directory only).
#   smoke  all targets at once, each on a fresh BUILD_DIR/smoke/TARGET: every committed
#          input is replayed (a crash once added to the corpus stays a regression test),
#          then SECONDS of fuzzing.
# tests/fuzz/TARGET.dict, when there is one, is passed as -dict.  Crashes, leaks and
# timeouts land in BUILD_DIR/artifacts/TARGET/, logs in BUILD_DIR/logs/.
# Prints one line per target ("fuzz: NAME ok: ..." or "fuzz: NAME FAILED" and the report)
# and exits non-zero when any target failed.
mode=$1
build=$2
secs=$3
shift 3
if [ "$mode" != fuzz ] && [ "$mode" != smoke ]; then
    echo "usage: $0 fuzz|smoke BUILD_DIR SECONDS TARGET..." >&2
    exit 2
fi
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
mkdir -p "$build/logs"

# Runs target $1; its exit status goes to BUILD/logs/TARGET.rc.
run_one() {
    t=$1
    work="$build/corpus/$t"
    if [ "$mode" = smoke ]; then
        work="$build/smoke/$t"
        rm -rf "$work"
    fi
    mkdir -p "$work" "$build/artifacts/$t" "tests/fuzz/corpus/$t"
    dict=""
    [ -f "tests/fuzz/$t.dict" ] && dict="-dict=tests/fuzz/$t.dict"
    # -timeout: an input running this long is a hang (a finding), not a slow machine.
    # shellcheck disable=SC2086 # $dict is one word or none
    "$build/$t" -max_total_time="$secs" -timeout=10 -print_final_stats=1 $dict \
        -artifact_prefix="$build/artifacts/$t/" "$work" "tests/fuzz/corpus/$t" \
        >"$build/logs/$t.log" 2>&1
    echo $? >"$build/logs/$t.rc"
}

# Prints the result line of target $1 (and its report when it failed); false if it failed.
report() {
    t=$1
    log="$build/logs/$t.log"
    if [ "$(cat "$build/logs/$t.rc" 2>/dev/null)" = 0 ]; then
        done_line=$(grep 'DONE' "$log" | tail -n 1)
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
        cov=$(echo "$done_line" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
        ft=$(echo "$done_line" | sed -n 's/.*ft: \([0-9]*\).*/\1/p')
        corp=$(echo "$done_line" | sed -n 's/.*corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p')
        echo "fuzz: $t ok: ${runs:-?} runs in ${secs}s (${eps:-?} exec/s), cov ${cov:-?}," \
            "ft ${ft:-?}, corpus ${corp:-?}"
        return 0
    fi
    echo "fuzz: $t FAILED (log $log); the report:"
    # From the first report line (sanitizer, property, signal, libFuzzer) to the end.
    first=$(grep -n -m 1 -E '^==[0-9]+==|runtime error:|property violated|deadly signal|ERROR: libFuzzer' \
        "$log" | cut -d: -f1)
    if [ -n "$first" ]; then sed -n "$first,\$p" "$log" | head -n 80; else tail -n 40 "$log"; fi
    echo "fuzz: $t: the input is in $build/artifacts/$t/; replay it with: $build/$t FILE"
    return 1
}

for t in "$@"; do
    rm -f "$build/logs/$t.rc"
    if [ "$mode" = smoke ]; then run_one "$t" & else run_one "$t"; fi
done
wait
failed=""
for t in "$@"; do
    report "$t" || failed="$failed $t"
done
if [ -n "$failed" ]; then
    echo "fuzz: FAILED:$failed"
    exit 1
fi
echo "fuzz: all $# targets ok ($mode, ${secs}s each)"
