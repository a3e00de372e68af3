-- Release a lease: delete it only if it still carries this token (compare-and-delete),
-- and note in the issued hash that this token was given back, so that a late renew with
-- it cannot bring the lease back.
-- KEYS[1] the lease key  KEYS[2] {p}issued:{worker}
-- ARGV[1] token  ARGV[2] slot
-- Returns 1 when released, 0 when the lease is gone or another token holds it.
local value = redis.call('GET', KEYS[1])
if value and tonumber(string.match(value, '^(%d+)')) == tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[2], ARGV[1] .. ' released')
  end
  return 1
end
return 0
