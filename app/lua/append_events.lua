-- Append a user's events to their window, atomically (app/windows.py, WindowStore.append_many).
-- KEYS: w (window), n (arrival counter), ids (idempotency records), idt (their arrival times).
-- ARGV: history, keep, window_ttl_ms, ids_ttl_ms, ids_max,
--       then (event_id, timestamp_ms, payload) per event, in the order they apply.
-- Reply per event: {0, window...} new; {1, answer} replay with its first answer;
-- {2, window...} replay whose answer is not saved yet (the window at that event).
-- Every check that can fail comes before the first write: a script error writes nothing.
local w, n, ids, idt = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local history, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
local wttl, ittl, imax = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if not (history and keep and wttl and ittl and imax) or history < 1 or keep < history or (#ARGV - 5) % 3 ~= 0 then
  return redis.error_reply('ERR seqguard append: bad arguments')
end
for i = 6, #ARGV, 3 do
  if not string.match(ARGV[i + 1], '^%-?%d+$') then
    return redis.error_reply('ERR seqguard append: timestamp must be integer ms')
  end
end

local function window_to(rank, out)  -- the `history` members up to rank (inclusive)
  if rank < 0 then return out end
  local first = rank - history + 1
  if first < 0 then first = 0 end
  local m = redis.call('ZRANGE', w, first, rank)
  for i = 1, #m do out[#out + 1] = m[i] end
  return out
end

local function forget(list)  -- drop idempotency records
  for i = 1, #list, 500 do
    local j = math.min(i + 499, #list)
    redis.call('HDEL', ids, unpack(list, i, j))
    redis.call('ZREM', idt, unpack(list, i, j))
  end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local replies, wrote = {}, false
for i = 6, #ARGV, 3 do
  local eid, ts, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local rec = redis.call('HGET', ids, eid)
  if rec then
    local p1 = string.find(rec, '|', 1, true)
    local p2 = string.find(rec, '|', p1 + 1, true)
    if p2 < #rec then
      replies[#replies + 1] = {1, string.sub(rec, p2 + 1)}
    else
      -- rank of (ts, seq): members before ts, plus those at ts with seq <= the record's
      local rts, rseq = string.sub(rec, 1, p1 - 1), string.sub(rec, p1 + 1, p2 - 1)
      local rank = redis.call('ZCOUNT', w, '-inf', '(' .. rts)
      local same = redis.call('ZRANGEBYSCORE', w, rts, rts)
      for j = 1, #same do
        if string.sub(same[j], 1, #rseq) <= rseq then rank = rank + 1 else break end
      end
      replies[#replies + 1] = window_to(rank - 1, {2})
    end
  else
    local seq = string.format('%012d', redis.call('INCR', n))
    local member = seq .. '|' .. payload
    redis.call('ZADD', w, ts, member)
    redis.call('HSET', ids, eid, ts .. '|' .. seq .. '|')
    redis.call('ZADD', idt, now, eid)
    replies[#replies + 1] = window_to(redis.call('ZRANK', w, member), {0})
    redis.call('ZREMRANGEBYRANK', w, 0, -(keep + 1))
    local excess = redis.call('ZCARD', idt) - imax
    if excess > 0 then forget(redis.call('ZRANGE', idt, 0, excess - 1)) end
    wrote = true
  end
end
if wrote then
  -- records older than the idempotency horizon, a bounded number per call
  forget(redis.call('ZRANGEBYSCORE', idt, '-inf', '(' .. string.format('%d', now - ittl), 'LIMIT', 0, 256))
  redis.call('PEXPIRE', w, wttl)
  redis.call('PEXPIRE', n, math.max(wttl, ittl))
  redis.call('PEXPIRE', ids, ittl)
  redis.call('PEXPIRE', idt, ittl)
end
return replies
