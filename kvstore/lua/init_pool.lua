-- init_pool: create the pool record and the free-list 0..num_blocks-1, once.
-- ARGV: prefix, num_blocks, block_size, epoch (a fresh random id: workers tell a re-created pool by it). Returns 1 when created, 0 when a pool of the same geometry already exists
-- (a restarted process must not hand out blocks that live sessions hold).
local num_blocks, block_size = tonumber(ARGV[2]), tonumber(ARGV[3])

local existing = redis.call('HMGET', POOL, 'num_blocks', 'block_size')
if existing[1] then
  if tonumber(existing[1]) == num_blocks and tonumber(existing[2]) == block_size then return 0 end
  return fail('GEOMETRY', existing[1] .. ' ' .. existing[2])
end
-- Keys without a pool record mean a half-wiped prefix; a fresh free-list next to them would duplicate blocks.
if redis.call('EXISTS', FREE, SESSIONS, LEASES, IDLE) > 0 then
  return fail('DIRTY', 'keys of prefix ' .. PREFIX .. ' exist without a pool record')
end

redis.call('HSET', POOL, 'num_blocks', num_blocks, 'block_size', block_size, 'created_ms', int(now_ms()),
  'epoch', ARGV[4])
for first = 0, num_blocks - 1, CHUNK do
  local ids = {}
  for id = first, math.min(first + CHUNK, num_blocks) - 1 do ids[#ids + 1] = id end
  redis.call('RPUSH', FREE, unpack(ids))
end
return 1
