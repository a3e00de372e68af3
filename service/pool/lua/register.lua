-- Register or heartbeat a worker: first re-assert the leases of the sessions it is serving,
-- then its whole registration (so a Redis that lost its data is repopulated at once), and
-- lift the fencing counter to at least the highest token the worker has seen (tokens stay
-- monotonic across a Redis restart without persistence).
--
-- Re-asserting before registering, in one script, is what keeps a live call's slot after
-- Redis comes back empty: a worker is claimable only once its registration exists, and
-- that happens in the same atomic step that puts back the lease of every session it
-- serves. Per live session (slot, token, owner):
--   the lease holds this token       -> its TTL is raised to at least ARGV[6] (the worker
--                                       co-holds the lease while the session lives)
--   no lease, and no newer token was issued for the slot nor this one released
--                                    -> re-created with this token, TTL ARGV[6]
--   otherwise (another token holds or has held the slot, or this one was released)
--                                    -> left alone: the session is being fenced out or ending
--
-- KEYS[1] {p}workers  KEYS[2] {p}worker:{id}  KEYS[3] {p}fence
-- ARGV[1] worker id  ARGV[2] registration TTL ms  ARGV[3] highest token seen
-- ARGV[4] forget dead workers after this many ms  ARGV[5] key prefix
-- ARGV[6] how long a live session keeps its lease, ms  ARGV[7] bookkeeping TTL ms
-- ARGV[8] n, the number of live sessions, then n triples slot, token, owner
-- then field, value, field, value... of the registration
-- Returns {fence after the bump, leases re-created, leases kept, leases left to another token}.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local id, prefix = ARGV[1], ARGV[5]
local hold_ms, keep_ms = tonumber(ARGV[6]), ARGV[7]
local held_index = prefix .. 'held:' .. id
local issued_key = prefix .. 'issued:' .. id

-- The registration is rewritten whole; deleting it first also makes this script's later
-- writes allowed when Redis is at maxmemory (a script that has written may go on), so a
-- full Redis does not drop a live worker from the pool.
redis.call('DEL', KEYS[2])

local seen = tonumber(ARGV[3])
local fence = tonumber(redis.call('GET', KEYS[3]) or '0')
local recreated, kept, conflicts = 0, 0, 0
local n = tonumber(ARGV[8])
for i = 0, n - 1 do
  local slot, token_text, owner = ARGV[9 + 3 * i], ARGV[10 + 3 * i], ARGV[11 + 3 * i]
  local token = tonumber(token_text)
  local lease = prefix .. 'lease:' .. id .. ':' .. slot
  local value = redis.call('GET', lease)
  if value then
    if tonumber(string.match(value, '^(%d+)')) == token then
      local left = redis.call('PTTL', lease)
      if left < hold_ms then
        redis.call('PEXPIRE', lease, hold_ms)
        left = hold_ms
      end
      redis.call('ZADD', held_index, now + left, slot)
      kept = kept + 1
    else
      conflicts = conflicts + 1
    end
  else
    local issued = redis.call('HGET', issued_key, slot)
    local newest = issued and tonumber(string.match(issued, '^(%d+)'))
    if issued and (newest > token or (newest == token and string.find(issued, 'released', 1, true))) then
      conflicts = conflicts + 1
    else
      redis.call('SET', lease, token_text .. '|' .. owner, 'PX', hold_ms)
      redis.call('ZADD', held_index, now + hold_ms, slot)
      redis.call('HSET', issued_key, slot, token_text)
      recreated = recreated + 1
    end
  end
  if token > seen then seen = token end
end
if n > 0 then
  redis.call('PEXPIRE', held_index, keep_ms)
  if recreated > 0 then redis.call('PEXPIRE', issued_key, keep_ms) end
end

local fields = {}
for i = 9 + 3 * n, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
fields[#fields + 1] = 'last_seen_ms'
fields[#fields + 1] = now

redis.call('HSET', KEYS[2], unpack(fields))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[1], now, id)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[4]))

if fence < seen then
  redis.call('SET', KEYS[3], string.format('%d', seen))
  fence = seen
end
return {fence, recreated, kept, conflicts}
