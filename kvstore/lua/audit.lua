-- audit: one consistent snapshot of every key of the prefix that holds blocks or sessions; sessions.py checks it.
-- Reads only. O(number of keys of the prefix): an operator's and a test's tool, not something to run per request.
-- ARGV: prefix, SCAN pattern of session keys, SCAN pattern of owned-set keys (glob characters of the prefix escaped).
-- Returns {pool, free, sessions, leases, idle, session_keys, owned_keys, now_ms}; *_keys are lists of
-- {key, type, contents}.
local function scan(pattern)
  local keys, cursor = {}, '0'
  repeat
    local res = redis.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 1000)
    cursor = res[1]
    for _, key in ipairs(res[2]) do keys[#keys + 1] = key end
  until cursor == '0'
  return keys
end

local function dump(pattern)
  local out = {}
  for _, key in ipairs(scan(pattern)) do
    local kind = redis.call('TYPE', key)['ok']
    local contents = {}
    if kind == 'hash' then contents = redis.call('HGETALL', key)
    elseif kind == 'list' then contents = redis.call('LRANGE', key, 0, -1)
    elseif kind == 'set' then contents = redis.call('SMEMBERS', key) end
    out[#out + 1] = {key, kind, contents}
  end
  return out
end

return {
  redis.call('HGETALL', POOL),
  redis.call('LRANGE', FREE, 0, -1),
  redis.call('SMEMBERS', SESSIONS),
  redis.call('ZRANGE', LEASES, 0, -1, 'WITHSCORES'),
  redis.call('ZRANGE', IDLE, 0, -1, 'WITHSCORES'),
  dump(ARGV[2]),
  dump(ARGV[3]),
  now_ms(),
}
