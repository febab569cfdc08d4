--[[ redeem.lua - atomic check-and-redeem of one or more codes of ONE campaign shard.

Every key below carries the same hash tag {c<campaign>.<shard>}, so the whole decision and its effects happen
in one atomic script call (no read-then-write across round trips), on one Redis or on Redis Cluster.

KEYS[1]          rgw:{c.s}:meta     campaign rules for this shard: vf, vu (validity window, ms since epoch), brand
KEYS[2]          rgw:{c.s}:outbox   stream the redemption event is appended to (the ledger writer's input): one
                 field v2 = "rid|ref|kid|cid|shard|use|at|fp|caller|store|term|dev|lat|lon|acc|idem|client|brand"
KEYS[3]          rgw:{c.s}:stats:<minute>   Redeem's decided attempts in the minute of ARGV[2] (now // 60000), by
                 reason - see "Decision counters" below
KEYS[4 ..]       code hashes, NK candidates per item (the code_ref under each HMAC key id), item by item

ARGV[1]  mode: "redeem" changes state; "validate" runs the same checks and changes nothing
ARGV[2]  now, ms since epoch, from the gateway's injected clock (the script never reads the server clock)
ARGV[3]  NK, candidate keys per item
ARGV[4]  campaign id      ARGV[5]  shard
ARGV[6]  the authenticated caller's brand id: a shard of another brand's campaign answers exactly as a code that
         was never issued (NOT_FOUND, nothing read back, nothing written) - tenants are isolated inside the script
ARGV[7 ..] per item, NF = 13 fields (gateway/redis_store.py ITEM_ARGS):
         idempotency field ("i:<hash of client, terminal and key>"), the same scope's field from before
         authentication ("i:<hash of store/terminal and key>", replayed, never written), request fingerprint,
         redemption id to use if this call redeems (UUIDv7; also names a counted attempt in the risk windows),
         caller ("client/terminal"), client id, store, terminal, customer device, latitude, longitude, accuracy
         (the last three empty when unknown), and the risk plan: "" (risk engine off) or JSON (see "Risk" below)

Risk (risk/model.py CounterPlan, encoded by gateway/risk_plan.py; KEYS indices point after the code keys, in the
brand's risk tag {r<brand>} - on a single Redis one script call covers both; see risk/keys.py for Cluster):
  x  = {rule, reason, scope}          an in-process rule already denied (enforced): record it, touch nothing else
  s  = {{rule, reason, scope}, ...}   in-process shadow hits, recorded
  l  = {{lock_k, fail_k, threshold, window_ms, cooldown_ms, mode, scope}, ...}   lockouts: a present lock denies
       (even a valid code); a failed attempt (NOT_FOUND: unknown, another brand's) is counted in fail_k and at
       the threshold the scope is locked for the cool-down
  w  = {{k, limit, window_ms, mode, rule, reason, quota, scope}, ...}   sliding windows: all checked before any is
       counted; counted (ZADD rid) when no lock and no window denies the attempt and mode is redeem - whatever the
       code's own answer then is (a used code, a device mismatch: the attempt was made); a retry replayed is not
       an attempt
  t  = {k, max_speed_mps, ttl_ms, mode}   impossible travel of the customer device (needs lat/lon)
  d  = {binding_mode, limit, limit_mode, limit_k}   code <-> device binding (code field "dev") and uses per device
       per campaign shard (counter limit_k, campaign tag), decided with the code
  e  = events_k                        the brand's risk-event stream: every denial and shadow hit, field r1 =
       "at|brand|campaign|store|term|client|dev|rule|reason|mode|scope|lat|lon|acc|kind" (gateway/ledger)
  mode is "E" (enforce) or "S" (shadow: evaluated and recorded, never denies)

Code hash fields: cid, kid, uses (allowed), used (taken now), seq (last use number: only grows, so a use number is
never reused, even after a reversal gives a use back), vf, vu, last (ms of last use),
u:<n> = use record n: "rid|at|fp|caller|store|term|dev|lat|lon|acc|idem|client|brand" - everything the outbox
event carries, so reconciliation can re-enqueue a use the ledger is missing; i:<scope> = "<fingerprint>|<redemption id>|<at ms>|
<use number>|<uses left>" (first answer to that idempotency key; only redemptions are recorded - a decline
changed nothing, so a retry is simply decided again).

Decision counters (KEYS[3], for `rgw campaign status`; gateway/keys.py stats_key): in mode "redeem" only, each
item's decided answer adds 1 to the field of its reason - REDEEMED, NO_USES_LEFT, CODE_EXPIRED, CODE_NOT_YET_VALID.
Not counted: a replay (the first call was), IDEMPOTENCY_MISMATCH (a fault, not a decision), NOT_FOUND (an unknown
code names only the campaign its text claims, and another brand's code must change nothing), RISK_DENIED and
THROTTLED (recorded as risk events). A decline is not recorded for replay, so its retry is counted again: it was
decided again. Items are tallied in Lua and written once per reason per call (a 64-item batch: at most four
HINCRBY); the key gets its expiry (STATS_TTL_MS, relative - never from the injected clock, which need not agree
with Redis') once, when a write finds it without one.

Reply: one array per item {status, uses_left, redemption_id, at_ms, use_number, replayed, rule, reason, scope,
retry_ms, shadow}; status is one of REDEEMED, REDEEMABLE, ALREADY_REDEEMED, NOT_FOUND, EXPIRED, NOT_YET_VALID,
IDEMPOTENCY_MISMATCH, RISK_DENIED (a decline by rule/reason) or THROTTLED (a caller quota, scope named);
shadow = "rule:reason,..." of the shadow hits.
]]

local NF = 13
local GLOBAL = 6
local HEAD = 3 -- KEYS before the code keys: meta, outbox, decision counters
local STATS_TTL_MS = 7200000 -- gateway/keys.py STATS_TTL_MS
local DEFAULT_BRAND = '1' -- metas written before brands existed: the campaigns migration 0003 gave brand 1
local mode = ARGV[1]
local now = tonumber(ARGV[2])
local nk = tonumber(ARGV[3])
local campaign, shard, brand = ARGV[4], ARGV[5], ARGV[6]
local meta = redis.call('HMGET', KEYS[1], 'vf', 'vu', 'brand')
local items = (#ARGV - GLOBAL) / NF
-- Another brand's campaign is invisible: the same answer as a campaign that does not exist.
local visible = meta[1] and (meta[3] or DEFAULT_BRAND) == brand

--@include risk_lib.lua

-- One HMGET per candidate key fetches everything a decision needs, this caller's idempotency record included:
-- the fewer commands per item, the more redemptions one Redis core (and one AOF fsync) carries.
local function find_code(item, idem_field, legacy_field)
  for j = 1, nk do
    local key = KEYS[HEAD + item * nk + j]
    local c = redis.call('HMGET', key, 'uses', 'used', 'vf', 'vu', 'seq', 'kid', idem_field, legacy_field, 'dev')
    if c[1] then return key, c end
  end
  return nil, nil
end

local function answer(status, left)
  return {status, left or 0, '', 0, 0, 0, '', '', '', 0, ''}
end

local function replay(record, fingerprint)
  local r = split(record)
  if r[1] ~= fingerprint then return answer('IDEMPOTENCY_MISMATCH') end
  return {'REDEEMED', tonumber(r[5]), r[2], tonumber(r[3]), tonumber(r[4]), 1, '', '', '', 0, ''}
end

local function window_status(vf, vu)
  if now < math.max(tonumber(vf), tonumber(meta[1])) then return 'NOT_YET_VALID' end
  if now >= math.min(tonumber(vu), tonumber(meta[2])) then return 'EXPIRED' end
  return nil
end

-- Redemption ------------------------------------------------------------------------------------------------

local function check_device(plan, a, c, findings)
  local d = plan.d
  if not d then return end
  local dev = ARGV[a + 9]
  if d[1] ~= '' then
    if dev == '' then findings[#findings + 1] = {'device_binding', 'DEVICE_REQUIRED', d[1], '', 0, 0}
    elseif c[9] and c[9] ~= dev then findings[#findings + 1] = {'device_binding', 'DEVICE_MISMATCH', d[1], '', 0, 0} end
  end
  if d[2] > 0 then
    if dev == '' then findings[#findings + 1] = {'device_limit', 'DEVICE_REQUIRED', d[3], '', 0, 0}
    elseif tonumber(redis.call('GET', KEYS[d[4]]) or '0') >= d[2] then
      findings[#findings + 1] = {'device_limit', 'DEVICE_LIMIT', d[3], '', 0, 0}
    end
  end
end


local function redeem(key, c, a, plan)
  local seq = tonumber(c[5] or '0') + 1
  local used = tonumber(c[2]) + 1
  local left = tonumber(c[1]) - used
  local idem, fp, rid, caller, client = ARGV[a + 1], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local store, term, dev = ARGV[a + 7], ARGV[a + 8], ARGV[a + 9]
  local lat, lon, acc = ARGV[a + 10], ARGV[a + 11], ARGV[a + 12]
  local use_record = table.concat({rid, now, fp, caller, store, term, dev, lat, lon, acc, idem, client, brand}, '|')
  redis.call('HSET', key, 'seq', seq, 'used', used, 'last', now, 'u:' .. seq, use_record,
    idem, fp .. '|' .. rid .. '|' .. now .. '|' .. seq .. '|' .. left)
  local d = plan and plan.d
  if d and d[1] ~= '' and not c[9] and dev ~= '' then redis.call('HSET', key, 'dev', dev) end -- first presentation
  if d and d[2] > 0 and dev ~= '' then redis.call('INCR', KEYS[d[4]]) end
  local code_ref = string.match(key, ':code:(.+)$')
  -- One field, "v2" = the event's values joined by '|' (see gateway/ledger/events.py): a sixth of the bytes and
  -- of the strings to decode compared with one field per value, which dominated the ledger writer's reads.
  redis.call('XADD', KEYS[2], '*', 'v2', table.concat({rid, code_ref, c[6], campaign, shard, seq, now, fp, caller,
    store, term, dev, lat, lon, acc, idem, client, brand}, '|'))
  return {'REDEEMED', left, rid, now, seq, 0, '', '', '', 0, ''}
end

-- The code's own decision (no risk): nil when it may be redeemed now.
local function code_decision(key, c, a)
  if not key then return answer('NOT_FOUND') end
  local answered = c[7] or c[8] -- this scope's first answer, or the same scope's from before authentication
  if mode == 'redeem' and answered then return replay(answered, ARGV[a + 3]) end
  local left = tonumber(c[1]) - tonumber(c[2])
  local window = window_status(c[3], c[4])
  if window then return answer(window, left) end
  if left <= 0 then return answer('ALREADY_REDEEMED') end
  return nil
end

local function decide_plain(item, a)
  local key, c = nil, nil
  if visible then key, c = find_code(item, ARGV[a + 1], ARGV[a + 2]) end
  local reply = code_decision(key, c, a)
  if reply then return reply end
  if mode ~= 'redeem' then return answer('REDEEMABLE', tonumber(c[1]) - tonumber(c[2])) end
  return redeem(key, c, a, nil)
end

local function decide_risky(item, a, plan)
  local key, c = nil, nil
  if visible then key, c = find_code(item, ARGV[a + 1], ARGV[a + 2]) end
  -- A retry is answered first: it is not a new attempt (nothing is checked or counted), and a POS must learn
  -- that its redemption happened even when it is over its quota or locked out now.
  local answered = key and mode == 'redeem' and (c[7] or c[8])
  if answered then return replay(answered, ARGV[a + 3]) end
  local refused, hits = verdict(plan, a)
  if refused then return refused end
  local reply = code_decision(key, c, a)
  if not reply then
    local device, denial = {}, nil
    check_device(plan, a, c, device)
    for _, f in ipairs(device) do
      if f[3] == 'E' and not denial then denial = f elseif f[3] ~= 'E' then hits[#hits + 1] = f end
    end
    if denial then
      record(plan, a, denial)
      reply = denied(denial)
    end
  end
  count_attempt(plan, ARGV[a + 4])
  if not reply then
    if mode ~= 'redeem' then return finish(plan, a, answer('REDEEMABLE', tonumber(c[1]) - tonumber(c[2])), hits) end
    reply = redeem(key, c, a, plan)
    after_redemption(plan, a)
  elseif reply[1] == 'NOT_FOUND' then
    count_failure(plan, a, hits)
  end
  return finish(plan, a, reply, hits)
end

local function decide(item)
  local a = GLOBAL + item * NF
  local plan = ARGV[a + 13]
  if plan == '' then return decide_plain(item, a) end
  return decide_risky(item, a, cjson.decode(plan))
end

-- Decision counters ----------------------------------------------------------------------------------------

local COUNTED = {'REDEEMED', 'ALREADY_REDEEMED', 'EXPIRED', 'NOT_YET_VALID'} -- statuses, in a fixed order
local REASON = {REDEEMED = 'REDEEMED', ALREADY_REDEEMED = 'NO_USES_LEFT', EXPIRED = 'CODE_EXPIRED',
  NOT_YET_VALID = 'CODE_NOT_YET_VALID'}
local tally = {}

local function tally_decision(reply)
  if mode ~= 'redeem' or reply[6] == 1 then return end -- Validate counts nothing; a replay was counted before
  if REASON[reply[1]] then tally[reply[1]] = (tally[reply[1]] or 0) + 1 end
end

local function write_tally()
  local written = false
  for _, status in ipairs(COUNTED) do
    if tally[status] then
      redis.call('HINCRBY', KEYS[3], REASON[status], tally[status])
      written = true
    end
  end
  -- PTTL is a read (nothing for the AOF): the expiry is written once per key, when a write finds it without one.
  if written and redis.call('PTTL', KEYS[3]) == -1 then redis.call('PEXPIRE', KEYS[3], STATS_TTL_MS) end
end

local replies = {}
for item = 0, items - 1 do
  local reply = decide(item)
  tally_decision(reply)
  replies[#replies + 1] = reply
end
write_tally()
return replies
