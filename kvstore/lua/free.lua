-- free: return every block of the session to the free-list and delete the session. Idempotent (0 when it is gone).
-- ARGV: prefix, session_id, owner ('' frees whoever owns it; otherwise only the owner, or anyone for an ownerless
-- session, may free: a worker that lost the session to an adopter must not free blocks the adopter is using).
local sid, owner = ARGV[2], ARGV[3]

local current = redis.call('HGET', session_key(sid), 'owner')
if current == false then
  -- A block table without its session is a leak; free it too rather than keep it forever.
  if redis.call('EXISTS', blocks_key(sid)) == 0 then return 0 end
elseif owner ~= '' and current ~= '' and current ~= owner then
  return owner_error(sid, current, owner)
end
return drop_session(sid)
