-- reclaim_expired: free every session whose lease expired (its owner vanished, or nobody adopted a hand-off).
-- ARGV: prefix, now_ms ('' uses the Redis server's clock). Returns the session ids freed.
local now = now_ms()
if ARGV[2] ~= '' then now = tonumber(ARGV[2]) end

local sids = redis.call('ZRANGEBYSCORE', LEASES, '-inf', int(now))
for _, sid in ipairs(sids) do drop_session(sid) end
return sids
