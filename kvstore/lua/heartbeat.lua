-- heartbeat: a live worker reports its load and extends its registration.
-- ARGV: prefix, worker_id, ttl_ms, load_json. Returns 0 when the worker is not registered (it expired: it must
-- register again, and its sessions may have been reclaimed or adopted meanwhile), 1 otherwise.
local wid, ttl_ms, load = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local key = worker_key(wid)

if redis.call('EXISTS', key) == 0 then
  redis.call('ZREM', WORKERS, wid)
  return 0
end
local now = now_ms()
redis.call('HSET', key, 'load', load, 'heartbeat_ms', int(now), 'expires_ms', int(now + ttl_ms))
redis.call('PEXPIRE', key, ttl_ms)
redis.call('ZADD', WORKERS, int(now + ttl_ms), wid)
return 1
