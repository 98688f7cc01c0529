-- renew_leases: heartbeat of a worker; extends the lease of every session it is working on.
-- Only PREFILLING and DECODING sessions are extended: a PREFILLED session's lease is the hand-off deadline (if no
-- decode worker adopts it in time, e.g. the client cancelled between prefill and decode, reclaim frees it), and a
-- FINISHED one's is the deadline for freeing or releasing it.
-- ARGV: prefix, owner, lease_ms. Returns the number of sessions extended.
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
return renewed
