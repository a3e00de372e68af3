-- Create a call record (unless one exists), index it by start time, and trim from the
-- index old entries whose record has expired.
-- KEYS[1] {p}call:{id}  KEYS[2] {p}calls
-- ARGV[1] prefix  ARGV[2] call id  ARGV[3] start ms  ARGV[4] active TTL ms  ARGV[5] retention ms
-- ARGV[6] trim cutoff ms  ARGV[7] trim batch  ARGV[8..] field, value...
-- Returns 1 when created, 0 when the record existed.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local fields = {}
local ended = false
for i = 8, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
  if ARGV[i] == 'state' and ARGV[i + 1] == 'ended' then ended = true end
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], ended and ARGV[5] or ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])

local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[6], 'LIMIT', 0, tonumber(ARGV[7]))
for _, id in ipairs(old) do
  if redis.call('EXISTS', ARGV[1] .. 'call:' .. id) == 0 then
    redis.call('ZREM', KEYS[2], id)
  end
end
return 1
