-- wrk script: send one fixed request target (absolute-form through a proxy, or origin-form
-- direct) and print a machine-readable summary line.
--
--   wrk -s proxy.lua http://127.0.0.1:PROXYPORT/ -- http://127.0.0.1:ORIGINPORT/path 127.0.0.1:ORIGINPORT [PROXY-AUTH]
--
-- PROXY-AUTH, when given, is sent as the Proxy-Authorization value of every request (a proxy with
-- authentication on: the same credentials each time, as a browser sends them).
--
-- wrk writes wrk.path verbatim into the request line, so an absolute URL there gives
-- "GET http://127.0.0.1:ORIGINPORT/path HTTP/1.1" while the socket goes to the proxy's port.
-- wrk.init sets Host from the connect URL before calling init(); we overwrite it with the
-- origin's authority, and wrk.init builds the request with wrk.format() after init() returns.

function init(args)
   if args[1] then
      wrk.path = args[1]
   end
   if args[2] then
      wrk.headers["Host"] = args[2]
   end
   if args[3] then
      wrk.headers["Proxy-Authorization"] = args[3]
   end
end

-- No response() on purpose: defining it makes wrk buffer and hand every body to Lua,
-- which would distort large-object throughput.  wrk counts status > 399 in errors.status.

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests":%d,"bytes":%d,"duration_us":%d,' ..
      '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
      '"lat_p50_us":%d,"lat_p99_us":%d,"lat_mean_us":%.1f,"lat_max_us":%d}\n',
      summary.requests, summary.bytes, summary.duration,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
