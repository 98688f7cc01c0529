-- Helpers shared by every script in this folder. Redis' Lua has no `require`, so sessions.py prepends this file to
-- each script before registering it; the scripts below assume these names.
--
-- Every script gets the deployment's key prefix as ARGV[1] and builds key names from it: reclaim and eviction touch
-- sessions they discover while running, which cannot be declared in KEYS up front. All keys of one prefix therefore
-- live in one Redis instance (on Redis Cluster: a prefix with a hash tag, e.g. "{kvrelay}", puts them in one slot).
--
-- Redis runs a script atomically, but does not roll back: a script that returns an error after writing keeps its
-- writes. So every script checks everything first and writes after.

local PREFIX = ARGV[1]
local POOL = PREFIX .. ':pool'
local FREE = PREFIX .. ':free'
local SESSIONS = PREFIX .. ':sessions'
local LEASES = PREFIX .. ':leases'
local IDLE = PREFIX .. ':idle'
local WORKERS = PREFIX .. ':workers'
-- While the pool is recovering from lost state (recover_pool.lua): the blocks live workers re-asserted (reassert.lua)
local HELD = PREFIX .. ':recovery:held'

-- unpack() is bounded by Lua's C stack (about 8000 values); large block lists are pushed in chunks.
local CHUNK = 1000

local function session_key(sid) return PREFIX .. ':session:' .. sid end
local function blocks_key(sid) return PREFIX .. ':session:' .. sid .. ':blocks' end
local function owned_key(owner) return PREFIX .. ':owned:' .. owner end
local function worker_key(wid) return PREFIX .. ':worker:' .. wid end
-- A decode worker's claim on a session it waits for (adopt with claim_ms): {owner, request, lease_ms, extra_tokens}
local function claim_key(sid) return PREFIX .. ':claim:' .. sid end
-- Where the sessions handed over to a claimer are announced, with their records (update.lua)
local function adopted_channel(owner) return PREFIX .. ':adopted:' .. owner end

-- Redis' Lua turns numbers into strings with %.14g; millisecond timestamps fit, but format them explicitly anyway.
local function int(x) return string.format('%d', x) end

-- The Redis server's clock, not the caller's: every process compares leases against the same clock.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Milliseconds with microsecond fraction: orders idle sessions released within the same millisecond.
local function now_ms_fine()
  local t = redis.call('TIME')
  return string.format('%.3f', tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000)
end

local function fail(code, msg) return redis.error_reply('KVRELAY_' .. code .. ' ' .. msg) end

-- Until when (ms) the pool waits for live workers to re-assert what they hold after Redis lost its state, or nil.
local function recovering_until()
  local until_ms = redis.call('HGET', POOL, 'recovering_until_ms')
  return until_ms and tonumber(until_ms) or nil
end

-- The worker's registry entry (register_worker.lua, reassert.lua). The key expires by itself, so a vanished worker
-- leaves nothing behind; the zset lets list_workers avoid SCAN.
local function register(wid, role, address, ttl_ms, info, now)
  local key = worker_key(wid)
  redis.call('DEL', key)
  redis.call('HSET', key, 'worker_id', wid, 'role', role, 'address', address, 'info', info, 'load', '{}',
    'registered_ms', int(now), 'heartbeat_ms', int(now), 'expires_ms', int(now + ttl_ms))
  redis.call('PEXPIRE', key, ttl_ms)
  redis.call('ZADD', WORKERS, int(now + ttl_ms), wid)
end

