-- adopt: take over a session (prefill -> decode hand-off, resume after a worker died, reuse of an idle session).
-- Allowed when force, or the session has no owner (IDLE), or the caller already owns it (a retry), or it is owned by
-- expected_owner, or it is PREFILLED (its prefill worker is done with it and offers it), or the owner's lease expired.
-- The target state is never PREFILLED, so a PREFILLED session is adopted exactly once.
-- ARGV: prefix, session_id, new_owner, lease_ms, state, expected_state (''), expected_owner (''), force ('1'/'0').
-- Returns {HGETALL of the session, its block table}.
local sid, new_owner, lease_ms, state = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local expected_state, expected_owner, force = ARGV[6], ARGV[7], ARGV[8] == '1'
local skey = session_key(sid)

local cur = redis.call('HMGET', skey, 'owner', 'state', 'lease_expires_ms')
local cur_owner, cur_state, lease = cur[1], cur[2], cur[3]
if cur_owner == false then return fail('NOSESSION', 'session ' .. sid .. ' does not exist') end
if expected_state ~= '' and cur_state ~= expected_state then
  return fail('STATE', 'session ' .. sid .. ' is ' .. cur_state .. ', expected ' .. expected_state)
end
if cur_state == 'FINISHED' and not force then
  return fail('STATE', 'session ' .. sid .. ' is FINISHED; release() it to IDLE to reuse it')
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
return {redis.call('HGETALL', skey), redis.call('LRANGE', blocks_key(sid), 0, -1)}
