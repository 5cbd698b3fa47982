#!/bin/sh
# make bench: prints throughput and latency of pep's paths; never fails the build.
#   healthz       GET /healthz (no audit): the listener's ceiling
#   deny_no_route GET /no/such/route (404 no_route, audited)
#   direct        POST /v1/chat/completions to mockllm itself
#   allow         the same through pep: token verified, decision audited before the call
#                 is forwarded, outcome audited after
# Each figure is measured with durability: full (fsync per batch) and the 1-connection
# latencies also with durability: normal, to separate pep's own cost from the disk's.
# With BASELINE=DIR (another build's directory, e.g. one of the last landed commit), the
# allow path of both builds is measured in interleaved runs (ab_allow below): req/s and
# pep's CPU per request, so that a change on the hot path is judged against run-to-run noise.
# Then the controls table (controls_table below): the allow path against the same call
# through an action with one body condition and one rate limit that never triggers
# (req/s and CPU per request, interleaved runs), and the rate limiter's memory with one
# million distinct agent keys (tools/bench/ratelimit_mem.c).
# Then the resilience table (resilience_table below): (a) the allow path through a
# two-step chain whose first step is healthy, against the single-upstream allow path (the
# planner's cost on the happy path); (b) the first upstream down with its breaker open, the
# fallback served without touching it, against (a); (c) streaming: time to the first byte
# of an SSE answer through pep, against mockllm directly.
# Then the token table (token_table below): what a request costs pep in CPU by the token
# it carries, none / garbage / unknown kid / forged signature / valid (cached) / valid
# (uncached), each against "no token".
# Then the audit table (tools/bench/audit_bench.sh): with a million records in the store, a
# filtered query's time, the export and verify rates, and the request path's throughput while
# an export runs beside it.
# Knobs: DURATION (s per run, default 5), CONNS (default 64), ROUNDS (default 2),
#        ONLY (paths | controls | resilience | tokens | audit: run one part; default all),
#        TOKEN_CONNS (default 32),
#        TOKEN_DURATION (s per token-table run, default DURATION), TOKEN_ROUNDS (default
#        ROUNDS), ISSUE_SECONDS (s spent issuing tokens for the uncached row in each round,
#        default 2 * TOKEN_DURATION).
build=${1:-build}
DURATION=${DURATION:-5}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-2}
ONLY=${ONLY:-}
TOKEN_CONNS=${TOKEN_CONNS:-32}
TOKEN_DURATION=${TOKEN_DURATION:-$DURATION}
TOKEN_ROUNDS=${TOKEN_ROUNDS:-$ROUNDS}
ISSUE_SECONDS=${ISSUE_SECONDS:-$((2 * TOKEN_DURATION))}
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
  mock2: { base_url: "$mock_url", api_key_env: BENCH_UPSTREAM_KEY }
  dead:
    base_url: "http://127.0.0.1:1"
    breaker: { failure_threshold: 1, open_for: 1h }
chains:
  healthy:
    steps: [ { upstream: mock }, { upstream: mock2 } ]
  sick:
    steps: [ { upstream: dead }, { upstream: mock } ]
routes:
  - match: { method: POST, path: /v1/chat/completions }
    action: llm.chat
    forward: { upstream: mock }
  - match: { method: POST, path: /bench/governed/chat/completions }
    action: llm.governed
    forward: { upstream: mock, path: /v1/chat/completions }
  - match: { method: POST, path: /bench/healthy/chat/completions }
    action: llm.chat
    forward: { chain: healthy, retry_safe: true }
  - match: { method: POST, path: /bench/sick/chat/completions }
    action: llm.chat
    forward: { chain: sick, retry_safe: true }
  - match: { method: POST, path: /bench/token }
    action: bench.token
actions:
  llm.chat: { scope: llm.chat }
  llm.governed:
    scope: llm.chat
    rate_limits: [ { key: agent, limit: 1000000000, window: 1s } ]
    controls:
      - when: { body.model: { eq: forbidden-model } }
        deny: this model is not allowed
  bench.token: { scope: bench.token }
YAML
    : >"$dir/pep.out"
    BENCH_UPSTREAM_KEY=sk-bench "${pep_build:-$build}/pep" serve -c "$dir/bench.yaml" --data-dir "$dir/data" \
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

[ -n "$ONLY" ] && [ "$ONLY" != paths ] && ROUNDS=0
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
[ "$ROUNDS" -gt 0 ] && echo "-- summary (means over rounds)" && awk -v c="$CONNS" '
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

