-- wrk script: POST /MESSAGES with the envelope {"message": "<message JSON>"},
-- or a bulk request: a JSON array of BENCH_BULK such envelopes.
--
-- Each message carries its request's wall-clock send time "t" so the probe
-- can measure end-to-end latency, and a number "n" of its own. Settings come
-- from the environment:
--   BENCH_TOPIC    topic of every message
--   BENCH_COUNT    messages each thread sends at most
--   BENCH_RATE     messages per second for each thread; 0 or unset: no pacing
--   BENCH_BULK     messages per request; 1 or unset: one envelope, no array
-- Unpaced, a thread stops at its count, abandoning the requests in flight;
-- paced, it goes idle at its count and wrk's -d ends it once every request
-- in flight was answered, so sent, answered and delivered can be compared.
-- A bulk request is answered 200 even when it refuses messages, so each
-- answer's results are counted: those not accepted are "refused".
-- done() prints one JSON line that the harness reads; its counts are in
-- messages, and "requests" says how many requests carried them.

local ffi = require("ffi")
ffi.cdef[[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
]]
local CLOCK_REALTIME, CLOCK_MONOTONIC = 0, 1
local ts = ffi.new("bench_timespec")

local function now(clock)
  ffi.C.clock_gettime(clock, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local topic = os.getenv("BENCH_TOPIC") or "bench.http"
local count = tonumber(os.getenv("BENCH_COUNT") or "1000000")
local rate = tonumber(os.getenv("BENCH_RATE") or "0")
local bulk = math.max(1, tonumber(os.getenv("BENCH_BULK") or "1"))
local most = math.ceil(count / bulk)  -- requests each thread sends at most
local pad = string.rep("x", 64)
local headers = { ["Content-Type"] = "application/json" }
local threads = {}

-- Globals, so done() can read them from each thread.
sent = 0  -- requests
refused = 0  -- results not accepted in bulk answers, and whole refusals
local started = nil

function setup(thread)
  table.insert(threads, thread)
end

local function envelope(t, n)
  return string.format(
    '{"message": "{\\"topic\\": \\"%s\\", \\"t\\": %.6f, \\"n\\": %d, ' ..
    '\\"pad\\": \\"%s\\"}"}',
    topic, t, n, pad)
end

local function bulk_body(t, request_n)
  -- One send time for the whole array: its messages leave together.
  local envelopes = {}
  local first = (request_n - 1) * bulk
  for i = 1, bulk do
    envelopes[i] = envelope(t, first + i)
  end
  return "[" .. table.concat(envelopes, ", ") .. "]"
end

function request()
  sent = sent + 1
  if sent > most and rate <= 0 then
    -- wrk still writes the request returned here: it stays counted.
    wrk.thread:stop()
  end
  local t = now(CLOCK_REALTIME)
  local body = bulk > 1 and bulk_body(t, sent) or envelope(t, sent)
  return wrk.format("POST", "/MESSAGES", headers, body)
end

-- How the gateway (orjson, no spaces) writes a result that is not accepted.
local REFUSAL = '"status":"error"'

if bulk > 1 then
  -- Defined only for bulk requests: with response() wrk hands every
  -- answer's body to Lua, a cost the one-message phases need not pay.
  function response(status, _, body)
    if status ~= 200 then
      refused = refused + bulk  -- refused whole, or no results at all
      return
    end
    local at = string.find(body, REFUSAL, 1, true)
    while at do
      refused = refused + 1
      at = string.find(body, REFUSAL, at + #REFUSAL, true)
    end
  end
end

if rate > 0 then
  -- Paced: request n is due at start + n * bulk / rate; wrk's delay is in
  -- whole milliseconds, so a request may leave up to 1 ms early, never late.
  function delay()
    if sent >= most then return 3600000 end  -- idle until -d ends the run
    local t = now(CLOCK_MONOTONIC)
    if started == nil then started = t end
    local wait = started + sent * bulk / rate - t
    if wait <= 0 then return 0 end
    return math.floor(wait * 1000)
  end
end

function done(summary, latency, requests)
  -- Before it starts, wrk calls request() once in the first thread's
  -- environment to check the request it returns; that one is never sent.
  local total, refusals = -1, 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("sent")
    refusals = refusals + thread:get("refused")
  end
  local e = summary.errors
  io.write(string.format(
    '{"sent": %d, "answered": %d, "requests": %d, "bulk": %d, ' ..
    '"refused": %d, "duration_s": %.6f, ' ..
    '"socket_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
    '"http_latency_ms": {"p50": %.3f, "p99": %.3f, "max": %.3f}}\n',
    total * bulk, summary.requests * bulk, total, bulk, refusals,
    summary.duration / 1e6,
    e.connect + e.read + e.write, e.status, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3))
end
