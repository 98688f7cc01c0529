-- renew_leases: heartbeat of a worker; extends the lease of every session it is working on.
-- Only PREFILLING and DECODING sessions are extended: a PREFILLED session's lease is the hand-off deadline (if no
-- decode worker adopts it in time, e.g. the client cancelled between prefill and decode, reclaim frees it), and a
-- FINISHED one's is the deadline for freeing or releasing it.
-- Then pairs (session_id, num_tokens): a decode worker's progress, recorded for the DECODING sessions it still owns
-- (and that fits their blocks), so a worker that takes one over after it died recomputes only the tokens since.
-- ARGV: prefix, owner, lease_ms, [session_id, num_tokens]... Returns the number of sessions extended.
local owner, lease_ms = ARGV[2], tonumber(ARGV[3])

local expires = now_ms() + lease_ms
local renewed = 0
for _, sid in ipairs(redis.call('SMEMBERS', owned_key(owner))) do
  local state = redis.call('HGET', session_key(sid), 'state')
  if state == 'PREFILLING' or state == 'DECODING' then
    set_lease(sid, expires)
    renewed = renewed + 1
  end
end
local block_size = tonumber(redis.call('HGET', POOL, 'block_size') or 0)
for i = 4, #ARGV, 2 do
  local sid, n = ARGV[i], tonumber(ARGV[i + 1])
  local cur = redis.call('HMGET', session_key(sid), 'owner', 'state')
  if cur[1] == owner and cur[2] == 'DECODING' and n <= redis.call('LLEN', blocks_key(sid)) * block_size then
    redis.call('HSET', session_key(sid), 'num_tokens', int(n))
  end
end
return renewed
