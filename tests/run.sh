#!/bin/sh
# Runs the test binaries of one build dir: every unit test, then every integration test.
# Usage: tests/run.sh BUILD_DIR [NAME]   (NAME: run only test_NAME / itest_NAME)
# Each binary prints cmocka's own summary; this script adds a total line
# "N passed, N failed" (binaries) and exits non-zero if any failed.
build=${1:-build}
only=${2:-}
export PEP_BUILD_DIR="$build"
pass=0
fail=0
failed=""
for t in "$build"/tests/test_* "$build"/tests/itest_*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    if [ -n "$only" ] && [ "$name" != "test_$only" ] && [ "$name" != "itest_$only" ]; then
        continue
    fi
    echo "== $t"
    if timeout 300 "$t"; then
        pass=$((pass + 1))
    else
        fail=$((fail + 1))
        failed="$failed $name"
    fi
done
echo "== $build: test binaries"
echo "$pass passed, $fail failed"
[ -n "$failed" ] && echo "failed:$failed"
[ "$fail" -eq 0 ]
