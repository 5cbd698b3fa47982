#!/bin/sh
# make bench: prints throughput and latency of pep's paths; never fails the build.
#   healthz       GET /healthz (no audit): the listener's ceiling
#   deny_no_route GET /no/such/route (404 no_route, audited)
#   direct        POST /v1/chat/completions to mockllm itself
#   allow         the same through pep: token verified, decision audited before the call
#                 is forwarded, outcome audited after
# Each figure is measured with durability: full (fsync per batch) and the 1-connection
# latencies also with durability: normal, to separate pep's own cost from the disk's.
# Knobs: DURATION (s per run, default 5), CONNS (default 64), ROUNDS (default 2).
build=${1:-build}
DURATION=${DURATION:-5}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-2}
here=$(cd "$(dirname "$0")" && pwd)
if ! command -v wrk >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
    fi
    command -v wrk >/dev/null 2>&1 || { echo "bench: wrk not found; run: apt-get install -y wrk"; exit 0; }
fi
dir=$(mktemp -d /tmp/pep-bench.XXXXXX)
pep=""
mock=""
cleanup() { kill $pep $mock 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT INT TERM

"$build/mockllm" --listen 127.0.0.1:0 >"$dir/mock.out" 2>"$dir/mock.err" &
mock=$!
for _ in $(seq 1 50); do grep -q '^listening' "$dir/mock.out" && break; sleep 0.1; done
mock_url=$(sed -n 's/^listening //p' "$dir/mock.out")
[ -n "$mock_url" ] || { echo "bench: mockllm did not start"; exit 0; }

# start_pep DURABILITY: (re)starts pep on a fresh data dir; sets data_url and the token.
start_pep() {
    [ -n "$pep" ] && { kill "$pep" 2>/dev/null; wait "$pep" 2>/dev/null; }
    rm -rf "$dir/data"
    cat >"$dir/bench.yaml" <<YAML
version: 1
audit:
  durability: $1
agents:
  - { id: bench-bot, owner: bench@example.test, tenants: [bench], scopes: [llm.chat] }
upstreams:
  mock: { base_url: "$mock_url", api_key_env: BENCH_UPSTREAM_KEY }
routes:
  - match: { method: POST, path: /v1/chat/completions }
    action: llm.chat
    forward: { upstream: mock }
actions:
  llm.chat: { scope: llm.chat }
YAML
    : >"$dir/pep.out"
    BENCH_UPSTREAM_KEY=sk-bench "$build/pep" serve -c "$dir/bench.yaml" --data-dir "$dir/data" \
        --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$dir/pep.out" 2>"$dir/pep.err" &
    pep=$!
    for _ in $(seq 1 50); do grep -q '^listening admin' "$dir/pep.out" && break; sleep 0.1; done
    data_url=$(sed -n 's/^listening data //p' "$dir/pep.out")
    admin_url=$(sed -n 's/^listening admin //p' "$dir/pep.out")
    [ -n "$data_url" ] || { echo "bench: pep did not start"; cat "$dir/pep.err"; exit 0; }
    PEP_BENCH_TOKEN=$("$build/pepctl" --url "$admin_url" --data-dir "$dir/data" tokens issue bench-bot)
    export PEP_BENCH_TOKEN
}

# to_us VALUE: wrk's "41.00us" / "1.20ms" / "1.01s" in microseconds
to_us() {
    echo "$1" | awk '/us$/ {sub("us",""); print $1+0; next} /ms$/ {sub("ms",""); print $1*1000; next}
                     /s$/ {sub("s",""); print $1*1000000; next} {print 0}'
}

# run NAME URL CONNS [SCRIPT]: one wrk run; prints a line and appends "NAME CONNS rps p50us"
run() {
    name=$1 url=$2 c=$3 script=$4
    t=$c; [ "$t" -gt 2 ] && t=2
    wrk -t"$t" -c"$c" -d"${DURATION}s" --latency ${script:+-s "$script"} "$url" >"$dir/wrk.out" 2>&1
    rps=$(awk '/^Requests\/sec/ {print $2}' "$dir/wrk.out")
    p50=$(awk '$1=="50%" {print $2}' "$dir/wrk.out")
    p99=$(awk '$1=="99%" {print $2}' "$dir/wrk.out")
    printf '%-26s %4s conns %10s req/s  p50 %9s  p99 %9s\n' "$name" "$c" "$rps" "$p50" "$p99"
    echo "$name $c ${rps:-0} $(to_us "$p50")" >>"$dir/results"
}

echo "pep bench: $(nproc) cores, ${DURATION}s per run, $ROUNDS rounds, wrk on loopback"
for round in $(seq 1 "$ROUNDS"); do
    echo "-- round $round"
    start_pep full
    run healthz "$data_url/healthz" "$CONNS"
    run deny_no_route.full "$data_url/no/such/route" "$CONNS"
    run direct "$mock_url/v1/chat/completions" "$CONNS" "$here/chat.lua"
    run allow.full "$data_url/v1/chat/completions" "$CONNS" "$here/chat.lua"
    run direct "$mock_url/v1/chat/completions" 1 "$here/chat.lua"
    run allow.full "$data_url/v1/chat/completions" 1 "$here/chat.lua"
    start_pep normal
    run deny_no_route.normal "$data_url/no/such/route" "$CONNS"
    run allow.normal "$data_url/v1/chat/completions" "$CONNS" "$here/chat.lua"
    run allow.normal "$data_url/v1/chat/completions" 1 "$here/chat.lua"
done
echo "-- summary (means over rounds)"
awk -v c="$CONNS" '
    { k = $1 " " $2; rps[k] += $3; p50[k] += $4; n[k]++ }
    function r(k) { return n[k] ? rps[k] / n[k] : 0 }
    function p(k) { return n[k] ? p50[k] / n[k] : 0 }
    END {
        printf "deny_no_route (full) / healthz at %d conns:   %.2f\n", c, r("healthz " c) ? r("deny_no_route.full " c) / r("healthz " c) : 0
        printf "deny_no_route (normal) / healthz at %d conns: %.2f\n", c, r("healthz " c) ? r("deny_no_route.normal " c) / r("healthz " c) : 0
        printf "allow (full) / direct at %d conns:            %.2f\n", c, r("direct " c) ? r("allow.full " c) / r("direct " c) : 0
        printf "allow (normal) / direct at %d conns:          %.2f\n", c, r("direct " c) ? r("allow.normal " c) / r("direct " c) : 0
        printf "added p50 at 1 conn, durability full:   %6.0f us\n", p("allow.full 1") - p("direct 1")
        printf "added p50 at 1 conn, durability normal: %6.0f us\n", p("allow.normal 1") - p("direct 1")
    }' "$dir/results"
exit 0
