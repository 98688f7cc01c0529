-- stats: one consistent snapshot of the pool's counters.
-- ARGV: prefix. Returns {num_blocks, block_size, free, sessions, idle} (num_blocks '' when there is no pool).
local pool = redis.call('HMGET', POOL, 'num_blocks', 'block_size')
return {pool[1] or '', pool[2] or '', redis.call('LLEN', FREE), redis.call('SCARD', SESSIONS),
  redis.call('ZCARD', IDLE)}
