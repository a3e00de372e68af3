-- Release a lease: delete it only if it still carries this token (compare-and-delete).
-- Whether or not it was still there, if this token is the newest issued for the slot (or
-- nothing was issued for it since Redis lost its data), note that it was given back, so
-- that a late renew with it, or a worker's heartbeat re-asserting it, cannot bring the
-- lease back.
-- KEYS[1] the lease key  KEYS[2] {p}issued:{worker}  KEYS[3] {p}held:{worker}
-- ARGV[1] token  ARGV[2] slot  ARGV[3] bookkeeping TTL ms
-- Returns 1 when released, 0 when the lease was gone already or another token holds it.
local token = tonumber(ARGV[1])
local issued = redis.call('HGET', KEYS[2], ARGV[2])
if not issued or tonumber(string.match(issued, '^(%d+)')) == token then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[1] .. ' released')
  if not issued then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
end
local value = redis.call('GET', KEYS[1])
if value and tonumber(string.match(value, '^(%d+)')) == token then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[3], ARGV[2])
  return 1
end
if not value then
  redis.call('ZREM', KEYS[3], ARGV[2])  -- no lease at all: nothing for the index to count
end
return 0