local function push_all(key, values)
  for i = 1, #values, CHUNK do
    redis.call('RPUSH', key, unpack(values, i, math.min(i + CHUNK - 1, #values)))
  end
end

local function set_owner(sid, old, new)
  if old and old ~= '' then redis.call('SREM', owned_key(old), sid) end
  if new ~= '' then redis.call('SADD', owned_key(new), sid) end
  redis.call('HSET', session_key(sid), 'owner', new)
end

local function set_lease(sid, expires_ms)
  redis.call('HSET', session_key(sid), 'lease_expires_ms', int(expires_ms))
  redis.call('ZADD', LEASES, int(expires_ms), sid)
end

-- Returns the session's blocks to the back of the free-list (FIFO reuse: a block just freed, which a kernel in
-- flight may still read, is the last to be handed out again) and deletes every trace of the session.
local function drop_session(sid)
  local skey, bkey = session_key(sid), blocks_key(sid)
  local blocks = redis.call('LRANGE', bkey, 0, -1)
  push_all(FREE, blocks)
  local owner = redis.call('HGET', skey, 'owner')
  if owner and owner ~= '' then redis.call('SREM', owned_key(owner), sid) end
  redis.call('DEL', skey, bkey)
  redis.call('SREM', SESSIONS, sid)
  redis.call('ZREM', LEASES, sid)
  redis.call('ZREM', IDLE, sid)
  return #blocks
end

-- The idle sessions, least recently used first, whose blocks would bring the free-list to `needed`, and the number
-- of blocks that would then be free. Reads only: callers evict only when the plan reaches `needed`.
local function plan_eviction(needed, free)
  local victims, available, start = {}, free, 0
  while available < needed do
    local page = redis.call('ZRANGE', IDLE, start, start + 99)
    if #page == 0 then break end
    for _, sid in ipairs(page) do
      victims[#victims + 1] = sid
      available = available + redis.call('LLEN', blocks_key(sid))
      if available >= needed then break end
    end
    start = start + 100
  end
  return victims, available
end

-- Whether a session's owner has lost it by the rules of a takeover (adopt.lua with takeover): its lease ran out, or
-- its entry in the worker registry is gone (the hash expires by itself when the worker misses heartbeats for its TTL).
local function owner_gone(owner, lease, now)
  if lease and lease ~= '' and tonumber(lease) <= now then return true end
  return owner ~= '' and redis.call('EXISTS', worker_key(owner)) == 0
end

local function owner_error(sid, current, caller)
  if current == '' then
    return fail('NOTOWNER', 'session ' .. sid .. ' has no owner (' .. caller .. ' must adopt it first)')
  end
  return fail('NOTOWNER', 'session ' .. sid .. ' is owned by ' .. current .. ', not ' .. caller)
end

-- The hand-off proper: `new_owner` owns the session in `state` with a fresh lease, out of the idle LRU, and with
-- extra_tokens > 0 its block table grown to hold num_tokens + extra_tokens tokens when the free-list has the blocks
-- (no eviction; otherwise the adopter grows it itself). Checks are the caller's.
local function take_over(sid, cur_owner, new_owner, state, lease_ms, extra_tokens, now)
  local skey, bkey = session_key(sid), blocks_key(sid)
  set_owner(sid, cur_owner, new_owner)
  redis.call('HSET', skey, 'state', state, 'updated_ms', int(now))
  set_lease(sid, now + lease_ms)
  redis.call('ZREM', IDLE, sid)
  if extra_tokens > 0 then
    local block_size = tonumber(redis.call('HGET', POOL, 'block_size'))
    local num_tokens = tonumber(redis.call('HGET', skey, 'num_tokens')) or 0
    local missing = math.floor((num_tokens + extra_tokens + block_size - 1) / block_size) - redis.call('LLEN', bkey)
    if missing > 0 and redis.call('LLEN', FREE) >= missing then
      push_all(bkey, redis.call('LPOP', FREE, missing))
    end
  end
end

-- Deletes the claim on sid if it is owner's (another worker's claim stays).
local function drop_own_claim(sid, owner)
  local raw = redis.call('GET', claim_key(sid))
  if raw and cjson.decode(raw).owner == owner then redis.call('DEL', claim_key(sid)) end
end

-- {HGETALL of the session, its block table as one comma-separated string}: one reply element instead of one per
-- block, which the client parses much faster.
local function session_reply(sid)
  return {redis.call('HGETALL', session_key(sid)), table.concat(redis.call('LRANGE', blocks_key(sid), 0, -1), ',')}
end
