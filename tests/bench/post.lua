-- wrk script for the benchmarks: POST a fixed chat request and print a machine-readable summary.
-- run_bench.py passes the body and the bearer token in the environment (BENCH_BODY, BENCH_TOKEN).
-- BENCH_UNIQUE=1: every request asks something new (a counter in the prompt), so a cache
-- misses every time. BENCH_SERVER_TIMING=1: collect the `Server-Timing: gateway;dur=<ms>`
-- header of every response and report its median and p99 (the gateway's own time).
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or '{"model":"bench","messages":[{"role":"user","content":"Say hello"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_TOKEN") or "sk-sg-bench-not-a-secret-0123456789")
-- BENCH_HEADERS="Name: value|Name: value": headers a target needs (Portkey's routing headers).
for pair in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^|]+") do
   local name, value = string.match(pair, "^%s*([^:]+):%s*(.-)%s*$")
   if name then wrk.headers[name] = value end
end

if os.getenv("BENCH_UNIQUE") == "1" then
   local counter = 0
   -- a stream scenario's fixed body asks for a stream: so does each new one
   local stream = string.find(wrk.body, '"stream":true', 1, true) and ',"stream":true' or ''
   local run = tostring(os.time())  -- a new run never hits what an earlier one stored
   request = function()
      counter = counter + 1
      local body = '{"model":"bench","messages":[{"role":"user","content":"Say hello ' ..
         run .. "-" .. counter .. '"}]' .. stream .. '}'
      return wrk.format(nil, nil, nil, body)
   end
end

timings = nil  -- global: done() reads each thread's copy with thread:get
if os.getenv("BENCH_SERVER_TIMING") == "1" then
   timings = {}
   response = function(status, headers, body)
      local value = headers["server-timing"] or headers["Server-Timing"]
      if value then
         local ms = tonumber(string.match(value, "dur=([%d%.]+)"))
         if ms then timings[#timings + 1] = ms end
      end
   end
end

local function percentile(values, p)
   if #values == 0 then return -1 end
   table.sort(values)
   local index = math.max(1, math.ceil(#values * p / 100))
   return math.floor(values[index] * 1000 + 0.5)  -- microseconds
end

-- Latency is wrk's time to the complete response, in microseconds.
function done(summary, latency, requests)
   local e = summary.errors
   local server = ""
   if timings then
      -- wrk gives done() the main thread's state; with -t1 the one worker thread's table is
      -- reached through the threads' own `timings` (see setup below).
      local all = {}
      for _, thread in ipairs(threads) do
         local part = thread:get("timings") or {}
         for _, ms in ipairs(part) do all[#all + 1] = ms end
      end
      server = string.format(" server_p50_us=%d server_p99_us=%d server_n=%d",
                             percentile(all, 50), percentile(all, 99), #all)
   end
   io.write(string.format(
      "BENCH_RESULT requests=%d duration_us=%d bytes=%d p50_us=%d p90_us=%d p99_us=%d " ..
      "max_us=%d connect=%d read=%d write=%d status=%d timeout=%d%s\n",
      summary.requests, summary.duration, summary.bytes,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      e.connect, e.read, e.write, e.status, e.timeout, server))
end

threads = {}
function setup(thread)
   threads[#threads + 1] = thread
end
