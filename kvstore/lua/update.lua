-- update: the owner records progress (state, num_tokens, first_token, request_id), optionally restarting the lease.
-- Setting PREFILLED also publishes the session id on {prefix}:prefilled, in the same atomic step: a decode worker
-- already waiting for the session adopts it at once instead of waiting for the gateway's Decode call.
-- ARGV: prefix, session_id, owner, state ('' keeps it), lease_ms ('' keeps the lease), then field/value pairs.
local sid, owner, state, lease_ms = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local skey = session_key(sid)

local current = redis.call('HGET', skey, 'owner')
if current == false then return fail('NOSESSION', 'session ' .. sid .. ' does not exist') end
if current ~= owner then return owner_error(sid, current, owner) end

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
redis.call('HSET', skey, 'updated_ms', int(now), unpack(fields))
if lease_ms ~= '' then set_lease(sid, now + tonumber(lease_ms)) end
if state == 'PREFILLED' then redis.call('PUBLISH', PREFIX .. ':prefilled', sid) end
return 1
