-- register_worker: announce a worker (role, address, static info as JSON) for ttl_ms; heartbeats extend it.
-- ARGV: prefix, worker_id, role, address, ttl_ms, info_json.
register(ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], now_ms())
return 1