# ---- token table ----------------------------------------------------------------------
# POST /bench/token: an action whose scope no agent holds, so a request with a valid token
# is refused 403 insufficient_scope right after authentication, and every other row 401
# invalid_token.  Every row is one audited decision and nothing is forwarded: the rows
# differ only by what verifying the token costs.  durability: normal, so that the disk's
# fsync does not blur pep's own CPU.  CPU per request is pep's utime + stime (all threads,
# /proc/PID/stat) over the wrk run, divided by the requests wrk completed; the summary
# pools every round (total CPU / total requests), since this VM's noise moves single runs
# by ±15%.
hz=$(getconf CLK_TCK)

# cpu_ticks PID: utime + stime of the whole process, in clock ticks.  The fields are
# counted after "(comm) ", which may itself hold spaces.
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

# token_run LABEL MODE SECONDS: one wrk run of token.lua; prints it and appends
# "LABEL|req/s|ticks|requests|statuses" to $dir/token_results.
token_run() {
    label=$1 mode=$2 secs=$3
    before=$(cpu_ticks "$pep")
    BENCH_MODE=$mode BENCH_THREADS=2 BENCH_TOKENS_FILE="$dir/tokens.txt" \
        wrk -t2 -c"$TOKEN_CONNS" -d"${secs}s" -s "$here/token.lua" "$data_url/bench/token" \
        >"$dir/wrk.out" 2>&1
    after=$(cpu_ticks "$pep")
    reqs=$(awk '/ requests in / {print $1}' "$dir/wrk.out")
    rps=$(awk '/^Requests\/sec/ {print $2}' "$dir/wrk.out")
    statuses=$(sed -n 's/^statuses: //p' "$dir/wrk.out")
    [ "$label" = warm-up ] && return
    echo "$label|${rps:-0}|$((after - before))|${reqs:-0}|$statuses" >>"$dir/token_results"
    awk -v t=$((after - before)) -v hz="$hz" -v n="${reqs:-0}" -v l="$label" -v r="${rps:-0}" \
        -v s="$statuses" 'BEGIN { printf "%-38s %9s req/s %7.1f us CPU/req  (%d requests; %s)\n",
                                  l, r, (n > 0 ? t * 1000000 / hz / n : 0), n, s }'
}

token_round() {
    start_pep normal
    # The uncached row needs one token per request: issue them through the admin API first.
    : >"$dir/tokens.txt"
    BENCH_TOKENS_FILE="$dir/tokens.txt" BENCH_AGENT=bench-bot \
        BENCH_ADMIN_TOKEN=$(cat "$dir/data/admin.token") \
        wrk -t1 -c8 -d"${ISSUE_SECONDS}s" -s "$here/issue.lua" \
        "$admin_url/admin/v1/agents/bench-bot/tokens" >"$dir/issue.out" 2>&1
    ntokens=$(wc -l <"$dir/tokens.txt")
    token_run warm-up none 1
    token_run "no token" none "$TOKEN_DURATION"
    token_run "garbage token" garbage "$TOKEN_DURATION"
    token_run "unknown kid (new each request)" unknown_kid "$TOKEN_DURATION"
    token_run "forged signature (new each request)" forged "$TOKEN_DURATION"
    token_run "valid token (cached)" valid "$TOKEN_DURATION"
    # As long as the tokens last, at the forged rate of this round (the closest cost) with
    # a margin; wrk takes whole seconds, so at least 1.
    forged_rps=$(awk -F'|' '$1 ~ /^forged/ {r = $2} END {print r + 0}' "$dir/token_results")
    secs=$(awk -v n="$ntokens" -v r="$forged_rps" -v d="$TOKEN_DURATION" \
        'BEGIN { s = r > 0 ? int(n / (r * 1.25)) : 1; if (s < 1) s = 1; if (s > d) s = d; print s }')
    if [ "$ntokens" -eq 0 ]; then
        echo "  no token could be issued for the uncached row (see $dir/issue.out); row skipped"
        return
    fi
    token_run "valid token (uncached)" uncached "$secs"
    [ "${reqs:-0}" -gt "$ntokens" ] &&
        echo "  warning: $reqs requests for $ntokens tokens: some were answered from the cache"
    echo "  ($ntokens tokens issued for the uncached row)"
}

token_table() {
    : >"$dir/token_results"
    for round in $(seq 1 "$TOKEN_ROUNDS"); do
        echo "-- token table, round $round: POST /bench/token, wrk -t2 -c$TOKEN_CONNS," \
            "${TOKEN_DURATION}s per run, durability normal"
        token_round
    done
    echo "-- token table summary ($TOKEN_ROUNDS rounds pooled; issue target: forged and" \
        "uncached ≤ 2.5 x no token)"
    awk -F'|' -v hz="$hz" '
        !($1 in ticks) { order[++n] = $1 }
        { rps[$1] += $2; runs[$1]++; ticks[$1] += $3; reqs[$1] += $4 }
        END {
            printf "%-38s %9s %13s %11s\n", "token", "req/s", "CPU/req", "x no token"
            for (i = 1; i <= n; i++) {
                k = order[i]
                us = reqs[k] > 0 ? ticks[k] * 1000000 / hz / reqs[k] : 0
                if (i == 1) base = us
                printf "%-38s %9.0f %10.1f us %10.2f\n", k, rps[k] / runs[k], us,
                    (base > 0 ? us / base : 0)
            }
        }' "$dir/token_results"
}

