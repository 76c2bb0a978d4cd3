-- wrk script for the ingest benchmark: unique generation ids, keys round-robin from the
-- KEYS environment variable (comma-separated), public literal-IP callback URLs.
local keys = {}
for key in string.gmatch(os.getenv("KEYS") or "", "[^,]+") do keys[#keys + 1] = key end
local tag = os.getenv("TAG") or "w"
local counter = 0
local thread_id = 0
local threads = 0

function setup(thread)
  thread:set("thread_id", threads)
  threads = threads + 1
end

function request()
  counter = counter + 1
  local key = keys[(counter % #keys) + 1]
  local body = string.format(
    '{"generation_id":"gen_%s_%d_%d","callback_url":"https://93.184.216.34/hooks/%d","metadata":{"n":%d}}',
    tag, thread_id, counter, counter, counter)
  return wrk.format("POST", "/v1/subscriptions",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}, body)
end

function done(summary, latency, requests)
  local codes = summary.errors.status
  io.write(string.format('{"requests": %d, "seconds": %.3f, "non2xx": %d, "socket_errors": %d, "p50_ms": %.2f, "p99_ms": %.2f}\n',
    summary.requests, summary.duration / 1e6, codes,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
