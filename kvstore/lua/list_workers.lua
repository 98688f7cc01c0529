-- list_workers: the live workers (optionally of one role), dropping index entries of expired ones.
-- ARGV: prefix, role ('' for all). Returns a list of HGETALL replies.
local role = ARGV[2]

redis.call('ZREMRANGEBYSCORE', WORKERS, '-inf', int(now_ms()))
local out = {}
for _, wid in ipairs(redis.call('ZRANGE', WORKERS, 0, -1)) do
  local key = worker_key(wid)
  if role == '' or redis.call('HGET', key, 'role') == role then
    local record = redis.call('HGETALL', key)
    if #record > 0 then out[#out + 1] = record end
  end
end
return out