# ---- A/B of the allow path against BASELINE ------------------------------------------------
# ab_allow: for AB_ROUNDS rounds, the baseline build then this one, each on a fresh pep with
# durability normal (pep's own cost, not the disk's): a warm-up run, then one measured run
# of the allow path at $CONNS connections.  Prints every run and the pooled means.
ab_allow() {
    : >"$dir/ab_results"
    echo "-- A/B allow path: baseline $BASELINE vs $build, ${AB_ROUNDS:-4} interleaved rounds," \
        "wrk -c$CONNS ${DURATION}s, durability normal"
    for round in $(seq 1 "${AB_ROUNDS:-4}"); do
        for which in baseline this; do
            pep_build=$build
            [ "$which" = baseline ] && pep_build=$BASELINE
            start_pep normal
            wrk -t2 -c"$CONNS" -d1s -s "$here/chat.lua" "$data_url/v1/chat/completions" >/dev/null 2>&1
            before=$(cpu_ticks "$pep")
            wrk -t2 -c"$CONNS" -d"${DURATION}s" -s "$here/chat.lua" "$data_url/v1/chat/completions" \
                >"$dir/wrk.out" 2>&1
            after=$(cpu_ticks "$pep")
            reqs=$(awk '/ requests in / {print $1}' "$dir/wrk.out")
            rps=$(awk '/^Requests\/sec/ {print $2}' "$dir/wrk.out")
            echo "$which|${rps:-0}|$((after - before))|${reqs:-0}" >>"$dir/ab_results"
            awk -v t=$((after - before)) -v hz="$hz" -v n="${reqs:-0}" -v w="$which" -v r="${rps:-0}" \
                'BEGIN { printf "  %-8s %9s req/s %7.1f us CPU/req\n", w, r, (n > 0 ? t * 1000000 / hz / n : 0) }'
        done
    done
    pep_build=$build
    awk -F'|' -v hz="$hz" '
        { rps[$1] += $2; runs[$1]++; ticks[$1] += $3; reqs[$1] += $4 }
        END {
            for (k in rps) us[k] = reqs[k] > 0 ? ticks[k] * 1000000 / hz / reqs[k] : 0
            printf "allow path, means: baseline %.0f req/s %.1f us CPU/req; this %.0f req/s %.1f us CPU/req\n",
                rps["baseline"] / runs["baseline"], us["baseline"], rps["this"] / runs["this"], us["this"]
            if (rps["baseline"] > 0 && us["baseline"] > 0)
                printf "this / baseline: %.3f x req/s, %.3f x CPU per request\n",
                    rps["this"] * runs["baseline"] / (rps["baseline"] * runs["this"]), us["this"] / us["baseline"]
        }' "$dir/ab_results"
}

# ---- controls table ---------------------------------------------------------------------
# The plain allow path against the governed one (the body parsed for one condition, one
# GCRA take), interleaved, durability normal: pep's CPU per request, as in ab_allow.
controls_table() {
    echo "-- controls: allow vs one body condition + one rate limit (never triggered), $CONNS conns"
    : >"$dir/controls_results"
    start_pep normal
    for round in $(seq 1 "${CONTROLS_ROUNDS:-3}"); do
        for which in allow governed; do
            path=/v1/chat/completions
            [ "$which" = governed ] && path=/bench/governed/chat/completions
            before=$(cpu_ticks "$pep")
            wrk -t2 -c"$CONNS" -d"${DURATION}s" -s "$here/chat.lua" "$data_url$path" >"$dir/wrk.out" 2>&1
            after=$(cpu_ticks "$pep")
            reqs=$(awk '/ requests in / {print $1}' "$dir/wrk.out")
            rps=$(awk '/^Requests\/sec/ {print $2}' "$dir/wrk.out")
            non2xx=$(awk '/Non-2xx/ {print $NF}' "$dir/wrk.out")
            echo "$which|${rps:-0}|$((after - before))|${reqs:-0}" >>"$dir/controls_results"
            awk -v t=$((after - before)) -v hz="$hz" -v n="${reqs:-0}" -v w="$which" -v r="${rps:-0}" \
                -v bad="${non2xx:-0}" \
                'BEGIN { printf "  %-9s %9s req/s %7.1f us CPU/req  non-2xx %s\n", w, r, (n > 0 ? t * 1000000 / hz / n : 0), bad }'
        done
    done
    awk -F'|' -v hz="$hz" '
        { rps[$1] += $2; runs[$1]++; ticks[$1] += $3; reqs[$1] += $4 }
        END {
            for (k in rps) us[k] = reqs[k] > 0 ? ticks[k] * 1000000 / hz / reqs[k] : 0
            if (rps["allow"] > 0 && us["allow"] > 0)
                printf "governed / allow: %.3f x req/s, %.3f x CPU per request (target: controls cost < 10%%)\n",
                    rps["governed"] * runs["allow"] / (rps["allow"] * runs["governed"]), us["governed"] / us["allow"]
        }' "$dir/controls_results"
    [ -x "$build/ratelimit_mem" ] && "$build/ratelimit_mem" 1000000
}

