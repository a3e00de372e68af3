-- Claim one free slot, atomically: pick a live, ready worker serving the model (any model
-- when ARGV[2] is empty) with the most free slots (ties: smallest worker id), take its
-- lowest free slot and write a fenced lease with a TTL.
--
-- A slot is free iff its lease key is absent: an expired lease frees its slot by itself.
-- A worker is live iff its registration hash exists (it expires without heartbeats).
--
-- KEYS[1] {p}workers   KEYS[2] {p}fence
-- ARGV[1] prefix  ARGV[2] model or ''  ARGV[3] lease TTL ms  ARGV[4] owner  ARGV[5] issued-hash TTL ms
-- Returns {worker_id, url, slot, token, model} or nil when no slot is free anywhere.
local prefix, want_model, ttl, owner = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(ids)

local best_id, best_url, best_model, best_slot, best_free = nil, nil, nil, nil, 0
for _, id in ipairs(ids) do
  local w = redis.call('HMGET', prefix .. 'worker:' .. id, 'state', 'model', 'capacity', 'url')
  local capacity = tonumber(w[3]) or 0
  -- a worker can only win with more free slots than the best so far, so skip the
  -- lease lookup when even an idle one could not
  if w[1] == 'ready' and (want_model == '' or w[2] == want_model) and capacity > best_free then
    local lease_keys = {}
    for slot = 0, capacity - 1 do
      lease_keys[slot + 1] = prefix .. 'lease:' .. id .. ':' .. slot
    end
    local held = redis.call('MGET', unpack(lease_keys))
    local free, first_free = 0, nil
    for i = 1, capacity do
      if not held[i] then
        free = free + 1
        if first_free == nil then first_free = i - 1 end
      end
    end
    if free > best_free then
      best_id, best_url, best_model, best_slot, best_free = id, w[4], w[2], first_free, free
    end
  end
end

if best_id == nil then
  return nil
end

local token = string.format('%d', redis.call('INCR', KEYS[2]))
redis.call('SET', prefix .. 'lease:' .. best_id .. ':' .. best_slot, token .. '|' .. owner, 'PX', ttl)
local issued = prefix .. 'issued:' .. best_id
redis.call('HSET', issued, best_slot, token)
redis.call('PEXPIRE', issued, ARGV[5])
return {best_id, best_url, best_slot, tonumber(token), best_model}
