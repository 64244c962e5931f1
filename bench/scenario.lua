-- One benchmark scenario for wrk, configured by bench/run.py through the environment:
--   BENCH_METHOD  GET, POST, PUT, PATCH (default GET)
--   BENCH_PATH    path and query string, e.g. /api/tasks?status=open
--   BENCH_TOKEN   access token for "Authorization: Bearer ..." (none for /api/health)
--   BENCH_BODIES  a file with one JSON body per line; requests take them in turn, so a status
--                 change alternates open/closed and every request really changes its rows
-- done() prints one line "BENCH_RESULT {json}" with the counts and the latency percentiles (microseconds).
-- Any answer outside 2xx is counted (and the first one kept), so run.py can fail the scenario loudly.

local method = os.getenv("BENCH_METHOD") or "GET"
local path = os.getenv("BENCH_PATH") or "/"
local token = os.getenv("BENCH_TOKEN") or ""
local bodies_file = os.getenv("BENCH_BODIES") or ""

local headers = {}
if token ~= "" then
  headers["Authorization"] = "Bearer " .. token
end
local bodies = {}
if bodies_file ~= "" then
  for line in io.lines(bodies_file) do
    if line ~= "" then
      bodies[#bodies + 1] = line
    end
  end
  headers["Content-Type"] = "application/json"
end

-- Per-thread state, read back in done() through thread:get().
sent = 0
bad = 0
first_bad = ""

local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function request()
  sent = sent + 1
  local body = nil
  if #bodies > 0 then
    body = bodies[(sent - 1) % #bodies + 1]
  end
  return wrk.format(method, path, headers, body)
end

function response(status, _headers, body)
  if status < 200 or status > 299 then
    bad = bad + 1
    if first_bad == "" then
      first_bad = tostring(status) .. " " .. string.sub(body or "", 1, 300)
    end
  end
end

local function json_string(text)
  text = string.gsub(text, '[%c"\\]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end)
  return '"' .. text .. '"'
end

function done(summary, latency, _requests)
  local non2xx = 0
  local first = ""
  for _, thread in ipairs(threads) do
    non2xx = non2xx + (thread:get("bad") or 0)
    local text = thread:get("first_bad") or ""
    if first == "" and text ~= "" then
      first = text
    end
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "non2xx": %d, "first_non2xx": %s, '
      .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, "status_errors": %d, '
      .. '"p50_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, non2xx, json_string(first),
    errors.connect, errors.read, errors.write, errors.timeout, errors.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max, latency.mean
  ))
end
