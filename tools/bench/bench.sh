#!/bin/sh
# make bench: prints throughput and latency of pep's paths; never fails the build.
#   deny path   GET /no/such/route  (404 no_route, audited with durability: full)
#   healthz     GET /healthz        (no audit): the listener's ceiling
#   allow path  POST /v1/chat/completions through pep to mockllm vs mockllm directly
#               (token verified, decision audited with durability: full, outcome audited)
# Knobs: DURATION (s, default 5), CONNS (default 64), ROUNDS (default 2).
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
trap 'kill $pep $mock 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT INT TERM

"$build/mockllm" --listen 127.0.0.1:0 >"$dir/mock.out" 2>"$dir/mock.err" &
mock=$!
for _ in $(seq 1 50); do grep -q '^listening' "$dir/mock.out" && break; sleep 0.1; done
mock_url=$(sed -n 's/^listening //p' "$dir/mock.out")
cat >"$dir/bench.yaml" <<YAML
version: 1
audit:
  durability: full
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
BENCH_UPSTREAM_KEY=sk-bench "$build/pep" serve -c "$dir/bench.yaml" --data-dir "$dir/data" \
    --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$dir/pep.out" 2>"$dir/pep.err" &
pep=$!
for _ in $(seq 1 50); do grep -q '^listening admin' "$dir/pep.out" && break; sleep 0.1; done
data_url=$(sed -n 's/^listening data //p' "$dir/pep.out")
admin_url=$(sed -n 's/^listening admin //p' "$dir/pep.out")
if [ -z "$data_url" ] || [ -z "$mock_url" ]; then
    echo "bench: pep or mockllm did not start"; cat "$dir/pep.err"; exit 0
fi
export PEP_BENCH_TOKEN=$("$build/pepctl" --url "$admin_url" --data-dir "$dir/data" tokens issue bench-bot)

# run NAME URL CONNS [SCRIPT] -> prints one line: name req/s p50 p99
run() {
    name=$1 url=$2 c=$3 script=$4
    t=$c; [ "$t" -gt 2 ] && t=2
    if [ -n "$script" ]; then
        wrk -t"$t" -c"$c" -d"${DURATION}s" --latency -s "$script" "$url" >"$dir/wrk.out" 2>&1
    else
        wrk -t"$t" -c"$c" -d"${DURATION}s" --latency "$url" >"$dir/wrk.out" 2>&1
    fi
    rps=$(awk '/^Requests\/sec/ {print $2}' "$dir/wrk.out")
    p50=$(awk '$1=="50%" {print $2}' "$dir/wrk.out")
    p99=$(awk '$1=="99%" {print $2}' "$dir/wrk.out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' "$dir/wrk.out")
    printf '%-22s %4s conns %10s req/s  p50 %9s  p99 %9s  non-2xx %s\n' "$name" "$c" "$rps" "$p50" "$p99" "${non2xx:-0}"
    echo "$name $c $rps" >>"$dir/results"
}

echo "pep bench on $(nproc) cores, ${DURATION}s per run, $ROUNDS rounds (wrk, loopback)"
for round in $(seq 1 "$ROUNDS"); do
    echo "-- round $round"
    run healthz "$data_url/healthz" "$CONNS"
    run deny_no_route "$data_url/no/such/route" "$CONNS"
    run direct_mockllm "$mock_url/v1/chat/completions" "$CONNS" "$here/chat.lua"
    run allow_via_pep "$data_url/v1/chat/completions" "$CONNS" "$here/chat.lua"
    run direct_mockllm "$mock_url/v1/chat/completions" 1 "$here/chat.lua"
    run allow_via_pep "$data_url/v1/chat/completions" 1 "$here/chat.lua"
done
# Ratios of the medians (mean of rounds for ROUNDS=2) per name and connection count.
awk -v conns="$CONNS" '
    { sum[$1" "$2] += $3; n[$1" "$2]++ }
    END {
        h = sum["healthz " conns]/n["healthz " conns]; d = sum["deny_no_route " conns]/n["deny_no_route " conns]
        dm = sum["direct_mockllm " conns]/n["direct_mockllm " conns]; ap = sum["allow_via_pep " conns]/n["allow_via_pep " conns]
        printf "ratio deny_no_route/healthz at %d conns: %.2f\n", conns, (h ? d/h : 0)
        printf "ratio allow_via_pep/direct at %d conns: %.2f\n", conns, (dm ? ap/dm : 0)
    }' "$dir/results"
echo "audit: $(grep -c . "$dir/results" >/dev/null; "$build/pepctl" --url "$admin_url" --data-dir "$dir/data" audit verify 2>&1 | head -1)"
exit 0
