-- Mixed traffic for `make soak`: wrk cycles through a request mix written by bench/soak.py.
-- Configured through the environment:
--   SOAK_MIX      a file with one request per line: NAME <tab> METHOD <tab> PATH <tab> JSON body (may be empty);
--                 soak.py repeats each kind as often as its weight and shuffles the lines
--   SOAK_TOKEN    access token for "Authorization: Bearer ..." (every request sends it; /api/health ignores it)
--   SOAK_START    where in the mix the first thread starts (soak.py moves it on for every interval)
--   SOAK_USERS    the ids of the users a created task can name (comma-separated): the task's own id is the one
--                 id in a create's answer that is none of them
--   SOAK_PENDING  a file of task ids created in the interval before and not deleted yet (the first thread takes them)
-- A "delete_own" line deletes a task this soak created (the oldest one not deleted yet), so the table keeps its
-- size; when there is none yet, GET /api/health goes instead (counted as delete_fallback).
-- done() prints one line "SOAK_RESULT {json}": counts, status codes, the first bad answers, the task ids left to
-- delete, and 1,000 latency quantiles (every 0.1 %, microseconds) so soak.py can merge the intervals.

local mix_file = os.getenv("SOAK_MIX") or ""
local token = os.getenv("SOAK_TOKEN") or ""
local start = tonumber(os.getenv("SOAK_START") or "0") or 0
local users = {}
for id in string.gmatch(os.getenv("SOAK_USERS") or "", "[^,]+") do
  users[id] = true
end
local pending_file = os.getenv("SOAK_PENDING") or ""

local mix = {}
for line in io.lines(mix_file) do
  if line ~= "" then
    local name, method, path, body = string.match(line, "^([^\t]*)\t([^\t]*)\t([^\t]*)\t?(.*)$")
    mix[#mix + 1] = { name = name, method = method, path = path, body = body }
  end
end

local plain = { ["Authorization"] = "Bearer " .. token }
local with_body = { ["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json" }

-- Per-thread state, read back in done() through thread:get() (as strings: plain values cross threads safely).
tid = 0
sent_total = 0
bad = 0
bad_samples = ""
statuses_text = ""
sent_text = ""
pending_text = ""
fallbacks = 0

local statuses = {}
local sent_by_name = {}
local pending = {}
local pending_first = 1
local loaded_pending = false
local position = 0

local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
  thread:set("tid", #threads)
end

local function load_pending()
  loaded_pending = true
  if tid ~= 1 or pending_file == "" then
    return
  end
  local handle = io.open(pending_file, "r")
  if handle == nil then
    return
  end
  for line in handle:lines() do
    if line ~= "" then
      pending[#pending + 1] = line
    end
  end
  handle:close()
end

local function remember()
  -- Keep the text forms current: done() only sees globals.
  local parts = {}
  for code, count in pairs(statuses) do
    parts[#parts + 1] = tostring(code) .. "=" .. tostring(count)
  end
  statuses_text = table.concat(parts, ",")
  parts = {}
  for name, count in pairs(sent_by_name) do
    parts[#parts + 1] = name .. "=" .. tostring(count)
  end
  sent_text = table.concat(parts, ",")
  parts = {}
  for index = pending_first, #pending do
    parts[#parts + 1] = pending[index]
  end
  pending_text = table.concat(parts, ",")
end

function request()
  if not loaded_pending then
    load_pending()
  end
  local entry = mix[(start + (tid - 1) * 7919 + position) % #mix + 1]
  position = position + 1
  local name, method, path, body = entry.name, entry.method, entry.path, entry.body
  if name == "delete_own" then
    if pending_first <= #pending then
      path = "/api/tasks/" .. pending[pending_first]
      pending_first = pending_first + 1 -- no holes in the list: # stays well defined
      remember() -- at once: if wrk stops before the answer, the id must not be handed on and deleted twice
    else
      name, method, path = "delete_fallback", "GET", "/api/health"
      fallbacks = fallbacks + 1
    end
  end
  sent_total = sent_total + 1
  sent_by_name[name] = (sent_by_name[name] or 0) + 1
  if sent_total % 50 == 0 then
    remember()
  end
  if body ~= nil and body ~= "" then
    return wrk.format(method, path, with_body, body)
  end
  return wrk.format(method, path, plain)
end

function response(status, _headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status < 200 or status > 299 then
    bad = bad + 1
    if bad <= 3 then
      local text = string.gsub(string.sub(body or "", 1, 300), "%s+$", "")
      bad_samples = bad_samples .. tostring(status) .. " " .. text .. "\n"
    end
  elseif status == 201 and body ~= nil then
    -- Only a create answers 201: keep the new task's id for a later delete_own.
    for id in string.gmatch(body, '"id"%s*:%s*"([%x%-]+)"') do
      if not users[id] then
        pending[#pending + 1] = id
        break
      end
    end
  end
  remember()
end

local function json_string(text)
  text = string.gsub(text, '[%c"\\]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end)
  return '"' .. text .. '"'
end

function done(summary, latency, _requests)
  local statuses_all, sent_all, pending_all = {}, {}, {}
  local bad_all, samples, fallback_all = 0, "", 0
  for _, thread in ipairs(threads) do
    bad_all = bad_all + (thread:get("bad") or 0)
    fallback_all = fallback_all + (thread:get("fallbacks") or 0)
    samples = samples .. (thread:get("bad_samples") or "")
    for _, pair in ipairs({ { "statuses_text", statuses_all }, { "sent_text", sent_all } }) do
      for key, count in string.gmatch(thread:get(pair[1]) or "", "([^,=]+)=(%d+)") do
        pair[2][key] = (pair[2][key] or 0) + tonumber(count)
      end
    end
    for id in string.gmatch(thread:get("pending_text") or "", "[^,]+") do
      pending_all[#pending_all + 1] = json_string(id)
    end
  end
  local function counts(map)
    local parts = {}
    for key, count in pairs(map) do
      parts[#parts + 1] = json_string(tostring(key)) .. ": " .. tostring(count)
    end
    return "{" .. table.concat(parts, ", ") .. "}"
  end
  local quantiles = {}
  for step = 1, 1000 do
    quantiles[step] = tostring(latency:percentile(step / 10))
  end
  local errors = summary.errors
  io.write(string.format(
    'SOAK_RESULT {"requests": %d, "duration_us": %d, "non2xx": %d, "bad_samples": %s, "statuses": %s, '
      .. '"sent": %s, "pending": [%s], "fallbacks": %d, "connect_errors": %d, "read_errors": %d, '
      .. '"write_errors": %d, "timeouts": %d, "status_errors": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, '
      .. '"mean_us": %.1f, "quantiles_us": [%s]}\n',
    summary.requests, summary.duration, bad_all, json_string(samples), counts(statuses_all), counts(sent_all),
    table.concat(pending_all, ", "), fallback_all, errors.connect, errors.read, errors.write, errors.timeout,
    errors.status, latency:percentile(50), latency:percentile(99), latency.max, latency.mean,
    table.concat(quantiles, ", ")
  ))
end
