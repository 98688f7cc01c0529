-- update: the owner records progress (state, num_tokens, first_token, request_id), optionally restarting the lease.
-- Setting PREFILLED hands the session off, in the same atomic step. When a decode worker has claimed it for this
-- request (adopt.lua, claim_ms), the session goes to that worker right here (DECODING, its lease, the first decode
-- block) and its record is published on {prefix}:adopted:{owner}: the decode worker starts without a round trip.
-- Otherwise the session id is published on {prefix}:prefilled, and a decode worker already waiting adopts it at once.
-- ARGV: prefix, session_id, owner, state ('' keeps it), lease_ms ('' keeps the lease), then field/value pairs.
-- Returns 1, or 2 when a PREFILLED session went to its claimer.
local sid, owner, state, lease_ms = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local skey = session_key(sid)

local current = redis.call('HGET', skey, 'owner')
if current == false then return fail('NOSESSION', 'session ' .. sid .. ' does not exist') end
if current ~= owner then
  -- the repeat of this owner's hand-off of this request whose reply was lost: the session went on to a decode worker
  local request = nil
  for i = 6, #ARGV, 2 do if ARGV[i] == 'request_id' then request = ARGV[i + 1] end end
  local was = redis.call('HMGET', skey, 'prefilled_by', 'request_id')
  if state == 'PREFILLED' and request and was[1] == owner and was[2] == request then return 1 end
  return owner_error(sid, current, owner)
end

local fields = {}
for i = 6, #ARGV, 2 do
  if ARGV[i] == 'num_tokens' then
    -- K/V of num_tokens tokens must fit the block table; more means the caller wrote past its blocks.
    local capacity = redis.call('LLEN', blocks_key(sid)) * tonumber(redis.call('HGET', POOL, 'block_size') or 0)
    if tonumber(ARGV[i + 1]) > capacity then
      return fail('CAPACITY', 'session ' .. sid .. ': num_tokens ' .. ARGV[i + 1] .. ' exceeds its block table ('
        .. capacity .. ' token slots)')
    end
  end
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end

local now = now_ms()
if state ~= '' then
  fields[#fields + 1] = 'state'
  fields[#fields + 1] = state
end
if state == 'PREFILLED' then
  fields[#fields + 1] = 'prefilled_by'
  fields[#fields + 1] = owner
end
redis.call('HSET', skey, 'updated_ms', int(now), unpack(fields))
if lease_ms ~= '' then set_lease(sid, now + tonumber(lease_ms)) end
if state ~= 'PREFILLED' then return 1 end

local raw = redis.call('GET', claim_key(sid))
if raw then
  local claim = cjson.decode(raw)
  if claim.request == redis.call('HGET', skey, 'request_id') and redis.call('HGET', POOL, 'block_size') then
    take_over(sid, owner, claim.owner, 'DECODING', claim.lease_ms, claim.extra_tokens, now)
    redis.call('DEL', claim_key(sid))
    local reply = session_reply(sid)
    redis.call('PUBLISH', adopted_channel(claim.owner), cjson.encode({session = sid, fields = reply[1],
                                                                      blocks = reply[2]}))
    return 2
  end
end
redis.call('PUBLISH', PREFIX .. ':prefilled', sid)
return 1
