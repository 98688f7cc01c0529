-- adopt: take over a session (prefill -> decode hand-off, resume after a worker died, reuse of an idle session).
-- Allowed when force, or the session has no owner (IDLE), or the caller already owns it (a retry), or it is owned by
-- expected_owner, or it is PREFILLED (its prefill worker is done with it and offers it), or the owner's lease expired.
-- The target state is never PREFILLED, so a PREFILLED session is adopted exactly once.
-- With extra_tokens > 0 it also grows the block table to hold num_tokens + extra_tokens tokens when the free-list has
-- the blocks (no eviction; otherwise the table is left as it is and the adopter grows it with allocate): a decode
-- worker's first step writes one token past the prompt, often into a new block, and this way that block comes with
-- the hand-off instead of costing a second round trip before the first step.
-- expected_request ('' any) guards the session's request_id: a decode worker waiting for a session to be prefilled
-- adopts the hand-off of its own request only.
-- claim_ms > 0 (with expected_request): when the session is not offered yet (no session, another state or request),
-- the caller's claim on it is recorded for claim_ms, and the error returned as without: prefill's update to PREFILLED
-- then hands the session to the claimer itself (update.lua), one round trip fewer. A session already handed to the
-- caller for that request (its announcement lost) is returned as adopted.
-- takeover ('1'): a gateway moves the session off a worker that died or stopped answering (a decode worker resuming a
-- stream, a prefill worker retrying a named session's prompt); also allowed when the owner's registry entry is gone.
-- cap_tokens ('' none): num_tokens becomes at most cap_tokens (the resumer trusts the pool for the tokens the gateway
-- has seen only). set_request ('' none): the session's request_id becomes this (prefill marks the request it serves).
--
-- Why a takeover may not wait for the lease (10 s), and why it never takes a session from a live worker:
-- the pool is shared, so two workers acting on one session would write K/V into the same blocks. A worker proves it is
-- alive by its heartbeat, which extends its registry entry by the TTL (5 s) and, in the same beat, its sessions' leases
-- (10 s). A worker stops acting on its sessions (no forward pass, no step) once its last successful heartbeat is
-- older than the TTL less a margin, by its own clock (services/common/worker.py, `Worker.may_act`): so when Redis
-- finds the registry entry gone, the owner has stopped writing, whether it died or is only stalled (a long pause, a
-- stopped process). A worker that is alive but slow keeps heartbeating: its entry and its lease stay, the takeover is
-- refused (NOTOWNER) and the gateway keeps waiting for it; we never race a live writer. A stalled worker that wakes
-- finds its heartbeat refused (entry gone), registers again, and drops the sessions it no longer owns without
-- touching them (every write it could still make -- allocate, update, free, release -- checks the owner). What is
-- left is a forward pass already running when the owner froze and finishing after the takeover: it writes the
-- positions it was computing, with the tokens it had, which for greedy and seeded requests are the tokens the new
-- owner writes there too (sampling is a function of seed and position).
-- ARGV: prefix, session_id, new_owner, lease_ms, state, expected_state (''), expected_owner (''), force ('1'/'0'),
-- extra_tokens ('0'), expected_request (''), claim_ms ('0'), takeover ('0'), cap_tokens (''), set_request ('').
-- Returns session_reply().
local sid, new_owner, lease_ms, state = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local expected_state, expected_owner, force = ARGV[6], ARGV[7], ARGV[8] == '1'
local extra_tokens, expected_request = tonumber(ARGV[9]) or 0, ARGV[10] or ''
local claim_ms = tonumber(ARGV[11]) or 0
local takeover, cap_tokens, set_request = ARGV[12] == '1', tonumber(ARGV[13] or ''), ARGV[14] or ''
local skey = session_key(sid)

-- A failure that leaves a claim behind, when asked to (the one write before an error reply: it is the point).
local function not_yet(code, msg)
  if claim_ms > 0 and expected_request ~= '' then
    local claim = cjson.encode({owner = new_owner, request = expected_request, lease_ms = lease_ms,
                                extra_tokens = extra_tokens})
    redis.call('SET', claim_key(sid), claim, 'PX', claim_ms)
  end
  return fail(code, msg)
end

local cur = redis.call('HMGET', skey, 'owner', 'state', 'lease_expires_ms', 'request_id')
local cur_owner, cur_state, lease, cur_request = cur[1], cur[2], cur[3], cur[4]
if cur_owner == false then return not_yet('NOSESSION', 'session ' .. sid .. ' does not exist') end
if expected_request ~= '' and cur_owner == new_owner and cur_state == state and cur_request == expected_request then
  drop_own_claim(sid, new_owner)
  return session_reply(sid)  -- handed to us already (update.lua) for this very request
end
if expected_state ~= '' and cur_state ~= expected_state then
  if cur_owner == new_owner and cur_state == state then
    drop_own_claim(sid, new_owner)
    return session_reply(sid)  -- the repeat of an adoption whose reply was lost
  end
  return not_yet('STATE', 'session ' .. sid .. ' is ' .. cur_state .. ', expected ' .. expected_state)
end
if expected_request ~= '' and cur_request ~= expected_request then
  return not_yet('STATE', 'session ' .. sid .. ' holds request ' .. tostring(cur_request) .. ', not '
    .. expected_request)
end
if cur_state == 'FINISHED' and not force then
  return fail('STATE', 'session ' .. sid .. ' is FINISHED; release() it to IDLE to reuse it')
end
if takeover and state == 'DECODING' and cur_state == 'PREFILLING' then
  -- its prompt's K/V is not all written: only a prefill worker may take it over
  return fail('STATE', 'session ' .. sid .. ' is PREFILLING; a decode worker cannot take it over')
end
if extra_tokens > 0 and not redis.call('HGET', POOL, 'block_size') then return fail('NOPOOL', PREFIX) end

local now = now_ms()
local allowed = force or cur_owner == '' or cur_owner == new_owner
  or (expected_owner ~= '' and cur_owner == expected_owner)
  or cur_state == 'PREFILLED'
  or (lease and lease ~= '' and tonumber(lease) <= now)
  or (takeover and owner_gone(cur_owner, lease, now))
if not allowed then
  local left = tonumber(lease) and int(tonumber(lease) - now) or '?'
  return fail('NOTOWNER', 'session ' .. sid .. ' is owned by ' .. cur_owner .. ' (' .. cur_state
    .. ', lease valid for ' .. left .. ' ms more), not ' .. new_owner)
end

if cap_tokens and (tonumber(redis.call('HGET', skey, 'num_tokens')) or 0) > cap_tokens then
  redis.call('HSET', skey, 'num_tokens', int(cap_tokens))
end
if set_request ~= '' then redis.call('HSET', skey, 'request_id', set_request) end
take_over(sid, cur_owner, new_owner, state, lease_ms, extra_tokens, now)
-- the caller's own claim is served; another's stays (prefill taking an IDLE session back for the next turn must not
-- drop the claim of the decode call that waits for that turn)
drop_own_claim(sid, new_owner)
return session_reply(sid)
