-- One request's decision, atomically, in one round trip: the Lua twin of src/algorithm/
-- (`evaluate` and the three algorithms), with the same rules, in the same order, giving the same
-- answers. All quantities are integers below 2^53, exact in Lua's doubles.
--
-- KEYS[i]  counter i. Its value, packed by `struct` as little-endian doubles after a tag byte:
--          '<Bdd' 1, used, window end (fixed window); '<Bdd' 2, units, refilled at (token
--          bucket); '<Bddd' 3, window start, current, previous (sliding window). Its TTL is the
--          time until the state no longer matters. A value of another shape reads as no state.
-- ARGV     pairs of a `struct` format ('<' and one 'd' per number) and the numbers it packs,
--          little-endian doubles (one pair unless there are thousands of numbers). The
--          numbers, in order: now_ms, then for each counter its kind and
--          parameters (0 fixed window: max, period_ms; 1 token bucket: capacity, scale, quantum,
--          step_ms; 2 sliding window: max, period_ms), then for each group: policy
--          (0 all-or-nothing, 1 check only, 2 charge), cost, k, and k counter indices (1-based).
-- Returns  for each group, for each of its counters, packed as '<Bddddd': flags (1: over, 2: the
--          group is admitted), remaining, reset_in_ms, retry_after_ms (-1: never), charged,
--          overshoot; all concatenated. (A group without counters is admitted.)
local MAX_COUNT = 9007199254740991
local unpack, min, max = struct.unpack, math.min, math.max
local num = {unpack(ARGV[1], ARGV[2])}
num[#num] = nil -- (unpack's last result is the position after the data)
for c = 3, #ARGV, 2 do -- further chunks, for batches too large for one unpack
  local more, m = {unpack(ARGV[c], ARGV[c + 1])}, #num
  for j = 1, #more - 1 do num[m + j] = more[j] end
end
local last = #num
local now = num[1]
local n = #KEYS

if n == 1 and num[2] == 0 then
  -- One fixed window, the most common call: the rules of the fixed-window path below, with the
  -- state in locals. Every group holds the counter or nothing.
  local limit, period = num[3], num[4]
  local stored = redis.call('GET', KEYS[1])
  local tag, u, e
  if stored and #stored == 17 then tag, u, e = unpack('<Bdd', stored) end
  if not (tag == 1 and u >= 0 and e > now) then u, e = 0, now + period end
  local reset = max(e - now, 0)
  local dirty, out, o = false, nil, 0
  local a = 5
  while a <= last do
    local policy, cost, k = num[a], num[a + 1], num[a + 2]
    a = a + 3 + k
    if k == 1 then
      local check = cost
      if policy == 1 and check < 1 then check = 1 end
      local over = u + check > limit
      local group_flag = over and 0 or 2
      local beyond_before = max(u - limit, 0)
      local retry = 0
      if policy ~= 2 and over then
        if check <= limit then retry = reset else retry = -1 end
      end
      local charged = 0
      if (policy == 0 and not over) or policy == 2 then
        u = min(u + cost, MAX_COUNT)
        dirty = true
        charged = min(cost, MAX_COUNT)
      end
      if policy == 2 then
        over = u > limit
        if over then
          if 1 <= limit then retry = reset else retry = -1 end
        end
      end
      local record = struct.pack('<Bddddd', group_flag + (over and 1 or 0), max(limit - u, 0),
        reset, retry, charged, max(max(u - limit, 0) - beyond_before, 0))
      o = o + 1
      if o == 1 then out = record elseif o == 2 then out = {out, record} else out[o] = record end
    end
  end
  if dirty then
    local ttl = e - now
    if ttl < 1 then ttl = 1 end
    redis.call('SET', KEYS[1], struct.pack('<Bdd', 1, u, e), 'PX', ttl)
  end
  if o == 0 then return '' end
  if o == 1 then return out end
  return table.concat(out)
end

-- Several counters: where each counter's kind sits in `num` (its parameters follow), and
-- whether all are fixed windows (decided below without the generic machinery).
local at, only_windows = {}, true
local a = 2
for i = 1, n do
  at[i] = a
  if num[a] == 0 then
    a = a + 3
  else
    only_windows = false
    if num[a] == 1 then a = a + 5 else a = a + 3 end
  end
end
local groups_at = a

if only_windows then
  -- Fixed windows only: the same rules as the generic path below, inlined.
  local used, ends, dirty = {}, {}, {}
  for i = 1, n do
    local stored = redis.call('GET', KEYS[i])
    local tag, u, e
    if stored and #stored == 17 then tag, u, e = unpack('<Bdd', stored) end
    if tag == 1 and u >= 0 and e > now then
      used[i], ends[i] = u, e
    else
      used[i], ends[i] = 0, now + num[at[i] + 2]
    end
  end
  local out, o, refused = {}, 0, {}
  local pack = struct.pack
  a = groups_at
  while a <= last do
    local policy, cost, k = num[a], num[a + 1], num[a + 2]
    local first = a + 3
    a = first + k
    local check = cost
    if policy == 1 and check < 1 then check = 1 end
    local admitted = true
    for j = 1, k do
      local i = num[first + j - 1]
      local r = used[i] + check > num[at[i] + 1]
      refused[j] = r
      if r then admitted = false end
    end
    local group_flag = admitted and 2 or 0
    local charge = (policy == 0 and admitted) or policy == 2
    for j = 1, k do
      local i = num[first + j - 1]
      local u, limit, reset = used[i], num[at[i] + 1], max(ends[i] - now, 0)
      local beyond_before = max(u - limit, 0)
      local over, retry = refused[j], 0
      if policy ~= 2 and u + check > limit then
        if check <= limit then retry = reset else retry = -1 end
      end
      local charged = 0
      if charge then
        u = min(u + cost, MAX_COUNT)
        used[i], dirty[i] = u, true
        charged = min(cost, MAX_COUNT)
      end
      if policy == 2 then
        over = u > limit
        if over then
          if 1 <= limit then retry = reset else retry = -1 end
        end
      end
      o = o + 1
      out[o] = pack('<Bddddd', group_flag + (over and 1 or 0), max(limit - u, 0), reset, retry,
        charged, max(max(u - limit, 0) - beyond_before, 0))
    end
  end
  for i = 1, n do
    if dirty[i] then
      local ttl = ends[i] - now
      if ttl < 1 then ttl = 1 end
      redis.call('SET', KEYS[i], struct.pack('<Bdd', 1, used[i], ends[i]), 'PX', ttl)
    end
  end
  if o == 1 then return out[1] end
  return table.concat(out)
end

-- The generic path: any mix of algorithms.

local function idiv(x, y) -- floor(x / y), exact
  if y < 1 then y = 1 end
  local q = math.floor(x / y)
  if q * y > x then q = q - 1 elseif (q + 1) * y <= x then q = q + 1 end
  return q
end

local function cdiv(x, y) -- ceil(x / y), exact
  if y < 1 then y = 1 end
  local q = idiv(x, y)
  if q * y < x then q = q + 1 end
  return q
end

-- Per counter: kind, parameters p1..p4, state s1..s3.
local kind, p1, p2, p3, p4, s1, s2, s3, dirty = {}, {}, {}, {}, {}, {}, {}, {}, {}

-- The numbers of a stored value packed as `format` whose tag is `tag`; nil otherwise.
local function fields(stored, tag, format, size)
  if not stored or #stored ~= size then return nil end
  local t, x, y, z = unpack(format, stored)
  if t ~= tag or x ~= x or y ~= y then return nil end -- (x ~= x: NaN)
  if z ~= nil and z ~= z then return nil end
  return x, y, z
end

-- The state in force now (expired windows dropped, refills added); a missing state is new.
local function load(i, stored)
  local k = kind[i]
  if k == 0 then
    local used, ends = fields(stored, 1, '<Bdd', 17)
    if used and used >= 0 and ends > now then
      s1[i], s2[i] = used, ends
    else
      s1[i], s2[i] = 0, now + p2[i]
    end
  elseif k == 1 then
    local units, refilled = fields(stored, 2, '<Bdd', 17)
    if units then
      local steps = 0
      if now > refilled then steps = math.floor((now - refilled) / p4[i]) end
      s1[i] = units + math.min(steps * p3[i], 2 * MAX_COUNT)
      s2[i] = refilled + steps * p4[i]
    end
    -- Full again is the same as new: refill steps start over at the next charge.
    if not units or s1[i] >= p1[i] then
      s1[i], s2[i] = p1[i], now
    end
  else
    local start, current, previous = fields(stored, 3, '<Bddd', 25)
    if start then
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
  local limit, period = p1[i], p2[i]
  if cost > limit then return -1 end
  local elapsed = math.min(now - s1[i], period)
  local function fits_from(weighted, held)
    local room = limit - cost - held
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
  if k == 0 then return struct.pack('<Bdd', 1, s1[i], s2[i]) end
  if k == 1 then return struct.pack('<Bdd', 2, s1[i], s2[i]) end
  return struct.pack('<Bddd', 3, s1[i], s2[i], s3[i])
end

for i = 1, n do
  local b = at[i]
  kind[i] = num[b]
  p1[i], p2[i] = num[b + 1], num[b + 2]
  if kind[i] == 1 then p3[i], p4[i] = num[b + 3], num[b + 4] end
  dirty[i] = false
  load(i, redis.call('GET', KEYS[i]))
end

local out = {}
a = groups_at
while a <= last do
  local policy, cost, k = num[a], num[a + 1], num[a + 2]
  a = a + 3
  local check = cost
  if policy == 1 and check < 1 then check = 1 end
  local members, refused, admitted = {}, {}, true
  for j = 1, k do
    local i = num[a]
    a = a + 1
    members[j] = i
    refused[j] = not admits(i, check)
    if refused[j] then admitted = false end
  end
  local group_flag = admitted and 2 or 0
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
    out[#out + 1] = struct.pack('<Bddddd', group_flag + (over and 1 or 0), remaining(i),
      reset_in(i), retry, charged, math.max(beyond(i) - beyond_before, 0))
  end
end

for i = 1, n do
  if dirty[i] then
    redis.call('SET', KEYS[i], encode(i), 'PX', math.max(reset_in(i), 1))
  end
end
return table.concat(out)
