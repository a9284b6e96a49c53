-- Restore one user's keys under a new hash tag (app/windows.py, Rekeyer.move; `seqguard rekey`).
-- KEYS: the user's keys under the new tag (w, n, ids, idt).
-- ARGV: for each key, in that order, its TTL in ms (0: none) and its DUMP (empty: absent).
-- Reply: the number of keys restored; -1 if any of KEYS exists (the service writes under
-- the new tag already): then nothing is written. RESTORE without REPLACE, after that check,
-- in one script: no write of the service's comes between the check and the restores.
if #ARGV ~= 2 * #KEYS then
  return redis.error_reply('ERR seqguard restore: bad arguments')
end
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then return -1 end
end
local n = 0
for i = 1, #KEYS do
  local dump = ARGV[2 * i]
  if #dump > 0 then
    redis.call('RESTORE', KEYS[i], ARGV[2 * i - 1], dump)
    n = n + 1
  end
end
return n
