-- Claim one free slot, atomically: pick a live, ready model worker (role 'model', or no
-- role: registered before roles existed) serving the model (any model when ARGV[2] is empty) with the most free slots (ties: smallest worker id), take its
-- lowest free slot and write a fenced lease with a TTL.
--
-- The lease key is the truth: a slot is given only after checking that it has no lease
-- key, so no slot can go to two calls. Counting free slots per worker uses the index
-- {p}held:{id} (slot -> lease expiry, ms) instead of reading every lease key, so a claim
-- costs O(workers), not O(slots). An expired lease frees its slot in both at the same
-- moment; a live lease the index missed is put back into it when found.
-- A worker is live iff its registration hash exists (it expires without heartbeats).
--
-- KEYS[1] {p}workers   KEYS[2] {p}fence
-- ARGV[1] prefix  ARGV[2] model or ''  ARGV[3] lease TTL ms  ARGV[4] owner
-- ARGV[5] how long per-worker bookkeeping (index, issued tokens) outlives the last claim, ms
-- Returns {worker_id, url, slot, token, model} or nil when no slot is free anywhere.
local prefix, want_model, ttl, owner, keep_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local live = '(' .. now

local candidates = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local w = redis.call('HMGET', prefix .. 'worker:' .. id, 'state', 'model', 'capacity', 'url', 'role')
  local capacity = tonumber(w[3]) or 0
  local model_worker = (not w[5]) or w[5] == 'model'  -- an ASR worker is never claimed
  if model_worker and w[1] == 'ready' and (want_model == '' or w[2] == want_model) and capacity > 0 then
    local free = capacity - redis.call('ZCOUNT', prefix .. 'held:' .. id, live, '+inf')
    if free > 0 then
      candidates[#candidates + 1] = {id = id, free = free, capacity = capacity, url = w[4], model = w[2]}
    end
  end
end
table.sort(candidates, function(a, b)
  if a.free ~= b.free then return a.free > b.free end
  return a.id < b.id
end)

for _, c in ipairs(candidates) do
  local index = prefix .. 'held:' .. c.id
  local busy = {}
  for _, slot in ipairs(redis.call('ZRANGEBYSCORE', index, live, '+inf')) do
    busy[tonumber(slot)] = true
  end
  for slot = 0, c.capacity - 1 do
    if not busy[slot] then
      local lease = prefix .. 'lease:' .. c.id .. ':' .. slot
      local left = redis.call('PTTL', lease)
      if left == -2 then  -- no lease key: the slot is free
        local token = string.format('%d', redis.call('INCR', KEYS[2]))
        redis.call('SET', lease, token .. '|' .. owner, 'PX', ttl)
        redis.call('ZADD', index, now + ttl, slot)
        redis.call('PEXPIRE', index, keep_ms)
        local issued = prefix .. 'issued:' .. c.id
        redis.call('HSET', issued, slot, token)
        redis.call('PEXPIRE', issued, keep_ms)
        return {c.id, c.url, slot, tonumber(token), c.model}
      end
      -- a live lease the index did not know: put it back (a lease always has a TTL)
      redis.call('ZADD', index, now + math.max(left, 1), slot)
    end
  end
end
return nil
