-- free: return every block of the session to the free-list and delete the session. Idempotent (0 when it is gone).
-- ARGV: prefix, session_id, owner ('' frees whoever owns it; otherwise only the owner, or anyone for an ownerless
-- session, may free: a worker that lost the session to an adopter must not free blocks the adopter is using),
-- expected_state ('' any: otherwise a session in another state is refused, e.g. the gateway frees a hand-off nobody
-- adopted only while it is still PREFILLED, never one a decode worker has just taken), expected_request ('' any:
-- otherwise a session whose request_id differs is refused).
local sid, owner, expected_state, expected_request = ARGV[2], ARGV[3], ARGV[4] or '', ARGV[5] or ''

local cur = redis.call('HMGET', session_key(sid), 'owner', 'state', 'request_id')
local current, state, request = cur[1], cur[2], cur[3]
if current == false then
  -- A block table without its session is a leak; free it too rather than keep it forever.
  if redis.call('EXISTS', blocks_key(sid)) == 0 then return 0 end
elseif expected_state ~= '' and state ~= expected_state then
  return fail('STATE', 'session ' .. sid .. ' is ' .. tostring(state) .. ', expected ' .. expected_state)
elseif expected_request ~= '' and request ~= expected_request then
  return fail('STATE', 'session ' .. sid .. ' holds request ' .. tostring(request) .. ', not ' .. expected_request)
elseif owner ~= '' and current ~= '' and current ~= owner then
  return owner_error(sid, current, owner)
end
return drop_session(sid)
