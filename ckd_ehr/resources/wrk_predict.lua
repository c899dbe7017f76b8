-- wrk script of `ckd-ehr bench serve --load-generator wrk` (ckd_ehr/bench/wrk.py):
--   CKD_EHR_TOKEN=... wrk -t T -c C -d Ds -s wrk_predict.lua URL -- BODIES_FILE RETRY
-- Each request POSTs the next line of BODIES_FILE (one JSON body per line) to /v1/predict.
-- RETRY: "honour" waits the Retry-After of a 503 before that thread's next request (wrk's
-- delay()); "at-once" sends the next request as soon as any answer arrives.
-- wrk's Lua sees threads, not connections: a 503's wait is queued on its thread and taken by
-- the thread's next request, which is the shedding connection's next request unless another
-- connection of the thread became writable first. The waits add up either way.
-- done() prints one JSON line starting with "CKD_EHR_WRK " (counts by status, latency).

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_number", #threads)
end

function init(args)
  bodies = {}
  for line in io.lines(args[1]) do
    if #line > 0 then bodies[#bodies + 1] = line end
  end
  honour = args[2] == "honour"
  headers = { ["Content-Type"] = "application/json" }
  local token = os.getenv("CKD_EHR_TOKEN")
  if token and #token > 0 then headers["Authorization"] = "Bearer " .. token end
  path = wrk.path:gsub("/$", "") .. "/v1/predict"
  math.randomseed(thread_number)   -- threads start at different bodies
  index = math.random(#bodies)
  waits = {}           -- queued Retry-After waits (ms) of this thread
  status_200, status_503, status_other, waited_ms = 0, 0, 0, 0
end

function request()
  index = index % #bodies + 1
  return wrk.format("POST", path, headers, bodies[index])
end

function response(status, resp_headers, body)
  if status == 200 then
    status_200 = status_200 + 1
  elseif status == 503 then
    status_503 = status_503 + 1
    if honour then
      local after = resp_headers["retry-after"] or resp_headers["Retry-After"] or "1"
      waits[#waits + 1] = (tonumber(after) or 1) * 1000
    end
  else
    status_other = status_other + 1
  end
end

function delay()
  if #waits == 0 then return 0 end
  local ms = table.remove(waits, 1)
  waited_ms = waited_ms + ms
  return ms
end

function done(summary, latency, requests)
  local s200, s503, other, waited = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    s200 = s200 + t:get("status_200")
    s503 = s503 + t:get("status_503")
    other = other + t:get("status_other")
    waited = waited + t:get("waited_ms")
  end
  local e = summary.errors
  io.write(string.format(
    'CKD_EHR_WRK {"duration_us": %d, "requests": %d, "status_200": %d, "status_503": %d, ' ..
    '"status_other": %d, "waited_ms": %d, "errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"timeout": %d, "status": %d}, "latency_us": {"p50": %d, "p90": %d, "p99": %d, "p999": %d, ' ..
    '"max": %d, "mean": %.1f}}\n',
    summary.duration, summary.requests, s200, s503, other, waited, e.connect, e.read, e.write,
    e.timeout, e.status, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
