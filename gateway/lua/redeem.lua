--[[ redeem.lua - atomic check-and-redeem of one or more codes of ONE campaign shard.

Every key below carries the same hash tag {c<campaign>.<shard>}, so the whole decision and its effects happen
in one atomic script call (no read-then-write across round trips), on one Redis or on Redis Cluster. The layout
of the hashes, records and events is defined once in gateway/campaigns/layout.py (a test holds it to this file).

KEYS[1]          rgw:{c.s}:meta     the campaign's rules for this shard (layout.META, read by one HMGET below)
KEYS[2]          rgw:{c.s}:outbox   stream the redemption event is appended to (the ledger writer's input): one
                 field v3 = layout.EVENT_V3 joined by '|'
KEYS[3]          rgw:{c.s}:stats:<minute>   Redeem's decided attempts in the minute of ARGV[2] (now // 60000), by
                 reason - see "Decision counters" below
KEYS[4]          rgw:{c.s}:budget   this shard's share of the budget and what it granted (layout.BUDGET)
KEYS[5]          rgw:{c.s}:stores   the stores the campaign may be redeemed at (read when meta st = 1)
KEYS[6 ..]       per item, per candidate key id (NK of them), two keys: the code's bucket rgw:{c.s}:b:<ref[1..4]>
                 (field ref[5..24] = issue time, s: the code is issued) and its own state rgw:{c.s}:code:<ref>

ARGV[1]  mode: "redeem" changes state; "validate" runs the same checks and changes nothing
ARGV[2]  now, ms since epoch, from the gateway's injected clock (the script never reads the server clock)
ARGV[3]  NK, candidate keys per item
ARGV[4]  campaign id      ARGV[5]  shard
ARGV[6]  the authenticated caller's brand id: a shard of another brand's campaign answers exactly as a code that
         was never issued (NOT_FOUND, nothing read back, nothing written) - tenants are isolated inside the script
ARGV[7]  the HMAC key ids of the NK candidates, in order, joined by ','
ARGV[8 ..] per item, NF = 13 fields (gateway/script_calls.py ITEM_ARGS):
         idempotency field ("i:<hash of client, terminal and key>"), the same scope's field from before
         authentication ("i:<hash of store/terminal and key>", replayed, never written), request fingerprint,
         redemption id to use if this call redeems (UUIDv7; also names a counted attempt in the risk windows),
         caller ("client/terminal"), client id, store, terminal, customer device, latitude, longitude, accuracy
         (the last three empty when unknown), and the risk plan: "" (risk engine off) or JSON (see "Risk" below)

The campaign's rules, checked in this order, each its own answer (status / reason):
  unknown code (or another brand's)         NOT_FOUND            CODE_NOT_FOUND
  a retry with the same idempotency key      the first answer, replayed
  paused (meta p)                           CAMPAIGN_PAUSED      CAMPAIGN_PAUSED
  validity: the campaign's dates, the code's own, and vd ms after the code's issue (its bucket value)
                                            NOT_YET_VALID / EXPIRED
  uses left                                 ALREADY_REDEEMED     NO_USES_LEFT
  store allowed (meta st, KEYS[5])          NOT_ALLOWED          STORE_NOT_ALLOWED
  redemption hours (meta tz, win)           NOT_ALLOWED          OUTSIDE_REDEMPTION_HOURS
  the risk engine's device rules (decided with the code)
  budget (KEYS[4]: n, v shares; un, uv granted)
                                            BUDGET_EXHAUSTED     BUDGET_COUNT_EXHAUSTED / BUDGET_VALUE_EXHAUSTED
The budget is checked last, so a code that would be declined anyway never reads as "budget exhausted", and it is
never exceeded: the check and the grant are one atomic step, and a shard's share is only ever lowered by taking
from what it has not granted (lua/budget_move.lua).

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

A code's state hash (layout.CODE) exists once the code has state of its own: overrides of the campaign's rules
given at issuance (uses, vf, vu, fv, dev), and after a redemption used (uses granted minus reversed), seq (the last
use number: only grows, so a use number is never reused, even after a reversal gives a use back), last (ms of last
use), u:<n> = use record n (layout.USE_RECORD joined by '|': everything the outbox event carries, so
reconciliation can re-enqueue a use the ledger is missing, and the face value the budget counted), x:<n> = use n
was reversed (lua/reverse.lua), i:<scope> = "<fingerprint>|<redemption id>|<at ms>|<use number>|<uses left>" (first
answer to that idempotency key; only redemptions are recorded - a decline changed nothing, so a retry is simply
decided again).

Decision counters (KEYS[3], for `rgw campaign status` and the statistics; gateway/keys.py stats_key): in mode
"redeem" only, each item's decided answer adds 1 to the field of its reason (layout.DECISION_REASONS). Not counted:
a replay (the first call was), IDEMPOTENCY_MISMATCH (a fault, not a decision), NOT_FOUND (an unknown code names
only the campaign its text claims, and another brand's code must change nothing), RISK_DENIED and THROTTLED
(recorded as risk events). Items are tallied in Lua and written once per reason per call; the key gets its expiry
(STATS_TTL_MS, relative - never from the injected clock, which need not agree with Redis') once, when a write
finds it without one. The budget counters (un, uv) are likewise written once per call.

Reply: one array per item {status, uses_left, redemption_id, at_ms, use_number, replayed, rule, reason, scope,
retry_ms, shadow}; status is one of REDEEMED, REDEEMABLE, ALREADY_REDEEMED, NOT_FOUND, EXPIRED, NOT_YET_VALID,
CAMPAIGN_PAUSED, NOT_ALLOWED, BUDGET_EXHAUSTED (these three with their reason), IDEMPOTENCY_MISMATCH, RISK_DENIED
(a decline by rule/reason) or THROTTLED (a caller quota, scope named); shadow = "rule:reason,..." of the shadow
hits.
]]

local NF = 13
local GLOBAL = 7
local HEAD = 5 -- KEYS before the code keys: meta, outbox, decision counters, budget, stores
local STATS_TTL_MS = 7200000 -- gateway/keys.py STATS_TTL_MS
local DEFAULT_BRAND = '1' -- metas written before brands existed: the campaigns migration 0003 gave brand 1
local mode = ARGV[1]
local now = tonumber(ARGV[2])
local nk = tonumber(ARGV[3])
local campaign, shard, brand = ARGV[4], ARGV[5], ARGV[6]
local key_ids = {}
for kid in string.gmatch(ARGV[7], '[^,]+') do key_ids[#key_ids + 1] = kid end
-- layout.META, in order
local meta = redis.call('HMGET', KEYS[1], 'vf', 'vu', 'brand', 'uses', 'vd', 'p', 'fv', 'st', 'tz', 'win', 'rw')
local items = (#ARGV - GLOBAL) / NF
-- Another brand's campaign is invisible: the same answer as a campaign that does not exist.
local visible = meta[1] and (meta[3] or DEFAULT_BRAND) == brand

--@include risk_lib.lua
--@include hours_lib.lua

-- The campaign's rules, read once per call ---------------------------------------------------------------------

local campaign_vf, campaign_vu = tonumber(meta[1]), tonumber(meta[2])
local default_uses, valid_ms, default_fv = meta[4] or '1', tonumber(meta[5] or '0'), meta[7] or '0'
local paused = meta[6] == '1'
local restricted = meta[8] == '1'
local hours_closed = visible and meta[10] and meta[10] ~= '' and outside_hours(meta[9], meta[10], now)

-- layout.BUDGET: this shard's shares (false: no limit) and what it granted; grants are added up in Lua and
-- written once per call.
local budget = redis.call('HMGET', KEYS[4], 'n', 'v', 'un', 'uv')
local share_n, share_v = tonumber(budget[1]), tonumber(budget[2])
local granted_n, granted_v = tonumber(budget[3] or '0'), tonumber(budget[4] or '0')
local new_n, new_v = 0, 0

local allowed_store = {}
local function store_allowed(store)
  if not restricted then return true end
  local known = allowed_store[store]
  if known == nil then
    known = redis.call('SISMEMBER', KEYS[5], store) == 1
    allowed_store[store] = known
  end
  return known
end

-- Finding the code ---------------------------------------------------------------------------------------------

-- A code is issued when its bucket holds it; its own hash (one HMGET, this caller's idempotency records
-- included) exists only once it has state. Returns the code's hash key, its fields (layout.CODE, then the two
-- idempotency fields), its issue time (s) and its key id.
local function find_code(item, idem_field, legacy_field)
  for j = 1, nk do
    local at = HEAD + (item * nk + j - 1) * 2
    local code_key = KEYS[at + 2]
    local ref = string.match(code_key, ':code:(.+)$')
    local issued = redis.call('HGET', KEYS[at + 1], string.sub(ref, 5, 24))
    if issued then
      local c = redis.call('HMGET', code_key, 'uses', 'used', 'vf', 'vu', 'seq', 'fv', 'dev', idem_field, legacy_field)
      return code_key, c, tonumber(issued), key_ids[j], ref
    end
  end
  return nil
end

local function answer(status, left, reason)
  return {status, left or 0, '', 0, 0, 0, '', reason or '', '', 0, ''}
end

local function replay(record, fingerprint)
  local r = split(record)
  if r[1] ~= fingerprint then return answer('IDEMPOTENCY_MISMATCH') end
  return {'REDEEMED', tonumber(r[5]), r[2], tonumber(r[3]), tonumber(r[4]), 1, '', '', '', 0, ''}
end

-- Rules: each returns the decline, or nil when the rule allows the redemption -------------------------------------

local function rule_paused()
  if paused then return answer('CAMPAIGN_PAUSED', 0, 'CAMPAIGN_PAUSED') end
end

-- Fixed dates (the campaign's, narrowed by the code's own) and, with vd, a life counted from the code's issue.
local function rule_validity(c, issued_s, left)
  local from, to = campaign_vf, campaign_vu
  if c[3] then from = math.max(from, tonumber(c[3])) end
  if c[4] then to = math.min(to, tonumber(c[4])) end
  if valid_ms > 0 then to = math.min(to, issued_s * 1000 + valid_ms) end
  if now < from then return answer('NOT_YET_VALID', left) end
  if now >= to then return answer('EXPIRED', left) end
end

local function rule_uses(left)
  if left <= 0 then return answer('ALREADY_REDEEMED') end
end

local function rule_store(a, left)
  if not store_allowed(ARGV[a + 7]) then return answer('NOT_ALLOWED', left, 'STORE_NOT_ALLOWED') end
end

local function rule_hours(left)
  if hours_closed then return answer('NOT_ALLOWED', left, 'OUTSIDE_REDEMPTION_HOURS') end
end

local function rule_budget(fv, left)
  if share_n and granted_n + new_n + 1 > share_n then return answer('BUDGET_EXHAUSTED', left, 'BUDGET_COUNT_EXHAUSTED') end
  if share_v and granted_v + new_v + fv > share_v then return answer('BUDGET_EXHAUSTED', left, 'BUDGET_VALUE_EXHAUSTED') end
end

-- Redemption ----------------------------------------------------------------------------------------------------

local function check_device(plan, a, c, findings)
  local d = plan.d
  if not d then return end
  local dev = ARGV[a + 9]
  if d[1] ~= '' then
    if dev == '' then findings[#findings + 1] = {'device_binding', 'DEVICE_REQUIRED', d[1], '', 0, 0}
    elseif c[7] and c[7] ~= dev then findings[#findings + 1] = {'device_binding', 'DEVICE_MISMATCH', d[1], '', 0, 0} end
  end
  if d[2] > 0 then
    if dev == '' then findings[#findings + 1] = {'device_limit', 'DEVICE_REQUIRED', d[3], '', 0, 0}
    elseif tonumber(redis.call('GET', KEYS[d[4]]) or '0') >= d[2] then
      findings[#findings + 1] = {'device_limit', 'DEVICE_LIMIT', d[3], '', 0, 0}
    end
  end
end

-- The code as one decision sees it: {key, fields, issued_s, key id, ref, uses, used, fv}.
local function code_view(item, a)
  if not visible then return nil end
  local key, c, issued, kid, ref = find_code(item, ARGV[a + 1], ARGV[a + 2])
  if not key then return nil end
  return {key = key, c = c, issued = issued, kid = kid, ref = ref, uses = tonumber(c[1] or default_uses),
    used = tonumber(c[2] or '0'), fv = tonumber(c[6] or default_fv)}
end

local function redeem(code, a, plan)
  local c = code.c
  local seq = tonumber(c[5] or '0') + 1
  local used = code.used + 1
  local left = code.uses - used
  local idem, fp, rid, caller, client = ARGV[a + 1], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local store, term, dev = ARGV[a + 7], ARGV[a + 8], ARGV[a + 9]
  local lat, lon, acc = ARGV[a + 10], ARGV[a + 11], ARGV[a + 12]
  local fv = code.fv
  local use_record = table.concat({rid, now, fp, caller, store, term, dev, lat, lon, acc, idem, client, brand, fv}, '|')
  redis.call('HSET', code.key, 'seq', seq, 'used', used, 'last', now, 'u:' .. seq, use_record,
    idem, fp .. '|' .. rid .. '|' .. now .. '|' .. seq .. '|' .. left)
  local d = plan and plan.d
  if d and d[1] ~= '' and not c[7] and dev ~= '' then redis.call('HSET', code.key, 'dev', dev) end -- first presentation
  if d and d[2] > 0 and dev ~= '' then redis.call('INCR', KEYS[d[4]]) end
  new_n, new_v = new_n + 1, new_v + fv
  -- One field, "v3" = the event's values joined by '|' (see gateway/ledger/events.py): a sixth of the bytes and
  -- of the strings to decode compared with one field per value, which dominated the ledger writer's reads.
  redis.call('XADD', KEYS[2], '*', 'v3', table.concat({rid, code.ref, code.kid, campaign, shard, seq, now, fp, caller,
    store, term, dev, lat, lon, acc, idem, client, brand, fv}, '|'))
  return {'REDEEMED', left, rid, now, seq, 0, '', '', '', 0, ''}
end

-- The code's own decision and the campaign's rules (no risk, no budget): nil when they allow a redemption now.
local function code_decision(code, a)
  if not code then return answer('NOT_FOUND') end
  local answered = code.c[8] or code.c[9] -- this scope's first answer, or the same scope's from before authentication
  if mode == 'redeem' and answered then return replay(answered, ARGV[a + 3]) end
  local left = code.uses - code.used
  return rule_paused() or rule_validity(code.c, code.issued, left) or rule_uses(left) or rule_store(a, left)
    or rule_hours(left)
end

local function grant(code, a, plan)
  local declined = rule_budget(code.fv, code.uses - code.used)
  if declined then return declined end
  if mode ~= 'redeem' then return answer('REDEEMABLE', code.uses - code.used) end
  return redeem(code, a, plan)
end

local function decide_plain(item, a)
  local code = code_view(item, a)
  return code_decision(code, a) or grant(code, a, nil)
end

local function decide_risky(item, a, plan)
  local code = code_view(item, a)
  -- A retry is answered first: it is not a new attempt (nothing is checked or counted), and a POS must learn
  -- that its redemption happened even when it is over its quota or locked out now.
  local answered = code and mode == 'redeem' and (code.c[8] or code.c[9])
  if answered then return replay(answered, ARGV[a + 3]) end
  local refused, hits = verdict(plan, a)
  if refused then return refused end
  local reply = code_decision(code, a)
  if not reply then
    local device, denial = {}, nil
    check_device(plan, a, code.c, device)
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
    reply = grant(code, a, plan)
    if reply[1] == 'REDEEMED' then after_redemption(plan, a) end
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

-- Decision counters ---------------------------------------------------------------------------------------------

local REASON = {REDEEMED = 'REDEEMED', ALREADY_REDEEMED = 'NO_USES_LEFT', EXPIRED = 'CODE_EXPIRED',
  NOT_YET_VALID = 'CODE_NOT_YET_VALID'}
local COUNTED = {CAMPAIGN_PAUSED = true, NOT_ALLOWED = true, BUDGET_EXHAUSTED = true}
local tally, tallied = {}, {}

local function tally_decision(reply)
  if mode ~= 'redeem' or reply[6] == 1 then return end -- Validate counts nothing; a replay was counted before
  local reason = REASON[reply[1]] or (COUNTED[reply[1]] and reply[8])
  if not reason then return end
  if not tally[reason] then tallied[#tallied + 1] = reason end
  tally[reason] = (tally[reason] or 0) + 1
end

local function write_counters()
  for _, reason in ipairs(tallied) do redis.call('HINCRBY', KEYS[3], reason, tally[reason]) end
  -- PTTL is a read (nothing for the AOF): the expiry is written once per key, when a write finds it without one.
  if #tallied > 0 and redis.call('PTTL', KEYS[3]) == -1 then redis.call('PEXPIRE', KEYS[3], STATS_TTL_MS) end
  -- The totals were read at the start of this atomic call: one HSET of both writes them exactly, and costs the AOF
  -- one command where HINCRBYs would cost two.
  -- string.format: Redis' Lua would write a number above 1e14 as "1e+14" ("%.14g").
  if new_v > 0 then
    redis.call('HSET', KEYS[4], 'un', string.format('%d', granted_n + new_n), 'uv', string.format('%d', granted_v + new_v))
  elseif new_n > 0 then
    redis.call('HSET', KEYS[4], 'un', string.format('%d', granted_n + new_n))
  end
end

local replies = {}
for item = 0, items - 1 do
  local reply = decide(item)
  tally_decision(reply)
  replies[#replies + 1] = reply
end
write_counters()
return replies
