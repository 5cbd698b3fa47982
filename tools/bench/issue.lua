-- wrk script: issues agent tokens through the admin API as fast as pep will, and appends
-- each one to $BENCH_TOKENS_FILE (one a line), for the "valid token uncached" row of
-- bench.sh.  Run it with one thread (-t1): one Lua state, one writer.
--   $BENCH_ADMIN_TOKEN  the operator token (DATA/admin.token)
--   $BENCH_AGENT        the agent to issue for
wrk.method = "POST"
wrk.path = "/admin/v1/agents/" .. (os.getenv("BENCH_AGENT") or "bench-bot") .. "/tokens"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_ADMIN_TOKEN") or "")

local out

function init(args)
  out = assert(io.open(os.getenv("BENCH_TOKENS_FILE"), "a"))
  out:setvbuf("line")
end

function response(status, headers, body)
  local t = body and body:match('"token"%s*:%s*"([^"]+)"')
  if t then out:write(t, "\n") end
end
