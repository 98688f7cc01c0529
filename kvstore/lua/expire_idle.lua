-- expire_idle: free the IDLE sessions whose last use is older than max_idle_ms (the session TTL). The idle LRU is
-- scored by the time of each session's release, i.e. its last use; an IDLE session taken back for a turn leaves it.
-- At most `limit` sessions per call, so a large backlog never holds Redis for long (the next heartbeat goes on).
-- ARGV: prefix, max_idle_ms, limit, now_ms ('' uses the Redis server's clock). Returns the session ids freed.
local max_idle, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
if ARGV[4] ~= '' then now = tonumber(ARGV[4]) end

local sids = redis.call('ZRANGEBYSCORE', IDLE, '-inf', string.format('%.3f', now - max_idle), 'LIMIT', 0, limit)
local freed = {}
for _, sid in ipairs(sids) do
  -- only IDLE sessions are in the LRU (audit checks it); never free one that a worker holds, whatever happened
  if redis.call('HGET', session_key(sid), 'state') == 'IDLE' then
    drop_session(sid)
    freed[#freed + 1] = sid
  end
end
return freed
