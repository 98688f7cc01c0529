-- deregister_worker: a worker leaving cleanly. Its sessions are not touched (it frees or releases them itself;
-- whatever it leaves behind is reclaimed when the leases expire).
-- ARGV: prefix, worker_id. Returns 1 when it was registered, 0 otherwise.
local wid = ARGV[2]
redis.call('ZREM', WORKERS, wid)
return redis.call('DEL', worker_key(wid))
