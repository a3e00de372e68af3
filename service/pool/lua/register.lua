-- Register or heartbeat a worker: re-assert its whole registration (so a Redis that lost
-- its data is repopulated at once), refresh its TTL, and lift the fencing counter to at
-- least the highest token the worker has seen (tokens stay monotonic across a Redis
-- restart without persistence).
--
-- KEYS[1] {p}workers  KEYS[2] {p}worker:{id}  KEYS[3] {p}fence
-- ARGV[1] worker id  ARGV[2] TTL ms  ARGV[3] highest token seen  ARGV[4] forget dead workers
-- after this many ms  ARGV[5..] field, value, field, value...
-- Returns the fencing counter after the bump.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local fields = {}
for i = 5, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
fields[#fields + 1] = 'last_seen_ms'
fields[#fields + 1] = now

redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[4]))

local seen = tonumber(ARGV[3])
local fence = tonumber(redis.call('GET', KEYS[3]) or '0')
if fence < seen then
  redis.call('SET', KEYS[3], ARGV[3])
  fence = seen
end
return fence
