#!/bin/sh
# make run: starts the bundled mock upstream and pep on policies/example.yaml, issues a
# token for the example agent and prints a curl line to try.  Ctrl-C stops both.
build=${1:-build}
policy=policies/example.yaml
data=${PEP_DATA_DIR:-./var}
export MOCK_API_KEY=${MOCK_API_KEY:-sk-mock-demo-key}
logs=$(mktemp -d /tmp/pep-run.XXXXXX)

"$build/mockllm" --listen 127.0.0.1:9099 >"$logs/mockllm.out" 2>"$logs/mockllm.err" &
mock=$!
"$build/pep" serve -c "$policy" --data-dir "$data" >"$logs/pep.out" 2>"$logs/pep.err" &
pep=$!
trap 'kill $pep $mock 2>/dev/null; wait $pep $mock 2>/dev/null; echo; echo "stopped pep and mockllm (logs in $logs)"; exit 0' INT TERM

for _ in $(seq 1 100); do
    grep -q '^listening admin' "$logs/pep.out" 2>/dev/null && break
    if ! kill -0 $pep 2>/dev/null; then
        echo "pep exited; its log:" >&2; cat "$logs/pep.err" >&2; kill $mock 2>/dev/null; exit 1
    fi
    sleep 0.1
done
data_url=$(sed -n 's/^listening data //p' "$logs/pep.out")
admin_url=$(sed -n 's/^listening admin //p' "$logs/pep.out")
if [ -z "$admin_url" ]; then
    echo "pep did not start listening; its log:" >&2; cat "$logs/pep.err" >&2
    kill $pep $mock 2>/dev/null; exit 1
fi
token=$("$build/pepctl" --url "$admin_url" --data-dir "$data" tokens issue demo-bot --ttl 24h)

cat <<MSG

pep is running (policy $policy, data in $data, logs in $logs)
  data plane   $data_url
  admin API    $admin_url   (operator token in $data/admin.token)
  mock upstream http://127.0.0.1:9099 (mockllm)

A token for agent demo-bot (24h):
  export TOKEN=$token

Try it:
  curl -s $data_url/v1/chat/completions -H "Authorization: Bearer \$TOKEN" \\
       -H 'Content-Type: application/json' -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'

Then:  $build/pepctl --url $admin_url --data-dir $data tokens list --agent demo-bot
       $build/pepctl --url $admin_url --data-dir $data tokens revoke JTI   (the next call answers 401)
Ctrl-C stops pep and mockllm.
MSG
wait $pep
