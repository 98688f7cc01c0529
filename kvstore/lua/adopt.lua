-- adopt: take over a session (prefill -> decode hand-off, resume after a worker died, reuse of an idle session).
-- Allowed when force, or the session has no owner (IDLE), or the caller already owns it (a retry), or it is owned by
-- expected_owner, or it is PREFILLED (its prefill worker is done with it and offers it), or the owner's lease expired.
-- The target state is never PREFILLED, so a PREFILLED session is adopted exactly once.
-- With extra_tokens > 0 it also grows the block table to hold num_tokens + extra_tokens tokens when the free-list has
-- the blocks (no eviction; otherwise the table is left as it is and the adopter grows it with allocate): a decode
-- worker's first step writes one token past the prompt, often into a new block, and this way that block comes with
-- the hand-off instead of costing a second round trip before the first step.
-- expected_request ('' any) guards the session's request_id: a decode worker waiting for a session to be prefilled
-- adopts the hand-off of its own request only.
-- ARGV: prefix, session_id, new_owner, lease_ms, state, expected_state (''), expected_owner (''), force ('1'/'0'),
-- extra_tokens ('0'), expected_request ('').
-- Returns {HGETALL of the session, its block table as one comma-separated string}: one reply element instead of one
-- per block, which the client parses much faster.
local sid, new_owner, lease_ms, state = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local expected_state, expected_owner, force = ARGV[6], ARGV[7], ARGV[8] == '1'
local extra_tokens, expected_request = tonumber(ARGV[9]) or 0, ARGV[10] or ''
local skey, bkey = session_key(sid), blocks_key(sid)

local cur = redis.call('HMGET', skey, 'owner', 'state', 'lease_expires_ms', 'request_id')
local cur_owner, cur_state, lease, cur_request = cur[1], cur[2], cur[3], cur[4]
if cur_owner == false then return fail('NOSESSION', 'session ' .. sid .. ' does not exist') end
if expected_state ~= '' and cur_state ~= expected_state then
  return fail('STATE', 'session ' .. sid .. ' is ' .. cur_state .. ', expected ' .. expected_state)
end
if expected_request ~= '' and cur_request ~= expected_request then
  return fail('STATE', 'session ' .. sid .. ' holds request ' .. tostring(cur_request) .. ', not ' .. expected_request)
end
if cur_state == 'FINISHED' and not force then
  return fail('STATE', 'session ' .. sid .. ' is FINISHED; release() it to IDLE to reuse it')
end

local block_size
if extra_tokens > 0 then
  block_size = tonumber(redis.call('HGET', POOL, 'block_size'))
  if not block_size then return fail('NOPOOL', PREFIX) end
end

local now = now_ms()
local allowed = force or cur_owner == '' or cur_owner == new_owner
  or (expected_owner ~= '' and cur_owner == expected_owner)
  or cur_state == 'PREFILLED'
  or (lease and lease ~= '' and tonumber(lease) <= now)
if not allowed then
  local left = tonumber(lease) and int(tonumber(lease) - now) or '?'
  return fail('NOTOWNER', 'session ' .. sid .. ' is owned by ' .. cur_owner .. ' (' .. cur_state
    .. ', lease valid for ' .. left .. ' ms more), not ' .. new_owner)
end

set_owner(sid, cur_owner, new_owner)
redis.call('HSET', skey, 'state', state, 'updated_ms', int(now))
set_lease(sid, now + lease_ms)
redis.call('ZREM', IDLE, sid)
if extra_tokens > 0 then
  local num_tokens = tonumber(redis.call('HGET', skey, 'num_tokens')) or 0
  local missing = math.floor((num_tokens + extra_tokens + block_size - 1) / block_size) - redis.call('LLEN', bkey)
  if missing > 0 and redis.call('LLEN', FREE) >= missing then
    push_all(bkey, redis.call('LPOP', FREE, missing))
  end
end
return {redis.call('HGETALL', skey), table.concat(redis.call('LRANGE', bkey, 0, -1), ',')}
