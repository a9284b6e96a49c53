-- Record an event's first answer in its idempotency record (app/windows.py, WindowStore.save_answers).
-- KEYS: ids.  ARGV: event_id, answer.  Reply: 1 if written, 0 if not (no record, empty
-- answer, or an answer already saved: the first one is kept).
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec or #ARGV[2] == 0 then return 0 end
local p1 = string.find(rec, '|', 1, true)
local p2 = string.find(rec, '|', p1 + 1, true)
if p2 < #rec then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], rec .. ARGV[2])
return 1
