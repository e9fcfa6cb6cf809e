-- wrk -s wrk_report.lua: print the run as one JSON line (latencies in us,
-- exact percentiles from wrk's histogram) after wrk's own report.
done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"mean":%.2f,"stdev":%.2f,"min":%d,"max":%d,' ..
      '"p50":%d,"p90":%d,"p99":%d,"p99_9":%d}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.stdev, latency.min, latency.max,
      latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)))
end
