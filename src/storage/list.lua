-- The live counters of one namespace (for the admin API). All of a namespace's keys share one
-- hash tag, so they sit on the node that owns KEYS[1]'s slot.
-- KEYS[1]  a key in the namespace's slot; ARGV[1] the SCAN MATCH pattern.
-- Returns  key, value, key, value, ...
local out = {}
local cursor = '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    local value = redis.call('GET', key)
    if value then
      out[#out + 1] = key
      out[#out + 1] = value
    end
  end
until cursor == '0'
return out
