-- Release a lease: delete it only if it still carries this token (compare-and-delete).
-- Whether or not it was still there, if this token is the newest issued for the slot (or
-- nothing was issued for it since Redis lost its data), note that it was given back, so
-- that a late renew with it, or a worker's heartbeat re-asserting it, cannot bring the
-- lease back.
-- A release frees memory, so it must work when Redis is full (maxmemory, noeviction): the
-- deletes come first and the note is written with pcall (a full Redis may refuse it; then
-- only that note is missing, and a heartbeat could bring the lease back for its short TTL).
-- KEYS[1] the lease key  KEYS[2] {p}issued:{worker}  KEYS[3] {p}held:{worker}
-- ARGV[1] token  ARGV[2] slot  ARGV[3] bookkeeping TTL ms
-- Returns 1 when released, 0 when the lease was gone already or another token holds it.
local token = tonumber(ARGV[1])
local released = 0
local value = redis.call('GET', KEYS[1])
if value and tonumber(string.match(value, '^(%d+)')) == token then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[3], ARGV[2])
  released = 1
elseif not value then
  redis.call('ZREM', KEYS[3], ARGV[2])  -- no lease at all: nothing for the index to count
end
local issued = redis.call('HGET', KEYS[2], ARGV[2])
if not issued or tonumber(string.match(issued, '^(%d+)')) == token then
  redis.pcall('HSET', KEYS[2], ARGV[2], ARGV[1] .. ' released')
  if not issued then redis.pcall('PEXPIRE', KEYS[2], ARGV[3]) end
end
return released
