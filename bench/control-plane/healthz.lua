-- wrk script: GET /healthz, the HTTP stack's ceiling on this machine.
function done(summary, latency, requests)
  io.write(string.format("RESULT requests=%d non2xx=%d duration_s=%.3f rps=%.1f p50_ms=%.2f p99_ms=%.2f\n",
    summary.requests, summary.errors.status, summary.duration / 1e6,
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
