--[[ mark_reversed.lua - apply a reversal the ledger knows but Redis does not (rebuild, reconcile --repair).

Gives the use back exactly once, as reverse.lua did: used -= 1, and in the shard's budget un -= 1, uv -= the face
value the use counted (its record's fv), rev += 1. Idempotent: a reversal already recorded (x:<n>) is left alone.
The use must be recorded (u:<n>, mark it used first) under the reversed redemption's id; the use number is
never granted again (seq is untouched).

Every key carries the campaign shard's hash tag {c<campaign>.<shard>} (gateway/keys.py).
KEYS[1]  rgw:{c.s}:code:<code_ref>   the code's own state hash
KEYS[2]  rgw:{c.s}:budget            the shard's budget hash (gateway/campaigns/layout.py)
ARGV[1]  use number n
ARGV[2]  the reversed redemption's id (must be the one use record n carries)
ARGV[3]  reversal record, layout.REVERSAL_RECORD joined by "|": "xid|at|reason|caller|client"
ARGV[4]  the reversal's idempotency field ("r:<scope>", may be empty)
ARGV[5]  its record "fp|xid|at|use|left", as reverse.lua writes it (ignored when ARGV[4] is empty)

Reply: 1 applied, 0 already there, -1 use n is not recorded, -2 use n carries another redemption id.
]]

local code, budget = KEYS[1], KEYS[2]
local n = ARGV[1]
if redis.call('HEXISTS', code, 'x:' .. n) == 1 then return 0 end
local use = redis.call('HGET', code, 'u:' .. n)
if not use then return -1 end
local fields = {}
for value in string.gmatch(use .. '|', '([^|]*)|') do fields[#fields + 1] = value end
if fields[1] ~= ARGV[2] then return -2 end
local fv = tonumber(fields[14]) or 0 -- records written before face values carry none: nothing was counted

redis.call('HSET', code, 'x:' .. n, ARGV[3])
redis.call('HINCRBY', code, 'used', -1)
if ARGV[4] ~= '' then redis.call('HSETNX', code, ARGV[4], ARGV[5]) end
redis.call('HINCRBY', budget, 'un', -1)
if fv > 0 then redis.call('HINCRBY', budget, 'uv', -fv) end
redis.call('HINCRBY', budget, 'rev', 1)
return 1
