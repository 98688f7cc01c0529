-- recover_pool: the kvstore's watch over Redis losing its state (a restart without persistence, a FLUSHALL). Called
-- every half second by the kvstore process, which alone knows the pool exists in memory.
--
-- The protocol, in three steps:
-- 1. Pool gone: re-create it with the same geometry, a new epoch and a recovery window (`recovering_until_ms`), but
--    no free-list yet. Every block may still be held by a live session whose record was lost.
-- 2. During the window, each live worker finds its registry entry gone (heartbeat returns 0) and the pool's epoch new,
--    and re-asserts what it holds in one call (reassert.lua): its registry entry and its sessions with their block
--    tables, owner, state, token counts and leases. Allocation is refused meanwhile (allocate.lua: RECOVERING).
-- 3. Window closed (this script, called after it): every block that no live worker re-asserted goes to the free-list.
--    The free-list is rebuilt from the living; what nobody claimed (idle sessions, dead workers' sessions) is free.
-- A worker that re-asserts after the window is refused (CLOSED) and drops its sessions unseen.
-- ARGV: prefix, num_blocks, block_size, window_ms, epoch (used when re-creating).
-- Returns {'ok' | 'recreated' | 'recovering' | 'recovered', epoch}.
local num_blocks, block_size, window_ms = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])

local existing = redis.call('HMGET', POOL, 'num_blocks', 'block_size', 'epoch')
local now = now_ms()
if existing[1] then
  if tonumber(existing[1]) ~= num_blocks or tonumber(existing[2]) ~= block_size then
    return fail('GEOMETRY', existing[1] .. ' ' .. existing[2])
  end
  local epoch = existing[3] or ''
  local until_ms = recovering_until()
  if not until_ms then return {'ok', epoch} end
  if until_ms > now then return {'recovering', epoch} end
  -- Blocks of re-asserted sessions freed during the window went to the free-list then (drop_session); the others
  -- stay in their tables. Everything never re-asserted is free now.
  for first = 0, num_blocks - 1, CHUNK do
    local ids = {}
    for id = first, math.min(first + CHUNK, num_blocks) - 1 do
      if redis.call('SISMEMBER', HELD, id) == 0 then ids[#ids + 1] = id end
    end
    if #ids > 0 then redis.call('RPUSH', FREE, unpack(ids)) end
  end
  redis.call('DEL', HELD)
  redis.call('HDEL', POOL, 'recovering_until_ms')
  return {'recovered', epoch}
end
if redis.call('EXISTS', FREE, SESSIONS, LEASES, IDLE) > 0 then
  return fail('DIRTY', 'keys of prefix ' .. PREFIX .. ' exist without a pool record')
end
redis.call('HSET', POOL, 'num_blocks', num_blocks, 'block_size', block_size, 'created_ms', int(now), 'epoch', ARGV[5],
  'recovering_until_ms', int(now + window_ms))
return {'recreated', ARGV[5]}
