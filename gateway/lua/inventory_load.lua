-- Loads card secrets into one SKU shard: gateway/inventory/loader.py (import, resume, rebuild).
-- Every key shares the SKU shard's hash tag {k<sku>.<shard>} (gateway/inventory/layout.py): one atomic step.
--
-- KEYS[1]             the secrets hash (rgw:{k.s}:sec): secret id -> SECRET_RECORD joined by '|'
-- KEYS[2]             the by-expiry zset (rgw:{k.s}:exp)
-- KEYS[3]             the by-cost zset (rgw:{k.s}:cost)
-- KEYS[4 .. #KEYS]    the by-supplier zsets of the suppliers of this call (rgw:{k.s}:sup:<supplier>)
-- ARGV                five per secret: id, record, expiry ms, cost, the index of its supplier's key (1: KEYS[4])
--
-- A secret whose id the secrets hash has already is left exactly as it is (HSETNX): a dispense, a hold or a key
-- rotation may have changed its record since, and a secret used up or taken keeps its record (so a reload never
-- brings it back). Only a secret newly added enters the indexes. Reply: the number of secrets added.

local sec, exp, cost = KEYS[1], KEYS[2], KEYS[3]
local added = 0
for i = 1, #ARGV, 5 do
    local id = ARGV[i]
    if redis.call('HSETNX', sec, id, ARGV[i + 1]) == 1 then
        redis.call('ZADD', exp, ARGV[i + 2], id)
        redis.call('ZADD', cost, ARGV[i + 3], id)
        redis.call('ZADD', KEYS[3 + tonumber(ARGV[i + 4])], ARGV[i + 2], id)
        added = added + 1
    end
end
return added
