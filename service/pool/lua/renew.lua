-- Renew a lease (compare-and-pexpire on the token), or re-create it with the SAME token
-- when it is gone and nobody has been given the slot since (nor was it released): after
-- it expired, or after Redis lost its data. Re-creating also lifts the fencing counter to
-- at least the token, so later claims keep getting larger tokens.
--
-- KEYS[1] the lease key  KEYS[2] {p}issued:{worker}  KEYS[3] {p}fence  KEYS[4] {p}held:{worker}
-- ARGV[1] token  ARGV[2] TTL ms  ARGV[3] owner  ARGV[4] slot  ARGV[5] bookkeeping TTL ms
-- Returns 1 renewed, 2 re-created, 0 lost (another token holds or has held the slot, or
-- this one was released).
local token, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local value = redis.call('GET', KEYS[1])
if value then
  if tonumber(string.match(value, '^(%d+)')) == token then
    redis.call('PEXPIRE', KEYS[1], ttl)
    redis.call('ZADD', KEYS[4], now + ttl, ARGV[4])
    redis.call('PEXPIRE', KEYS[4], ARGV[5])
    return 1
  end
  return 0
end

local issued = redis.call('HGET', KEYS[2], ARGV[4])
if issued then
  local newest = tonumber(string.match(issued, '^(%d+)'))
  if newest > token or (newest == token and string.find(issued, 'released', 1, true)) then
    return 0
  end
end

redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[3], 'PX', ttl)
redis.call('ZADD', KEYS[4], now + ttl, ARGV[4])
redis.call('PEXPIRE', KEYS[4], ARGV[5])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
local fence = tonumber(redis.call('GET', KEYS[3]) or '0')
if fence < token then
  redis.call('SET', KEYS[3], ARGV[1])
end
return 2