# ---- resilience table ----------------------------------------------------------------------
# cpu_run LABEL PATH [SCRIPT]: one wrk run against pep, appending "LABEL|req/s|ticks|requests"
cpu_run() {
    before=$(cpu_ticks "$pep")
    wrk -t2 -c"$CONNS" -d"${DURATION}s" -s "${3:-$here/chat.lua}" "$data_url$2" >"$dir/wrk.out" 2>&1
    after=$(cpu_ticks "$pep")
    reqs=$(awk '/ requests in / {print $1}' "$dir/wrk.out")
    rps=$(awk '/^Requests\/sec/ {print $2}' "$dir/wrk.out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' "$dir/wrk.out")
    echo "$1|${rps:-0}|$((after - before))|${reqs:-0}" >>"$dir/resilience_results"
    awk -v t=$((after - before)) -v hz="$hz" -v n="${reqs:-0}" -v w="$1" -v r="${rps:-0}" \
        -v bad="${non2xx:-0}" \
        'BEGIN { printf "  %-14s %9s req/s %7.1f us CPU/req  non-2xx %s\n", w, r, (n > 0 ? t * 1000000 / hz / n : 0), bad }'
}

# ttfb URL TOKEN: mean time to the first byte of a streamed chat answer over 50 calls, in µs
ttfb() {
    for _ in $(seq 1 50); do
        curl -s -o /dev/null -w '%{time_starttransfer}\n' "$1" -H "Authorization: Bearer $2" \
            -H 'Content-Type: application/json' \
            -d '{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    done | awk '{ s += $1 } END { printf "%.0f", s / NR * 1000000 }'
}

resilience_table() {
    echo "-- resilience: single upstream vs a two-step chain (healthy first step) vs a chain whose first step's breaker is open, $CONNS conns"
    : >"$dir/resilience_results"
    start_pep normal
    # open the sick chain's breaker: one connection refused by 127.0.0.1:1
    curl -s -o /dev/null "$data_url/bench/sick/chat/completions" -H "Authorization: Bearer $PEP_BENCH_TOKEN" \
        -H 'Content-Type: application/json' -d '{"model":"m","messages":[]}'
    for round in $(seq 1 "${RESILIENCE_ROUNDS:-2}"); do
        cpu_run single /v1/chat/completions
        cpu_run chain_healthy /bench/healthy/chat/completions
        cpu_run breaker_open /bench/sick/chat/completions
    done
    awk -F'|' -v hz="$hz" '
        { rps[$1] += $2; runs[$1]++; ticks[$1] += $3; reqs[$1] += $4 }
        END {
            for (k in rps) { us[k] = reqs[k] > 0 ? ticks[k] * 1000000 / hz / reqs[k] : 0; m[k] = rps[k] / runs[k] }
            if (m["single"] > 0 && us["single"] > 0)
                printf "(a) chain_healthy / single: %.3f x req/s, %.3f x CPU per request (target: within 5%%)\n", m["chain_healthy"] / m["single"], us["chain_healthy"] / us["single"]
            if (m["chain_healthy"] > 0 && us["chain_healthy"] > 0)
                printf "(b) breaker_open / chain_healthy: %.3f x req/s, %.3f x CPU per request (target: within 10%%)\n", m["breaker_open"] / m["chain_healthy"], us["breaker_open"] / us["chain_healthy"]
        }' "$dir/resilience_results"
    direct=$(ttfb "$mock_url/v1/chat/completions" none)
    through=$(ttfb "$data_url/v1/chat/completions" "$PEP_BENCH_TOKEN")
    echo "(c) streaming, time to first byte (mean of 50, 1 conn): direct ${direct} us, through pep ${through} us, added $((through - direct)) us"
}

[ -n "$BASELINE" ] && ab_allow
[ -z "$ONLY" ] || [ "$ONLY" = controls ] && controls_table
[ -z "$ONLY" ] || [ "$ONLY" = resilience ] && resilience_table
[ -z "$ONLY" ] || [ "$ONLY" = tokens ] && token_table
# The audit table runs its own mockllm and pep (a store of a million records).
[ -z "$ONLY" ] || [ "$ONLY" = audit ] && sh "$here/audit_bench.sh" "$build"
exit 0
