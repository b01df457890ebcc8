-- wrk script for bench/webhook.sh: POSTs a GitHub push payload with a valid
-- X-Hub-Signature-256 and a fresh X-GitHub-Delivery per request. drover also remembers
-- GitHub bodies by hash, so only the first request makes a job: the rest measure the whole
-- verification (body read, HMAC, replay lookup) answered `duplicate`, without a job.
-- Env: BODY_FILE (payload), SIGNATURE ("sha256=<hex>" of the payload), HOOK_PATH.
--
-- The request is formatted once with a placeholder id and split around it, so each request
-- costs wrk one string concatenation (wrk shares the two cores with drover). No response()
-- callback: it would make wrk hand every response to Lua; drover's own metrics count the
-- answers instead.

local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
end

function init(args)
  local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
  local body = f:read("*a")
  f:close()
  local placeholder = "DELIVERY-PLACEHOLDER"
  local headers = {
    ["Content-Type"] = "application/json",
    ["X-GitHub-Event"] = "push",
    ["X-GitHub-Delivery"] = placeholder,
    ["X-Hub-Signature-256"] = os.getenv("SIGNATURE"),
  }
  local raw = wrk.format("POST", os.getenv("HOOK_PATH") or "/hooks/github", headers, body)
  local at = assert(string.find(raw, placeholder, 1, true))
  prefix = string.sub(raw, 1, at - 1) .. "bench-" .. tid .. "-"
  suffix = string.sub(raw, at + #placeholder)
  counter = 0
end

function request()
  counter = counter + 1
  return prefix .. counter .. suffix
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  io.write(string.format("requests: %d in %.2f s\n", summary.requests, secs))
  io.write(string.format("requests/s: %.0f\n", summary.requests / secs))
  io.write(string.format("latency p50: %.3f ms\n", latency:percentile(50) / 1000))
  io.write(string.format("latency p99: %.3f ms\n", latency:percentile(99) / 1000))
  io.write(string.format("latency max: %.3f ms\n", latency.max / 1000))
  local e = summary.errors
  io.write(string.format("errors: connect %d, read %d, write %d, timeout %d, status %d\n",
    e.connect, e.read, e.write, e.timeout, e.status))
end
