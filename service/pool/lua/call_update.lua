-- Update some fields of an existing call record (never re-creating an expired one) and
-- set its TTL by its state: active_ttl while active, retention once ended.
-- KEYS[1] {p}call:{id}
-- ARGV[1] active TTL ms  ARGV[2] retention ms  ARGV[3..] field, value...
-- Returns 1 when updated, 0 when there is no such record.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local fields = {}
for i = 3, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(fields))
if redis.call('HGET', KEYS[1], 'state') == 'ended' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 1
