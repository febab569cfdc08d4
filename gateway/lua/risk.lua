--[[ risk.lua - the risk engine's counters as their own call, for when they do not live in the redemption's slot
(Redis Cluster: the brand's risk tag {r<brand>} and the campaign shard's tag are different slots; or a separate
risk Redis, RGW_RISK_REDIS_URL). Every key is in the brand's risk tag, so the whole check stays atomic: every lock
and window of an attempt is checked before any is counted.

KEYS   the plans' keys (risk tag only), referred to by index from each item's plan
ARGV   redeem.lua's layout (gateway/redis_store.py SCRIPT_ARGS + ITEM_ARGS): the code fields are ignored here; the
       plan carries x, s, l, w, t and e (see redeem.lua) - device rules (d) are decided with the code, in redeem.lua

Reply: one array per item, redeem.lua's shape, status ADMITTED (go on to redeem.lua), RISK_DENIED or THROTTLED.
An admitted Redeem attempt is counted in every window here, before the code is looked at: a retry with the same
idempotency key counts too (its record is in the other slot). Failed attempts and the device's last place are
reported after the redemption (failures.lua, a SET) - see gateway/redis_store.py.
]]

local NF = 13
local GLOBAL = 6
local mode = ARGV[1]
local now = tonumber(ARGV[2])
local campaign, brand = ARGV[4], ARGV[6]
local items = (#ARGV - GLOBAL) / NF

--@include risk_lib.lua

local function decide(item)
  local a = GLOBAL + item * NF
  local plan = cjson.decode(ARGV[a + 13])
  local refused, hits = verdict(plan, a)
  if refused then return refused end
  count_attempt(plan, ARGV[a + 4])
  return finish(plan, a, {'ADMITTED', 0, '', 0, 0, 0, '', '', '', 0, ''}, hits)
end

local replies = {}
for item = 0, items - 1 do replies[#replies + 1] = decide(item) end
return replies
