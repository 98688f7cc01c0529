-- unclaim: a decode worker's call for a session ends before it got the session. Its claim goes, and a session that
-- prefill already handed to it for that request (the announcement still on its way) is freed: nobody else would.
-- ARGV: prefix, session_id, owner, request_id. Returns the number of blocks freed.
local sid, owner, request = ARGV[2], ARGV[3], ARGV[4]
drop_own_claim(sid, owner)
local cur = redis.call('HMGET', session_key(sid), 'owner', 'state', 'request_id')
if cur[1] == owner and cur[2] == 'DECODING' and cur[3] == request then return drop_session(sid) end
return 0
