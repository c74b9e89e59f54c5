-- One request's decision (or a batch of them: see BATCH at the end), atomically, in one round
-- trip: the Lua twin of src/algorithm/ (`evaluate` and the three algorithms), with the same
-- rules, in the same order, giving the same answers. All quantities are integers below 2^53, exact in Lua's doubles.
--
-- KEYS     n counters, then their n hold keys.
-- KEYS[i]  counter i. Its value, packed by `struct` as little-endian doubles after a tag byte:
--          '<Bdd' 1, used, window end (fixed window); '<Bdd' 2, units, refilled at (token
--          bucket); '<Bddd' 3, window start, current, previous (sliding window). Its TTL is the
--          time until the state no longer matters. A value of another shape reads as no state.
--          A concurrency counter has no value: its slots are its holds.
-- KEYS[n+i] counter i's holds (`<counter key>:h`): a hash from reservation id to '<dd' amount,
--          expiry (ratekeeper's clock, ms); its TTL lasts until its last hold expires. Expired
--          (or malformed) holds are deleted by any call that touches the counter. On a
--          concurrency counter each hold is a slot (amount 1): a reservation's, under its id, or
--          an admission's, under '~<now_ms>.<n>' (the smallest n not taken).
-- ARGV     pairs of a `struct` format ('<' and one 'd' per number) and the numbers it packs,
--          little-endian doubles (one pair unless there are thousands of numbers). The
--          numbers, in order: now_ms (ratekeeper's clock: windows and refills), deadline_ms
--          (Redis's clock, 0: none), then for each counter its algorithm and parameters
--          (FIXED_WINDOW: max, and the length of a window opened now: its period, or for a
--          calendar window the rest of its calendar period; TOKEN_BUCKET: capacity, scale,
--          quantum, step_ms; SLIDING_WINDOW: max, period_ms; CONCURRENCY: max, lifetime_ms),
--          then the holds' latest expiry (RESERVE) and for each counter the hold a RESERVE
--          places on it (0: none), then for each group: its policy, k, and k pairs of a counter
--          index (1-based) and that counter's cost in the group (a limit's `cost:` weighs it).
--          The last ARGV is the reservation id (RESERVE, COMMIT; else empty).
-- Returns  '<Bd': DECIDED or TOO_LATE, and Redis's clock (TIME) in ms. TOO_LATE: Redis ran the
--          call after its deadline (the caller has given up on it, or is about to) and nothing
--          was read or written. DECIDED is followed by, for each group, for each of its
--          counters, packed as '<Bddddddddd': flags (1: over, 2: the group is admitted (COMMIT:
--          a hold was released), 4: a counter is at MAX_HOLDS), remaining, reset_in_ms,
--          retry_after_ms (-1: never), charged, overshoot, tokens held by this call, tokens
--          released, expired holds purged and their tokens (on a counter's first record only);
--          all concatenated. (A group without counters is admitted.)
--
-- The rules are written once: each algorithm is a set of functions over one counter (below),
-- and one loop applies a group's policy to its counters with them, whatever the mix.

-- The wire numbers, the same as Rust's (`Policy::wire`, `Algorithm::wire`; a unit test in
-- src/storage/redis.rs compares them).
local ALL_OR_NOTHING, CHECK_ONLY, CHARGE, REFUND, RESERVE, COMMIT = 0, 1, 2, 3, 4, 5
local FIXED_WINDOW, TOKEN_BUCKET, SLIDING_WINDOW, CONCURRENCY = 0, 1, 2, 3
local TOO_LATE, DECIDED, FAILED = 0, 1, 2
local MAX_HOLDS = 1000 -- holds per counter (Rust's MAX_HOLDS)

local MAX_COUNT = 9007199254740991
-- `SET … KEEPTTL` needs Redis 6.0; `redis.REDIS_VERSION_NUM` exists from 7.0 on, so older
-- servers set the TTL every time (as every version did before).
local KEEPTTL = redis.REDIS_VERSION_NUM ~= nil
local unpack, pack, floor, min, max = struct.unpack, struct.pack, math.floor, math.min, math.max

-- What the decisions of one call share: the clock of the decision being made (each sets it
-- first), the exact divisions and each algorithm's rules, made once per call, by the first
-- decision that needs them (making functions and tables is what costs most time here).
local now, idiv, cdiv, window, bucket, sliding, slots

-- The numbers of a stored value packed as `format` whose tag is `tag`; nil otherwise.
local function fields(stored, tag, format, size)
  if not stored or #stored ~= size then return nil end
  local t, x, y, z = unpack(format, stored)
  if t ~= tag or x ~= x or y ~= y then return nil end -- (x ~= x: NaN)
  if z ~= nil and z ~= z then return nil end
  return x, y, z
end

-- Time until `cost` would be admitted on top of the holds: as if they stayed; when cost and
-- holds together never fit, the time until the counter is back to its full budget.
local function retry_holding(c, cost)
  local rules = c.rules
  if c.held == 0 then
    local _, _, retry = rules.view(c, cost)
    return retry
  end
  local _, _, retry = rules.view(c, cost + c.held)
  if retry ~= -1 then return retry end
  local _, reset, alone = rules.view(c, cost)
  if alone == -1 then return -1 end
  return reset
end

local KEYS, ARGV = KEYS, ARGV

-- One decision: its KEYS and ARGV (as above) are the `key_count` after KEYS[k] and the
-- `arg_count` after ARGV[v] (a batch's decisions are read in place); Redis's clock (TIME) in ms.
local function decide(k, key_count, v, arg_count, redis_ms)
local num = {unpack(ARGV[v + 1], ARGV[v + 2])}
num[#num] = nil -- (unpack's last result is the position after the data)
for c = v + 3, v + arg_count - 1, 2 do -- further chunks, for batches too large for one unpack
  local more, m = {unpack(ARGV[c], ARGV[c + 1])}, #num
  for j = 1, #more - 1 do num[m + j] = more[j] end
end
local last = #num
now = num[1]
local id = ARGV[v + arg_count]
local n = key_count / 2

-- A call its caller answered as failed must never take effect later: Redis's own clock says
-- whether it is too late, against a deadline ratekeeper has put on Redis's clock.
if num[2] > 0 and redis_ms > num[2] then return pack('<Bd', TOO_LATE, redis_ms) end
local head = pack('<Bd', DECIDED, redis_ms)

-- The counters, with their parameters (their state is loaded below), and which algorithms the
-- call uses.
local counters, windows, buckets, slidings, concurrent = {}, false, false, false, false
local a = 3
for i = 1, n do
  local algorithm = num[a]
  -- Every field a counter gets, set at once: a table that grows is rebuilt, which costs more
  -- than the rest of a decision's bookkeeping. (Each algorithm adds at most 6 fields below.)
  local c = {algorithm = algorithm, rules = false, refused = false, dirty = false,
    hold_amount = 0, exists = false, hkey = false, held = 0, holds = 0, last = 0, mine = nil,
    expired_holds = 0, expired = 0, reported = false, cost = 0, check = 0, kept = false}
  counters[i] = c
  if algorithm == FIXED_WINDOW then
    windows = true
    c.max, c.period, c.used, c.ends = num[a + 1], num[a + 2], 0, 0
    a = a + 3
  elseif algorithm == TOKEN_BUCKET then
    buckets = true
    c.capacity, c.scale, c.quantum, c.step = num[a + 1], num[a + 2], num[a + 3], num[a + 4]
    c.units, c.refilled = 0, 0
    a = a + 5
  elseif algorithm == SLIDING_WINDOW then
    slidings = true
    c.max, c.period, c.start, c.current, c.previous = num[a + 1], num[a + 2], 0, 0, 0
    a = a + 3
  else
    concurrent = true
    c.max, c.lifetime, c.ids, c.sorted = num[a + 1], num[a + 2], false, false
    a = a + 3
  end
end
-- The holds a RESERVE places.
local hold_expires = num[a]
for i = 1, n do counters[i].hold_amount = num[a + i] end
a = a + 1 + n

-- idiv, cdiv: exact integer division (the bucket and the sliding window use them)
if (buckets or slidings) and not idiv then
  function idiv(x, y) -- floor(x / y), exact
    if y < 1 then y = 1 end
    local q = floor(x / y)
    if q * y > x then q = q - 1 elseif (q + 1) * y <= x then q = q + 1 end
    return q
  end

  function cdiv(x, y) -- ceil(x / y), exact
    if y < 1 then y = 1 end
    local q = idiv(x, y)
    if q * y < x then q = q + 1 end
    return q
  end
end

-- Each algorithm's rules, over a counter `c` (a table of its parameters and its state):
--   load(c, stored)  the state in force now (expired windows dropped, refills added); a
--                    missing state is new
--   admits(c, cost)  would `cost` be admitted?
--   charge(c, cost)  counts `cost`
--   refund(c, cost)  gives `cost` back (usage never below zero, a bucket never above its
--                    capacity); true if that changed the state
--   view(c, cost)    what the counter says now: remaining; reset_in (time until it is back to
--                    its full budget); retry_after (time until `cost` would be admitted, -1 if
--                    never); beyond (whole tokens beyond the limit); over (usage past the limit)
--   encode(c)        the stored value, and its TTL
-- Made only when a counter uses the algorithm (making functions and tables is what costs most
-- time here): most calls use one.

-- window: parameters max, period; state used, ends
if windows and not window then
  window = {
    load = function(c, stored)
      local used, ends = fields(stored, 1, '<Bdd', 17)
      if used and used >= 0 and ends > now then
        c.used, c.ends, c.kept = used, ends, true
      else
        c.used, c.ends = 0, now + c.period
      end
    end,
    admits = function(c, cost) return c.used + c.held + cost <= c.max end,
    charge = function(c, cost) c.used = min(c.used + cost, MAX_COUNT) end,
    refund = function(c, cost)
      local before = c.used
      c.used = max(c.used - cost, 0)
      return c.used ~= before
    end,
    view = function(c, cost)
      local used, limit, reset = c.used, c.max, max(c.ends - now, 0)
      local retry = 0
      if used + cost > limit then
        if cost <= limit then retry = reset else retry = -1 end
      end
      return max(limit - used, 0), reset, retry, max(used - limit, 0), used > limit
    end,
    -- (The window's end, so its TTL, is the stored one when it was in force: `kept`.)
    encode = function(c)
      return pack('<Bdd', 1, c.used, c.ends), max(c.ends - now, 1), c.kept
    end,
  }
end

-- bucket: parameters capacity, scale, quantum, step; state units, refilled
if buckets and not bucket then
  -- Time until the level reaches `target` units.
  local function time_to(c, target)
    local deficit = target - c.units
    if deficit <= 0 then return 0 end
    local quantum = c.quantum
    if quantum < 1 then quantum = 1 end
    local steps = cdiv(deficit, quantum)
    if steps > idiv(MAX_COUNT, c.step) then return MAX_COUNT end
    return max(steps * c.step - max(now - c.refilled, 0), 0)
  end
  bucket = {
    load = function(c, stored)
      local units, refilled = fields(stored, 2, '<Bdd', 17)
      if units then
        local steps = 0
        if now > refilled then steps = floor((now - refilled) / c.step) end
        c.units = units + min(steps * c.quantum, 2 * MAX_COUNT)
        c.refilled = refilled + steps * c.step
      end
      -- Full again is the same as new: refill steps start over at the next charge.
      if not units or c.units >= c.capacity then
        c.units, c.refilled = c.capacity, now
      end
    end,
    admits = function(c, cost) return c.units - c.held * c.scale >= cost * c.scale end,
    charge = function(c, cost)
      c.units = max(c.units - cost * c.scale, c.capacity - MAX_COUNT)
    end,
    refund = function(c, cost)
      local before = c.units
      c.units = min(c.units + cost * c.scale, c.capacity)
      -- Full again is the same as new (as in `load`): refill steps start over at the next charge.
      if c.units >= c.capacity then c.refilled = now end
      return c.units ~= before
    end,
    view = function(c, cost)
      local units, scale = c.units, c.scale
      local retry = -1
      if cost * scale <= c.capacity then retry = time_to(c, cost * scale) end
      return idiv(max(units, 0), scale), time_to(c, c.capacity), retry,
        idiv(max(-units, 0), scale), units < 0
    end,
    encode = function(c)
      return pack('<Bdd', 2, c.units, c.refilled), max(time_to(c, c.capacity), 1)
    end,
  }
end

-- sliding: parameters max, period; state start, current, previous
if slidings and not sliding then
  -- The estimate in token*ms.
  local function used(c)
    local elapsed = min(now - c.start, c.period)
    return c.previous * (c.period - elapsed) + c.current * c.period
  end
  local function reset_in(c)
    local until_ = now
    if c.current > 0 then
      until_ = c.start + 2 * c.period
    elseif c.previous > 0 then
      until_ = c.start + c.period
    end
    return max(until_ - now, 0)
  end
  local function retry_after(c, cost)
    local limit, period = c.max, c.period
    if cost > limit then return -1 end
    local elapsed = min(now - c.start, period)
    local function fits_from(weighted, held)
      local room = limit - cost - held
      if room < 0 then return nil end
      if weighted == 0 then return 0 end
      return max(period - idiv(room * period, weighted), 0)
    end
    local from = fits_from(c.previous, c.current)
    if from ~= nil and from < period then return max(from - elapsed, 0) end
    local next = fits_from(c.current, 0)
    if next == nil then return -1 end
    return (period - elapsed) + next
  end
  sliding = {
    load = function(c, stored)
      local start, current, previous = fields(stored, 3, '<Bddd', 25)
      local period = c.period
      c.start, c.current, c.previous = now, 0, 0
      if start then
        local windows = 0
        if now > start then windows = floor((now - start) / period) end
        if windows == 0 then
          c.start, c.current, c.previous = start, current, previous
        elseif windows == 1 then
          c.start, c.current, c.previous = start + period, 0, current
        end
      end
      -- Nothing counts any more: the same as new, the grid starts over at the next charge.
      if c.current == 0 and c.previous == 0 then c.start = now end
    end,
    admits = function(c, cost)
      return used(c) + (c.held + cost) * c.period <= c.max * c.period
    end,
    charge = function(c, cost) c.current = min(c.current + cost, MAX_COUNT) end,
    refund = function(c, cost)
      local before = c.current
      c.current = max(c.current - cost, 0)
      -- Nothing counts any more: the same as new (as in `load`).
      if c.current == 0 and c.previous == 0 then c.start = now end
      return c.current ~= before
    end,
    view = function(c, cost)
      local left = c.max * c.period - used(c)
      local remaining = 0
      if left > 0 then remaining = idiv(left, c.period) end
      return remaining, reset_in(c), retry_after(c, cost), max(c.current - c.max, 0), left < 0
    end,
    encode = function(c)
      return pack('<Bddd', 3, c.start, c.current, c.previous), max(reset_in(c), 1)
    end,
  }
end

-- slots: parameters max, lifetime; no state of its own: `ids` maps each live slot (hold)
-- to its end. `charge` takes a slot for an admission (false: the counter is at MAX_HOLDS),
-- `refund` frees the oldest slot an admission took; neither writes a counter value.
if concurrent and not slots then
  slots = {
    load = function(c, stored) c.ids = {} end, -- (filled with the holds, below)
    admits = function(c, cost) return c.held + 1 <= c.max end,
    charge = function(c, cost)
      if c.holds >= MAX_HOLDS then return false end
      local j, sid = 0, nil
      repeat
        sid = string.format('~%d.%d', now, j)
        j = j + 1
      until not c.ids[sid]
      local ends = now + c.lifetime
      redis.call('HSET', c.hkey, sid, pack('<dd', 1, ends))
      c.ids[sid], c.held, c.holds, c.sorted = ends, c.held + 1, c.holds + 1, nil
      if ends > c.last then c.last = ends end
      redis.call('PEXPIRE', c.hkey, max(c.last - now, 1))
      return true
    end,
    refund = function(c, cost)
      if cost < 1 then return false end
      local oldest, at = nil, nil
      for sid, ends in pairs(c.ids) do
        if string.sub(sid, 1, 1) == '~' and (at == nil or ends < at) then oldest, at = sid, ends end
      end
      if not oldest then return false end
      redis.call('HDEL', c.hkey, oldest)
      c.ids[oldest], c.held, c.holds, c.sorted = nil, c.held - 1, c.holds - 1, nil
      return true
    end,
    -- remaining: every slot (the caller subtracts the taken ones); reset_in: until the oldest
    -- ends; retry_after: until one more is free, whatever the cost.
    view = function(c, cost)
      local ends = c.sorted -- (sorted once per change: a view is asked several times)
      if not ends then
        ends = {}
        for _, e in pairs(c.ids) do ends[#ends + 1] = e end
        table.sort(ends)
        c.sorted = ends
      end
      local taken, reset, retry = #ends, 0, 0
      if taken > 0 then reset = max(ends[1] - now, 0) end
      if c.max < 1 then
        retry = -1
      elseif taken >= c.max then
        retry = max(ends[taken - c.max + 1] - now, 0)
      end
      return c.max, reset, retry, max(taken - c.max, 0), taken > c.max
    end,
  }
end

-- Each counter's state in force now, and its live holds (expired ones are deleted).
for i = 1, n do
  local c = counters[i]
  if c.algorithm == FIXED_WINDOW then
    c.rules = window
  elseif c.algorithm == TOKEN_BUCKET then
    c.rules = bucket
  elseif c.algorithm == SLIDING_WINDOW then
    c.rules = sliding
  else
    c.rules = slots
  end
  local stored = redis.call('GET', KEYS[k + i])
  c.exists = stored ~= false -- a refund never creates a counter
  c.rules.load(c, stored)
  local hkey = KEYS[k + n + i]
  c.hkey, c.held, c.holds, c.last, c.mine = hkey, 0, 0, 0, nil
  c.expired_holds, c.expired, c.reported = 0, 0, false
  local raw = redis.call('HGETALL', hkey)
  for j = 1, #raw, 2 do
    local amount, ends
    if #raw[j + 1] == 16 then amount, ends = unpack('<dd', raw[j + 1]) end
    if amount and amount == amount and ends == ends and ends > now then
      c.held, c.holds = c.held + amount, c.holds + 1
      if ends > c.last then c.last = ends end
      if id ~= '' and raw[j] == id then c.mine = amount end
      if c.ids then c.ids[raw[j]] = ends end
    else
      redis.call('HDEL', hkey, raw[j])
      if amount and amount == amount then
        c.expired_holds, c.expired = c.expired_holds + 1, c.expired + amount
      end
    end
  end
end

-- The groups, in order: a later group sees an earlier one's charges.
local out, o = nil, 0 -- the records: one string, or a table of them once there are two
while a <= last do
  local policy, k = num[a], num[a + 1]
  local first = a + 2
  a = first + 2 * k
  local admitted = true
  for j = first, a - 1, 2 do
    local c = counters[num[j]]
    local cost = num[j + 1]
    local check = cost
    if (policy == CHECK_ONLY or policy == RESERVE) and check < 1 then check = 1 end
    c.cost, c.check = cost, check
    -- A refund never refuses; a commit charges usage that happened.
    c.refused = policy ~= REFUND and policy ~= COMMIT and not c.rules.admits(c, check)
    if c.refused then admitted = false end
  end
  -- A RESERVE that would hold on a counter at the bound holds nothing; a COMMIT charges the
  -- counters that hold its id, or, when none does, every counter.
  local full, committed = false, false
  for j = first, a - 1, 2 do
    local c = counters[num[j]]
    if policy == RESERVE and admitted and c.hold_amount > 0 and c.holds >= MAX_HOLDS then
      full = true
    end
    if policy == COMMIT and c.mine then committed = true end
  end
  local holds = policy == RESERVE and admitted and not full
  local charges = policy == CHARGE or (policy == ALL_OR_NOTHING and admitted)
  local group_flag = (full and 4 or 0)
  if policy == COMMIT then
    if committed then group_flag = group_flag + 2 end
  elseif admitted and not full then
    group_flag = group_flag + 2
  end
  for j = first, a - 1, 2 do
    local c = counters[num[j]]
    local rules, cost, check = c.rules, c.cost, c.check
    local _, _, _, beyond_before = rules.view(c, check)
    local placed, released, charge = 0, 0, charges
    if policy == COMMIT then
      local found = committed and c.mine ~= nil
      if found then
        released = c.mine
        redis.call('HDEL', c.hkey, id)
        c.held, c.holds, c.mine = c.held - released, c.holds - 1, nil
        if c.ids then c.ids[id], c.sorted = nil, nil end
      end
      charge = cost > 0 and (not committed or found)
    elseif holds and c.hold_amount > 0 then
      placed = c.hold_amount
      local ends = hold_expires
      if c.algorithm == FIXED_WINDOW and c.ends < ends then ends = c.ends end
      if c.algorithm == CONCURRENCY and now + c.lifetime < ends then ends = now + c.lifetime end
      redis.call('HSET', c.hkey, id, pack('<dd', placed, ends))
      if c.mine then c.held, c.holds = c.held - c.mine, c.holds - 1 end -- (replaced)
      c.held, c.holds, c.mine = c.held + placed, c.holds + 1, placed
      if ends > c.last then c.last = ends end
      if c.ids then c.ids[id], c.sorted = ends, nil end
      -- At once, so the holds' key never lives without a TTL (even if a later write failed):
      -- until its last hold expires.
      redis.call('PEXPIRE', c.hkey, max(c.last - now, 1))
    end
    local retry = retry_holding(c, check)
    local charged, unplaced = 0, false
    if c.algorithm == CONCURRENCY then
      -- No usage to charge: what would charge takes a slot; a refund frees one.
      if charges then
        if rules.charge(c, cost) then placed = 1 else unplaced = true end
      elseif policy == REFUND and rules.refund(c, cost) then
        released = 1
      end
    elseif charge then
      rules.charge(c, cost)
      c.dirty = true
      charged = min(cost, MAX_COUNT)
    elseif policy == REFUND and (c.exists or c.dirty) and rules.refund(c, cost) then
      c.dirty = true
    end
    local remaining, reset, retry_one, beyond, over = rules.view(c, 1)
    if policy == REFUND then
      over, retry, beyond = false, 0, beyond_before
    elseif policy == CHARGE or policy == COMMIT then
      -- The usage happened: over when past the limit; retry when one more fits. (A charge that
      -- found no room for its slot is past the limit too.)
      over = over or unplaced
      if not over then retry_one = 0 end
      retry = retry_one
    else
      over = c.refused
    end
    local expired_holds, expired = 0, 0
    if not c.reported then
      c.reported, expired_holds, expired = true, c.expired_holds, c.expired
    end
    local record = pack('<Bddddddddd', group_flag + (over and 1 or 0),
      max(remaining - c.held, 0), reset, retry, charged, max(beyond - beyond_before, 0), placed,
      released, expired_holds, expired)
    o = o + 1
    if o == 1 then out = record elseif o == 2 then out = {out, record} else out[o] = record end
  end
end

for i = 1, n do
  local c = counters[i]
  if c.dirty then
    local value, ttl, kept = c.rules.encode(c)
    if kept and KEEPTTL then
      -- The stored TTL is still the right one: keeping it is much cheaper than setting it.
      redis.call('SET', KEYS[k + i], value, 'KEEPTTL')
    else
      -- An integer below 2^53 (limits/file.rs bounds `seconds`), written as one: Redis would
      -- write a number argument with '%.17g', which costs more.
      redis.call('SET', KEYS[k + i], value, 'PX', string.format('%d', ttl))
    end
  end
end
if o == 0 then return head end
if o == 1 then return head .. out end
return head .. table.concat(out)
end

-- BATCH: one call makes one decision, KEYS and ARGV as above; or, when ARGV[1] is 'batch',
-- several, in order: ARGV[2] is a `struct` format ('<' and one 'd' per number) and ARGV[3]
-- packs the number of decisions, then for each its number of KEYS and of ARGV; the decisions'
-- KEYS and ARGV (each as above) follow one after the other. A batch returns an array of the
-- decisions' answers, in order, where a decision that raised an error answers '<Bd' FAILED,
-- Redis's clock, and the error's text (it stops only that decision: what it wrote before stays,
-- as when it was alone; the others are made as usual). Redis's clock is read once: every
-- deadline is checked against the time the call started.
local time = redis.call('TIME')
local redis_ms = time[1] * 1000 + floor(time[2] / 1000)
if ARGV[1] ~= 'batch' then return decide(0, #KEYS, 0, #ARGV, redis_ms) end
local shape = {unpack(ARGV[2], ARGV[3])}
local count = shape[1]
local replies, done, k, v = {}, 0, 0, 3
-- The decisions after `done`, in order (`done` counts those made).
local function run()
  while done < count do
    local d = done + 1
    local key_count, arg_count = shape[2 * d], shape[2 * d + 1]
    local at_key, at_arg = k, v
    k, v = k + key_count, v + arg_count
    replies[d] = decide(at_key, key_count, at_arg, arg_count, redis_ms)
    done = d
  end
end
-- One pcall for the whole batch (a pcall per decision costs a tenth of a decision): after an
-- error, the decision that raised it is answered FAILED and the rest go on.
while done < count do
  local ok, err = pcall(run)
  if not ok then
    if type(err) == 'table' then err = err.err end
    done = done + 1
    replies[done] = pack('<Bd', FAILED, redis_ms) .. tostring(err)
  end
end
return replies
