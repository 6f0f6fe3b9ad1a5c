-- wrk script: POST /MESSAGES with the envelope {"message": "<message JSON>"}.
--
-- Each request carries its own wall-clock send time "t" so the probe can
-- measure end-to-end latency. Settings come from the environment:
--   BENCH_TOPIC    topic of every message
--   BENCH_COUNT    requests each thread sends at most
--   BENCH_RATE     requests per second for each thread; 0 or unset: no pacing
-- Unpaced, a thread stops at its count, abandoning the requests in flight;
-- paced, it goes idle at its count and wrk's -d ends it once every request
-- in flight was answered, so sent, answered and delivered can be compared.
-- done() prints one JSON line that the harness reads.

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
local pad = string.rep("x", 64)
local headers = { ["Content-Type"] = "application/json" }
local threads = {}

sent = 0  -- global, so done() can read it from each thread
local started = nil

function setup(thread)
  table.insert(threads, thread)
end

function request()
  sent = sent + 1
  if sent > count and rate <= 0 then
    -- wrk still writes the request returned here: it stays counted.
    wrk.thread:stop()
  end
  local body = string.format(
    '{"message": "{\\"topic\\": \\"%s\\", \\"t\\": %.6f, \\"n\\": %d, ' ..
    '\\"pad\\": \\"%s\\"}"}',
    topic, now(CLOCK_REALTIME), sent, pad)
  return wrk.format("POST", "/MESSAGES", headers, body)
end

if rate > 0 then
  -- Paced: each request is due at start + n / rate; wrk's delay is in whole
  -- milliseconds, so a request may leave up to 1 ms early, never late.
  function delay()
    if sent >= count then return 3600000 end  -- idle until -d ends the run
    local t = now(CLOCK_MONOTONIC)
    if started == nil then started = t end
    local wait = started + sent / rate - t
    if wait <= 0 then return 0 end
    return math.floor(wait * 1000)
  end
end

function done(summary, latency, requests)
  -- Before it starts, wrk calls request() once in the first thread's
  -- environment to check the request it returns; that one is never sent.
  local total = -1
  for _, thread in ipairs(threads) do
    total = total + thread:get("sent")
  end
  local e = summary.errors
  io.write(string.format(
    '{"sent": %d, "answered": %d, "duration_s": %.6f, ' ..
    '"socket_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
    '"http_latency_ms": {"p50": %.3f, "p99": %.3f, "max": %.3f}}\n',
    total, summary.requests, summary.duration / 1e6,
    e.connect + e.read + e.write, e.status, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3))
end
