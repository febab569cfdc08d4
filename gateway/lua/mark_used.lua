--[[ mark_used.lua - record a code use the ledger knows but Redis does not (rebuild, reconcile --repair).

Fails closed: a use recorded in the ledger can never be redeemed again. Idempotent: a use already recorded is
left alone. The device of a code's first use binds the code to it, unless it already has a binding (from issuance
or first presentation): redeem.lua binds at first presentation, so a rebuilt Redis keeps that binding.

KEYS[1]  rgw:{c.s}:code:<code_ref>   the code hash (must exist: load the code first)
ARGV[1]  use number n
ARGV[2]  use record "rid|at|fp|caller|store|term|dev|lat|lon|acc|idem" (see redeem.lua)
ARGV[3]  at, ms since epoch
ARGV[4]  idempotency field ("i:<scope>", may be empty)
ARGV[5]  idempotency record "fp|rid|at|use|left" (ignored when ARGV[4] is empty)

Reply: 1 recorded, 0 already there, -1 no such code.
]]

local key = KEYS[1]
local n = tonumber(ARGV[1])
if redis.call('EXISTS', key) == 0 then return -1 end
if redis.call('HEXISTS', key, 'u:' .. n) == 1 then return 0 end
redis.call('HSET', key, 'u:' .. n, ARGV[2])
redis.call('HINCRBY', key, 'used', 1)
if n > tonumber(redis.call('HGET', key, 'seq') or '0') then redis.call('HSET', key, 'seq', n) end
if tonumber(ARGV[3]) > tonumber(redis.call('HGET', key, 'last') or '0') then redis.call('HSET', key, 'last', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSETNX', key, ARGV[4], ARGV[5]) end
local device = string.match(ARGV[2], '^[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|([^|]*)|')
if n == 1 and device and device ~= '' then redis.call('HSETNX', key, 'dev', device) end
return 1
