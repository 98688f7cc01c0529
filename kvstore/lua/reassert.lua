-- reassert: a live worker tells a pool that lost its state (recover_pool.lua) what it holds, in one atomic step: its
-- registry entry, and each of its sessions as it knows it (state, owner = this worker, num_tokens, request_id, block
-- table, a fresh lease). A session is refused, and the worker must drop it unseen, when it exists already (another
-- worker re-asserted it) or any of its blocks is out of range or held by a session re-asserted before; nothing of a
-- refused session is written. A repeat of this call (its reply lost) finds its own sessions as it left them: accepted.
-- ARGV: prefix, worker_id, role, address, ttl_ms, info_json, lease_ms, then per session: session_id, state,
-- num_tokens, request_id, block ids (comma-separated). Returns the refused session ids.
-- Errors: NOPOOL (not re-created yet: try again), CLOSED (the pool is not recovering: too late, drop everything).
local wid, role, address, ttl_ms, info = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local lease_ms = tonumber(ARGV[7])

local num_blocks = tonumber(redis.call('HGET', POOL, 'num_blocks') or '')
if not num_blocks then return fail('NOPOOL', PREFIX) end
local now = now_ms()
local until_ms = recovering_until()
if not until_ms or until_ms <= now then
  return fail('CLOSED', 'the pool of prefix ' .. PREFIX .. ' is not waiting for re-asserts')
end

register(wid, role, address, ttl_ms, info, now)
local refused = {}
for i = 8, #ARGV, 5 do
  local sid, state, num_tokens, request, csv = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local skey = session_key(sid)
  local blocks, seen, ok = {}, {}, true
  for b in string.gmatch(csv, '[^,]+') do
    local id = tonumber(b)
    if not id or id < 0 or id >= num_blocks or seen[id] then ok = false end
    seen[id or -1] = true
    blocks[#blocks + 1] = b
  end
  if redis.call('EXISTS', skey) == 1 then
    -- ours already, with this very table: the repeat of this call; anything else is another holder's
    local mine = redis.call('HGET', skey, 'owner') == wid
      and table.concat(redis.call('LRANGE', blocks_key(sid), 0, -1), ',') == table.concat(blocks, ',')
    if not mine then refused[#refused + 1] = sid end
  else
    for _, b in ipairs(blocks) do
      if ok and redis.call('SISMEMBER', HELD, b) == 1 then ok = false end
    end
    if ok then
      redis.call('HSET', skey, 'state', state, 'owner', wid, 'num_tokens', num_tokens, 'first_token', '',
        'request_id', request, 'created_ms', int(now), 'updated_ms', int(now))
      redis.call('SADD', SESSIONS, sid)
      redis.call('SADD', owned_key(wid), sid)
      set_lease(sid, now + lease_ms)
      if #blocks > 0 then
        push_all(blocks_key(sid), blocks)
        for j = 1, #blocks, CHUNK do
          redis.call('SADD', HELD, unpack(blocks, j, math.min(j + CHUNK - 1, #blocks)))
        end
      end
    else
      refused[#refused + 1] = sid
    end
  end
end
return refused
