-- release: the owner keeps the session's blocks for the next turn: state IDLE, no owner, no lease, and a place in
-- the idle LRU (scored by last-used time), from which allocate/evict_lru may evict it.
-- ARGV: prefix, session_id, owner.
local sid, owner = ARGV[2], ARGV[3]
local skey = session_key(sid)

local current = redis.call('HGET', skey, 'owner')
if current == false then return fail('NOSESSION', 'session ' .. sid .. ' does not exist') end
if current == '' and redis.call('HGET', skey, 'state') == 'IDLE' then return 1 end  -- released already (a repeat)
if current ~= owner then return owner_error(sid, current, owner) end

set_owner(sid, current, '')
redis.call('HSET', skey, 'state', 'IDLE', 'lease_expires_ms', '', 'updated_ms', int(now_ms()))
redis.call('ZREM', LEASES, sid)
redis.call('ZADD', IDLE, now_ms_fine(), sid)
return 1
