-- evict_lru: free idle sessions, least recently used first, until blocks_needed blocks are free. Evicts nothing when
-- even every idle session would not be enough (the cached prefixes keep their value for a request that fits later).
-- ARGV: prefix, blocks_needed. Returns the session ids evicted.
local needed = tonumber(ARGV[2])

local free = redis.call('LLEN', FREE)
if free >= needed then return {} end
local victims, available = plan_eviction(needed, free)
if available < needed then return {} end
for _, sid in ipairs(victims) do drop_session(sid) end
return victims
