-- allocate: pop n blocks from the free-list and append them to the session's block table, creating the session
-- (PREFILLING, owned by the caller) if it does not exist. All or nothing: when fewer than n blocks are free, even after
-- evicting idle sessions (if allowed), nothing is taken and nothing is evicted.
-- ARGV: prefix, session_id, n, owner, lease_ms, evict ('1'/'0'), create ('1'/'0': '0' refuses to recreate a session
-- that is gone, e.g. reclaimed while its owner stalled), request_id ('' none: recorded when it creates the session, so a
-- retry of the same request can tell its own half-prefilled session from another request's). Returns the new block ids, in table order, as one
-- comma-separated string (one reply element, not one per block: much faster to parse for a long prompt).
-- have ('' unknown): how many blocks the caller's table holds. It makes a repeat harmless: a caller whose reply was lost
-- (Redis stopped or timed out after running the script) calls again and gets the same blocks, not n more.
-- While the pool recovers from lost state (recover_pool.lua) the free-list is incomplete: refused (RECOVERING).
local sid, n, owner, lease_ms = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local evict, create, request = ARGV[6] == '1', ARGV[7] == '1', ARGV[8] or ''
local have = tonumber(ARGV[9] or '')

if redis.call('EXISTS', POOL) == 0 then return fail('NOPOOL', PREFIX) end
if recovering_until() then return fail('RECOVERING', PREFIX) end
local skey = session_key(sid)
local current = redis.call('HGET', skey, 'owner')
local exists = current ~= false
if not exists and not create then return fail('NOSESSION', 'session ' .. sid .. ' does not exist') end
if exists and current ~= owner then return owner_error(sid, current, owner) end
if have and exists and n > 0 and redis.call('LLEN', blocks_key(sid)) == have + n then
  return table.concat(redis.call('LRANGE', blocks_key(sid), have, -1), ',')  -- the repeat of a call that took them
end

local free = redis.call('LLEN', FREE)
local victims = {}
if free < n then
  if not evict then return fail('OOB', n .. ' ' .. free) end
  local available
  victims, available = plan_eviction(n, free)
  if available < n then return fail('OOB', n .. ' ' .. available) end
end

-- Checks done; from here on, writes.
for _, victim in ipairs(victims) do drop_session(victim) end
local now = now_ms()
if not exists then
  redis.call('HSET', skey, 'state', 'PREFILLING', 'owner', owner, 'num_tokens', 0, 'first_token', '',
    'request_id', request, 'created_ms', int(now))
  redis.call('SADD', SESSIONS, sid)
  redis.call('SADD', owned_key(owner), sid)
end
local blocks = {}
if n > 0 then
  blocks = redis.call('LPOP', FREE, n)
  push_all(blocks_key(sid), blocks)
end
redis.call('HSET', skey, 'updated_ms', int(now))
set_lease(sid, now + lease_ms)
return table.concat(blocks, ',')
