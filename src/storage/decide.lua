-- One request's decision, atomically, in one round trip: the Lua twin of
-- src/algorithm/mod.rs `evaluate` (same rules, same order, same answers).
--
-- KEYS[i]  counter i; its value is "<used> <expires_at_ms>", its TTL the rest of its window.
-- ARGV     now_ms, n, then (max, period_ms) for each counter, then g, then for each group:
--          policy (0 all-or-nothing, 1 check only, 2 charge), cost, k, then k counter indices.
-- Returns  for each group: admitted (0/1), then for each of its counters:
--          over (0/1), remaining, reset_in_ms, retry_after_ms (-1: never), charged, overshoot.
local MAX_COUNT = 9007199254740991
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local max, used, expires, dirty = {}, {}, {}, {}
local a = 3
for i = 1, n do
  max[i] = tonumber(ARGV[a])
  local period = tonumber(ARGV[a + 1])
  a = a + 2
  used[i], expires[i], dirty[i] = 0, now + period, false
  local stored = redis.call('GET', KEYS[i])
  if stored then
    local space = string.find(stored, ' ', 1, true)
    if space then
      local u = tonumber(string.sub(stored, 1, space - 1))
      local e = tonumber(string.sub(stored, space + 1))
      if u and e and e > now then
        used[i], expires[i] = u, e
      end
    end
  end
end

local function beyond(i, u)
  if u > max[i] then return u - max[i] end
  return 0
end

local out = {}
local groups = tonumber(ARGV[a])
a = a + 1
for _ = 1, groups do
  local policy, cost, k = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local check = cost
  if policy == 1 and check < 1 then check = 1 end
  local members, refused, admitted = {}, {}, true
  for j = 1, k do
    local i = tonumber(ARGV[a])
    a = a + 1
    members[j] = i
    refused[j] = not (used[i] + check <= max[i])
    if refused[j] then admitted = false end
  end
  out[#out + 1] = admitted and 1 or 0
  for j = 1, k do
    local i = members[j]
    local before = used[i]
    if (policy == 0 and admitted) or policy == 2 then
      used[i] = math.min(used[i] + cost, MAX_COUNT)
      dirty[i] = true
    end
    local after = used[i]
    local reset = expires[i] - now
    local over, retry
    if policy == 2 then
      over = after > max[i]
      retry = over and reset or 0
    else
      over = refused[j]
      if not refused[j] then retry = 0 elseif check <= max[i] then retry = reset else retry = -1 end
    end
    out[#out + 1] = over and 1 or 0
    out[#out + 1] = math.max(max[i] - after, 0)
    out[#out + 1] = reset
    out[#out + 1] = retry
    out[#out + 1] = after - before
    out[#out + 1] = beyond(i, after) - beyond(i, before)
  end
end

for i = 1, n do
  if dirty[i] then
    redis.call('SET', KEYS[i], string.format('%.0f %.0f', used[i], expires[i]),
      'PX', math.max(expires[i] - now, 1))
  end
end
return out
