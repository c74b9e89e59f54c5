-- One request's decision, atomically, in one round trip: the Lua twin of src/algorithm/
-- (`evaluate` and the three algorithms), with the same rules, in the same order, giving the same
-- answers. All quantities are integers below 2^53, exact in Lua's doubles.
--
-- KEYS[i]  counter i. Its value: "w <used> <window end>" (fixed window), "b <units> <refilled at>"
--          (token bucket) or "s <window start> <current> <previous>" (sliding window); its TTL
--          is the time until the state no longer matters.
-- ARGV     now_ms, n, then for each counter: kind (0 fixed window, 1 token bucket, 2 sliding
--          window) and four parameters (fixed and sliding: max, period_ms, 0, 0; bucket:
--          capacity, scale, quantum, step_ms); then g, then for each group: policy
--          (0 all-or-nothing, 1 check only, 2 charge), cost, k, and k counter indices (1-based).
-- Returns  for each group: admitted (0/1), then for each of its counters:
--          over (0/1), remaining, reset_in_ms, retry_after_ms (-1: never), charged, overshoot.
local MAX_COUNT = 9007199254740991
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])

local function idiv(a, b) -- floor(a / b), exact
  if b < 1 then b = 1 end
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end

local function cdiv(a, b) -- ceil(a / b), exact
  if b < 1 then b = 1 end
  local q = idiv(a, b)
  if q * b < a then q = q + 1 end
  return q
end

-- Per counter: kind, parameters p1..p4, state s1..s3.
local kind, p1, p2, p3, p4, s1, s2, s3, dirty = {}, {}, {}, {}, {}, {}, {}, {}, {}

-- The numbers of a stored value "<tag> <a> <b>[ <c>]" whose tag is `tag`; nil otherwise.
local function fields(stored, tag)
  if not stored or string.sub(stored, 1, 2) ~= tag .. ' ' then return nil end
  local space = string.find(stored, ' ', 3, true)
  if not space then return nil end
  local a = tonumber(string.sub(stored, 3, space - 1))
  local rest = string.sub(stored, space + 1)
  local second = string.find(rest, ' ', 1, true)
  if second then
    return a, tonumber(string.sub(rest, 1, second - 1)), tonumber(string.sub(rest, second + 1))
  end
  return a, tonumber(rest), nil
end

-- The state in force now (expired windows dropped, refills added); a missing state is new.
local function load(i, stored)
  local k = kind[i]
  if k == 0 then
    local used, ends = fields(stored, 'w')
    if used and ends and ends > now then
      s1[i], s2[i] = used, ends
    else
      s1[i], s2[i] = 0, now + p2[i]
    end
  elseif k == 1 then
    local units, at = fields(stored, 'b')
    if units and at then
      local steps = 0
      if now > at then steps = math.floor((now - at) / p4[i]) end
      s1[i] = units + math.min(steps * p3[i], 2 * MAX_COUNT)
      s2[i] = at + steps * p4[i]
    end
    -- Full again is the same as new: refill steps start over at the next charge.
    if not (units and at) or s1[i] >= p1[i] then
      s1[i], s2[i] = p1[i], now
    end
  else
    local start, current, previous = fields(stored, 's')
    if start and current and previous then
      local windows = 0
      if now > start then windows = math.floor((now - start) / p2[i]) end
      if windows == 0 then
        s1[i], s2[i], s3[i] = start, current, previous
      elseif windows == 1 then
        s1[i], s2[i], s3[i] = start + p2[i], 0, current
      else
        s1[i], s2[i], s3[i] = now, 0, 0
      end
    else
      s1[i], s2[i], s3[i] = now, 0, 0
    end
    -- Nothing counts any more: the same as new, the grid starts over at the next charge.
    if s2[i] == 0 and s3[i] == 0 then s1[i] = now end
  end
end

-- Sliding window: the estimate in token*ms.
local function sliding_used(i)
  local elapsed = math.min(now - s1[i], p2[i])
  return s3[i] * (p2[i] - elapsed) + s2[i] * p2[i]
end

local function admits(i, cost)
  local k = kind[i]
  if k == 0 then return s1[i] + cost <= p1[i] end
  if k == 1 then return s1[i] >= cost * p2[i] end
  return sliding_used(i) + cost * p2[i] <= p1[i] * p2[i]
end

local function charge(i, cost)
  local k = kind[i]
  if k == 0 then s1[i] = math.min(s1[i] + cost, MAX_COUNT)
  elseif k == 1 then s1[i] = math.max(s1[i] - cost * p2[i], p1[i] - MAX_COUNT)
  else s2[i] = math.min(s2[i] + cost, MAX_COUNT) end
  dirty[i] = true
