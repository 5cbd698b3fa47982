-- wrk script for the token table of bench.sh: POST /bench/token (a route whose action
-- needs a scope no agent holds: 403 right after a valid token, 401 otherwise, so every row
-- costs one audited decision and nothing is forwarded) with the bearer token $BENCH_MODE
-- names:
--   none         no Authorization header
--   garbage      "Bearer not-a-jwt"
--   unknown_kid  a well-formed token naming a kid pep does not hold, new on every request
--   forged       the pep-issued $PEP_BENCH_TOKEN with the first characters of its signature
--                replaced by a per-request counter: header, kid and claims pass every cheap
--                check, the signature fails, and no two requests send the same bytes
--   valid        $PEP_BENCH_TOKEN itself (verified once, then answered from the cache)
--   uncached     the tokens listed in $BENCH_TOKENS_FILE (one a line), each sent once;
--                thread i of $BENCH_THREADS takes lines i, i + threads, ...  After the last
--                one it starts again (bench.sh sizes the run so that it does not).
-- Per-request variation keeps the claims cache from answering: failures are never
-- cached, but a cache that did cache them would be caught out here too.
local bit = require("bit")

wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"

local mode = os.getenv("BENCH_MODE") or "none"
local token = os.getenv("PEP_BENCH_TOKEN") or ""
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

-- k base64url digits of the non-negative integer n (most significant first).
local function digits(n, k)
  local out = {}
  for i = k, 1, -1 do
    local d = n % 64
    out[i] = alphabet:sub(d + 1, d + 1)
    n = (n - d) / 64
  end
  return table.concat(out)
end

-- base64url of s without padding.
local function b64url(s)
  local out, n = {}, #s
  for i = 1, n, 3 do
    local a, b, c = s:byte(i, i + 2)
    local v = bit.bor(bit.lshift(a, 16), bit.lshift(b or 0, 8), c or 0)
    local chars = (c and 4) or (b and 3) or 2
    for j = 1, chars do
      local d = bit.band(bit.rshift(v, 18 - 6 * (j - 1)), 63)
      out[#out + 1] = alphabet:sub(d + 1, d + 1)
    end
  end
  return table.concat(out)
end

local threads = {}
function setup(thread)
  thread:set("thread_id", #threads)
  threads[#threads + 1] = thread
end

local head, payload, sig = token:match("^([^.]+)%.([^.]+)%.([^.]+)$")
local counter = 0
local tokens, next_token, step = {}, 1, 1

function init(args)
  local id = thread_id or 0
  counter = id * 2 ^ 40 -- threads never send the same variant
  if mode == "uncached" then
    local f = assert(io.open(os.getenv("BENCH_TOKENS_FILE"), "r"))
    for line in f:lines() do
      if #line > 0 then tokens[#tokens + 1] = line end
    end
    f:close()
    step = tonumber(os.getenv("BENCH_THREADS") or "1")
    next_token = id + 1
  end
end

-- wrk.format replaces wrk.headers with the table it is given: name them all.
local function bearer(t)
  return wrk.format(nil, nil, { ["Content-Type"] = "application/json",
                                ["Authorization"] = "Bearer " .. t })
end

function request()
  counter = counter + 1
  if mode == "garbage" then
    return bearer("not-a-jwt")
  elseif mode == "unknown_kid" then
    local kid = digits(counter, 12) .. string.rep("A", 31)
    local h = b64url('{"alg":"ES256","kid":"' .. kid .. '","typ":"JWT"}')
    return bearer(h .. "." .. payload .. "." .. sig)
  elseif mode == "forged" then
    return bearer(head .. "." .. payload .. "." .. digits(counter, 12) .. sig:sub(13))
  elseif mode == "valid" then
    return bearer(token)
  elseif mode == "uncached" then
    local t = tokens[next_token]
    next_token = next_token + step
    if next_token > #tokens then next_token = next_token - #tokens end
    return bearer(t)
  end
  return wrk.format()
end

-- Statuses seen, per thread, so that bench.sh can show each row measured what it claims
-- (401 invalid_token, or 403 insufficient_scope for a valid token).
statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("statuses")) do
      total[status] = (total[status] or 0) + n
    end
  end
  local keys = {}
  for status in pairs(total) do keys[#keys + 1] = status end
  table.sort(keys)
  local parts = {}
  for _, status in ipairs(keys) do parts[#parts + 1] = status .. ":" .. total[status] end
  io.write("statuses: ", table.concat(parts, " "), "\n")
end
