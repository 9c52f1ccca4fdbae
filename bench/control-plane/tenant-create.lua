-- wrk script: POST /v1/tenants with a unique tenant id per request.
-- Environment: CP_TOKEN (admin token), CP_PREFIX (id prefix, unique per run).
local counter = 0
local thread_id = 0
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  token = os.getenv("CP_TOKEN")
  prefix = os.getenv("CP_PREFIX") or "bench"
end

function request()
  counter = counter + 1
  local id = string.format("%s-%d-%d", prefix, tid, counter)
  local body = string.format(
    '{"tenant_id":"%s","organization_id":"bench-org","profile":"mt-standard","region":"eu-west-1","quotas":{"units":1}}',
    id)
  return wrk.format("POST", "/v1/tenants", {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
  }, body)
end

function done(summary, latency, requests)
  local ok = summary.requests - summary.errors.status - summary.errors.connect - summary.errors.read - summary.errors.write - summary.errors.timeout
  io.write(string.format("RESULT requests=%d non2xx=%d duration_s=%.3f rps=%.1f p50_ms=%.2f p99_ms=%.2f\n",
    summary.requests, summary.errors.status, summary.duration / 1e6,
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
