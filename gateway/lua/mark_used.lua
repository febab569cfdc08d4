--[[ mark_used.lua - record a code use the ledger knows but Redis does not (rebuild, reconcile --repair).

Fails closed: a use recorded in the ledger can never be redeemed again. Idempotent: a use already recorded is
left alone, and only a use recorded here is counted in the shard's budget (so a rerun never counts one twice).
A code is issued iff its bucket field exists; its own state hash need not exist yet (it is created here). The
device of a code's first use binds the code to it, unless it already has a binding (from issuance or first
presentation): redeem.lua binds at first presentation, so a rebuilt Redis keeps that binding.

Every key carries the campaign shard's hash tag {c<campaign>.<shard>} (gateway/keys.py).
KEYS[1]  rgw:{c.s}:b:<bucket>        the code's bucket of issued codes (gateway/keys.py bucket_key)
KEYS[2]  rgw:{c.s}:code:<code_ref>   the code's own state hash
KEYS[3]  rgw:{c.s}:budget            the shard's budget hash: un, uv are counted (gateway/campaigns/layout.py)
ARGV[1]  the code's field in its bucket (gateway/keys.py bucket_field)
ARGV[2]  use number n
ARGV[3]  use record, layout.USE_RECORD joined by "|": "rid|at|fp|caller|store|term|dev|lat|lon|acc|idem|client|
         brand|fv"
ARGV[4]  at, ms since epoch
ARGV[5]  idempotency field ("i:<scope>", may be empty)
ARGV[6]  idempotency record "fp|rid|at|use|left" (ignored when ARGV[5] is empty)
ARGV[7]  fv, the face value the budget counts for this use (minor units)

Reply: 1 recorded (and counted), 0 already there, -1 the code is not issued (its bucket field is absent).
]]

local bucket, code, budget = KEYS[1], KEYS[2], KEYS[3]
local n = tonumber(ARGV[2])
local record, at = ARGV[3], tonumber(ARGV[4])
if redis.call('HEXISTS', bucket, ARGV[1]) == 0 then return -1 end
if redis.call('HEXISTS', code, 'u:' .. n) == 1 then return 0 end

redis.call('HSET', code, 'u:' .. n, record)
redis.call('HINCRBY', code, 'used', 1)
-- use numbers only grow: a use number is never granted twice, even after a reversal gave the use back
if n > tonumber(redis.call('HGET', code, 'seq') or '0') then redis.call('HSET', code, 'seq', n) end
if at > tonumber(redis.call('HGET', code, 'last') or '0') then redis.call('HSET', code, 'last', at) end
if ARGV[5] ~= '' then redis.call('HSETNX', code, ARGV[5], ARGV[6]) end
local device = string.match(record, '^[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|([^|]*)|')
if n == 1 and device and device ~= '' then redis.call('HSETNX', code, 'dev', device) end

redis.call('HINCRBY', budget, 'un', 1)
local fv = tonumber(ARGV[7])
if fv > 0 then redis.call('HINCRBY', budget, 'uv', fv) end
return 1