end

local function is_over(i)
  local k = kind[i]
  if k == 0 then return s1[i] > p1[i] end
  if k == 1 then return s1[i] < 0 end
  return sliding_used(i) > p1[i] * p2[i]
end

local function beyond(i)
  local k = kind[i]
  if k == 0 then return math.max(s1[i] - p1[i], 0) end
  if k == 1 then return idiv(math.max(-s1[i], 0), p2[i]) end
  return math.max(s2[i] - p1[i], 0)
end

local function remaining(i)
  local k = kind[i]
  if k == 0 then return math.max(p1[i] - s1[i], 0) end
  if k == 1 then return idiv(math.max(s1[i], 0), p2[i]) end
  local left = p1[i] * p2[i] - sliding_used(i)
  if left <= 0 then return 0 end
  return idiv(left, p2[i])
end

-- Token bucket: time until the level reaches `target` units.
local function bucket_time_to(i, target)
  local deficit = target - s1[i]
  if deficit <= 0 then return 0 end
  local quantum = p3[i]
  if quantum < 1 then quantum = 1 end
  local steps = cdiv(deficit, quantum)
  if steps > idiv(MAX_COUNT, p4[i]) then return MAX_COUNT end
  return math.max(steps * p4[i] - math.max(now - s2[i], 0), 0)
end

local function reset_in(i)
  local k = kind[i]
  if k == 0 then return math.max(s2[i] - now, 0) end
  if k == 1 then return bucket_time_to(i, p1[i]) end
  local untill = now
  if s2[i] > 0 then untill = s1[i] + 2 * p2[i] elseif s3[i] > 0 then untill = s1[i] + p2[i] end
  return math.max(untill - now, 0)
end

-- Time until `cost` would be admitted; -1 if never.
local function retry_after(i, cost)
  local k = kind[i]
  if k == 0 then
    if admits(i, cost) then return 0 end
    if cost <= p1[i] then return reset_in(i) end
    return -1
  end
  if k == 1 then
    local needed = cost * p2[i]
    if needed > p1[i] then return -1 end
    return bucket_time_to(i, needed)
  end
  local max, period = p1[i], p2[i]
  if cost > max then return -1 end
  local elapsed = math.min(now - s1[i], period)
  local function fits_from(weighted, held)
    local room = max - cost - held
    if room < 0 then return nil end
    if weighted == 0 then return 0 end
    return math.max(period - idiv(room * period, weighted), 0)
  end
  local from = fits_from(s3[i], s2[i])
  if from ~= nil and from < period then return math.max(from - elapsed, 0) end
  local next = fits_from(s2[i], 0)
  if next == nil then return -1 end
  return (period - elapsed) + next
end

local function encode(i)
  local k = kind[i]
  if k == 0 then return string.format('w %.0f %.0f', s1[i], s2[i]) end
  if k == 1 then return string.format('b %.0f %.0f', s1[i], s2[i]) end
  return string.format('s %.0f %.0f %.0f', s1[i], s2[i], s3[i])
end

local a = 3
for i = 1, n do
  kind[i] = tonumber(ARGV[a])
  p1[i], p2[i], p3[i], p4[i] = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]),
    tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  a = a + 5
  dirty[i] = false
  load(i, redis.call('GET', KEYS[i]))
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
    refused[j] = not admits(i, check)
    if refused[j] then admitted = false end
  end
  out[#out + 1] = admitted and 1 or 0
  for j = 1, k do
    local i = members[j]
    local beyond_before = beyond(i)
    local over, retry = refused[j], 0
    if policy ~= 2 then retry = retry_after(i, check) end
    local charged = 0
    if (policy == 0 and admitted) or policy == 2 then
      charge(i, cost)
      charged = math.min(cost, MAX_COUNT)
    end
    if policy == 2 then
      over = is_over(i)
      if over then retry = retry_after(i, 1) end
    end
    out[#out + 1] = over and 1 or 0
    out[#out + 1] = remaining(i)
    out[#out + 1] = reset_in(i)
    out[#out + 1] = retry
    out[#out + 1] = charged
    out[#out + 1] = math.max(beyond(i) - beyond_before, 0)
  end
end

for i = 1, n do
  if dirty[i] then
    local ttl
    if kind[i] == 0 then ttl = s2[i] - now else ttl = reset_in(i) end
    redis.call('SET', KEYS[i], encode(i), 'PX', math.max(ttl, 1))
  end
end
return out
