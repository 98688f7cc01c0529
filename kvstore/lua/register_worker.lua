-- register_worker: announce a worker (role, address, static info as JSON) for ttl_ms; heartbeats extend it.
-- ARGV: prefix, worker_id, role, address, ttl_ms, info_json.
local wid, role, address, ttl_ms, info = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local key = worker_key(wid)

local now = now_ms()
redis.call('DEL', key)
redis.call('HSET', key, 'worker_id', wid, 'role', role, 'address', address, 'info', info, 'load', '{}',
  'registered_ms', int(now), 'heartbeat_ms', int(now), 'expires_ms', int(now + ttl_ms))
-- The key expires by itself, so a vanished worker leaves nothing behind; the zset lets list_workers avoid SCAN.
redis.call('PEXPIRE', key, ttl_ms)
redis.call('ZADD', WORKERS, int(now + ttl_ms), wid)
return 1
