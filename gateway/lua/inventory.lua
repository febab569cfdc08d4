--[[ inventory.lua - dispense, hold, confirm, release and expire card secrets of ONE SKU shard, atomically.

Every key carries the shard's hash tag {k<sku>.<shard>} (gateway/inventory/layout.py defines them once), so the
choice of secrets and every effect of it - the indexes, the order, the outbox event - are one atomic step: two
orders never get one secret, stock is never oversold, a retry finds the order's first answer.

KEYS[1]  rgw:{k.s}:meta     hash: brand, reuse, max (secrets per order)
KEYS[2]  rgw:{k.s}:exp      zset: available secret ids by expiry ms
KEYS[3]  rgw:{k.s}:cost     zset: available secret ids by cost
KEYS[4]  rgw:{k.s}:sec      hash: secret id -> layout.SECRET_RECORD joined by '|'
KEYS[5]  rgw:{k.s}:holds    zset: held order ids by hold expiry ms
KEYS[6]  rgw:{k.s}:outbox   stream: field i1 = layout.EVENT joined by '|' (with the order's fp, exp, strat, sup)
KEYS[7]  rgw:{k.s}:order:<order id>   this call's order (layout.ORDER); any key of the tag for op sweep
KEYS[7..] with op dispense_many: the orders' keys, in the order of their ARGV groups
The supplier indexes (rgw:{k.s}:sup:<supplier>) of the secrets a call takes or returns, and the orders of expired
holds, are named by the data (a secret's supplier, a hold's order id): the script builds those keys from KEYS[1]'s
prefix, so they share the tag (one slot on Redis Cluster).

ARGV[1]  op: dispense | hold | confirm | release | sweep | dispense_many
ARGV[2]  now, ms since epoch, the gateway's injected clock (never the server's)
ARGV[3]  the caller's brand: another brand's shard answers UNKNOWN_SKU and changes nothing
ARGV[4]  order id          ARGV[5]  request fingerprint (dispense, hold; '' otherwise)
ARGV[6]  quantity          ARGV[7]  strategy: expiry | cost | supplier      ARGV[8]  supplier (strategy supplier)
ARGV[9]  hold ttl ms       ARGV[10] event id (UUIDv7): the k-th event of the call gets its last 3 hex digits = k
ARGV[11] client id (the events' client)
ARGV[12] at most this many due holds are expired by the call (before its own op)
ARGV[13] sku id            ARGV[14] shard   (for the events)
ARGV[15..] with op dispense_many (DispenseStream): per order, in turn, 6 values - order id, fingerprint, quantity,
         strategy, supplier, event id (store.ORDER_ARGS); ARGV[4..10] are unused then. Each order is decided
         exactly as a dispense of its own, one after the other, and the reply is the list of their replies.

Taking a secret: used + 1 (the use number: only grows, except that giving back the last use taken steps it back,
so a single-use secret held and released is use 1 again), left - 1; at left 0 it leaves every index. A reusable
secret with dispenses left stays available; one call never takes it twice (ZRANGE members are distinct).
Giving back (release, expiry): left + 1, back into the indexes when it had left them.

Reply: {status, replayed, late, hold_exp_ms, released, holds_left, then per secret 5 values: id, use, supplier,
expiry_ms, sealed = "key_id|nonce_b64|ct_b64"}. status: DISPENSED, HELD, RELEASED, OUT_OF_STOCK, QUANTITY_ABOVE_LIMIT,
UNKNOWN_SKU, ORDER_ID_REUSED, HOLD_EXPIRED, ORDER_NOT_FOUND, NOT_HELD, SWEPT.
]]

local op, now, brand = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local order_id, fp, quantity = ARGV[4], ARGV[5], tonumber(ARGV[6])
local strategy, supplier, ttl = ARGV[7], ARGV[8], tonumber(ARGV[9])
local event_base, client, expire_bound = ARGV[10], ARGV[11], tonumber(ARGV[12])
local order_key = KEYS[7] -- the order being decided (dispense_many: each in turn)
local sku, shard = ARGV[13], ARGV[14]
local prefix = string.sub(KEYS[1], 1, -5) -- 'rgw:{k<sku>.<shard>}:' (KEYS[1] ends in 'meta')
local COST_WALK = 10000 -- the cheapest strategy skips expired secrets, at most this many beyond the quantity
local PAGE = 256
local events = 0

-- A secret's record, layout.SECRET_RECORD joined by '|', read by one match (a generic split is ~4x slower in
-- Redis' Lua): head = supplier|cost|currency|expiry_ms and sealed = key_id|nonce_b64|ct_b64 are kept as they are,
-- only left and used change. r = {supplier, cost, currency, expiry_ms, left, used, head = ..., sealed = ...}
local RECORD = '^(([^|]*)|([^|]*)|([^|]*)|([^|]*))|([^|]*)|([^|]*)|(.*)$'

local function parse(text)
  local head, supplier, cost, currency, expiry, left, used, sealed = string.match(text, RECORD)
  return {supplier, cost, currency, expiry, tonumber(left), tonumber(used), head = head, sealed = sealed}
end

local function unparse(r)
  return r.head .. '|' .. string.format('%d|%d|', r[5], r[6]) .. r.sealed
end

local function reply(status, replayed, late, exp, released, holds_left, secrets)
  local out = {status, replayed or 0, late or 0, exp or 0, released or 0, holds_left or 0}
  for _, s in ipairs(secrets or {}) do
    local r = s.r
    out[#out + 1] = s.id
    out[#out + 1] = s.use
    out[#out + 1] = r[1]
    out[#out + 1] = r[4]
    out[#out + 1] = r.sealed
  end
  return out
end

-- Secrets: {id, use, r = layout.SECRET_RECORD fields} ----------------------------------------------------------

local function record(id)
  return parse(redis.call('HGET', KEYS[4], id))
end

local function save(id, r)
  redis.call('HSET', KEYS[4], id, unparse(r))
end

local function give_back(id, use)
  local r = record(id)
  local left = r[5]
  if r[6] == use then r[6] = use - 1 end
  r[5] = left + 1
  save(id, r)
  if left <= 0 then
    redis.call('ZADD', KEYS[2], r[4], id)
    redis.call('ZADD', KEYS[3], r[2], id)
    redis.call('ZADD', prefix .. 'sup:' .. r[1], r[4], id)
  end
end

-- The order's secrets, "<id>;<use>,..." <-> {{id, use}, ...}
local function parse_ids(ids)
  local out = {}
  if not ids or ids == '' then return out end
  for id, use in string.gmatch(ids, '([^,;]+);(%d+)') do out[#out + 1] = {id, tonumber(use)} end
  return out
end

local function format_ids(secrets)
  local parts = {}
  for _, s in ipairs(secrets) do parts[#parts + 1] = s.id .. ';' .. s.use end
  return table.concat(parts, ',')
end

local function with_records(pairs_)
  local out = {}
  if #pairs_ == 0 then return out end
  local ids = {}
  for i, p in ipairs(pairs_) do ids[i] = p[1] end
  local records = redis.call('HMGET', KEYS[4], unpack(ids))
  for i, p in ipairs(pairs_) do out[i] = {id = p[1], use = p[2], r = parse(records[i])} end
  return out
end

-- Selection: the ids of `q` distinct available unexpired secrets, or nil (all or nothing) ----------------------

local function by_expiry(key, q)
  local ids = redis.call('ZRANGEBYSCORE', key, '(' .. now, '+inf', 'LIMIT', 0, q)
  if #ids < q then return nil end
  return ids
end

local function by_cost(q)
  local ids, start, limit = {}, 0, q + COST_WALK
  while start < limit do
    local page = redis.call('ZRANGE', KEYS[3], start, start + PAGE - 1)
    if #page == 0 then return nil end
    for _, id in ipairs(page) do
      local exp = tonumber(redis.call('ZSCORE', KEYS[2], id))
      if exp and exp > now then
        ids[#ids + 1] = id
        if #ids == q then return ids end
      end
    end
    start = start + PAGE
  end
  return nil
end

local function choose(how, sup, q)
  if how == 'cost' then return by_cost(q) end
  if how == 'supplier' then return by_expiry(prefix .. 'sup:' .. sup, q) end
  return by_expiry(KEYS[2], q)
end

-- Every secret of `ids` (distinct) taken once, in order: one HMGET and one HSET for all, and one ZREM per index
-- for those used up (per supplier for the supplier indexes) - a ten-secret order is a handful of commands.
local function take_all(ids)
  local records = redis.call('HMGET', KEYS[4], unpack(ids))
  local taken, writes, gone, sups, by_sup = {}, {}, {}, {}, {}
  for i, id in ipairs(ids) do
    local r = parse(records[i])
    local use = r[6] + 1
    local left = r[5] - 1
    r[5], r[6] = left, use
    writes[#writes + 1] = id
    writes[#writes + 1] = unparse(r)
    if left <= 0 then
      gone[#gone + 1] = id
      local members = by_sup[r[1]]
      if not members then
        members = {}
        by_sup[r[1]] = members
        sups[#sups + 1] = r[1]
      end
      members[#members + 1] = id
    end
    taken[#taken + 1] = {id = id, use = use, r = r}
  end
  redis.call('HSET', KEYS[4], unpack(writes))
  if #gone > 0 then
    redis.call('ZREM', KEYS[2], unpack(gone))
    redis.call('ZREM', KEYS[3], unpack(gone))
    for _, sup in ipairs(sups) do redis.call('ZREM', prefix .. 'sup:' .. sup, unpack(by_sup[sup])) end
  end
  return taken
end

-- Events ---------------------------------------------------------------------------------------------------------

local function event_id()
  local id = string.sub(event_base, 1, 33) .. string.format('%03x', events)
  events = events + 1
  return id
end

-- o: the order's own fields (fp, exp, strat, sup), carried by each of its events: its last event restores it.
local function emit(kind, order, secrets, who, o)
  local parts = {}
  for _, s in ipairs(secrets) do
    local r = s.r
    parts[#parts + 1] = s.id .. ';' .. string.format('%d', s.use) .. ';' .. r[1] .. ';' .. r[2] .. ';' .. r[3]
  end
  local secrets_ = table.concat(parts, ',')
  local order_fp, order_exp, order_strat, order_sup = o.fp or '', o.exp or 0, o.strat or '', o.sup or ''
  local event = {event_id(), kind, brand, sku, shard, order, secrets_, now, who,
    order_fp, order_exp, order_strat, order_sup} -- layout.EVENT, in order
  redis.call('XADD', KEYS[6], '*', 'i1', table.concat(event, '|'))
end

-- Holds ------------------------------------------------------------------------------------------------------------

-- An expired (or released) hold gives its secrets back.
local function end_hold(order, key, state, kind, who)
  local f = redis.call('HMGET', key, 'ids', 'fp', 'exp', 'strat', 'sup')
  local pairs_ = parse_ids(f[1])
  local secrets = with_records(pairs_)
  for _, p in ipairs(pairs_) do give_back(p[1], p[2]) end
  redis.call('HSET', key, 'st', state, 'at', now)
  redis.call('ZREM', KEYS[5], order)
  emit(kind, order, secrets, who, {fp = f[2], exp = f[3], strat = f[4], sup = f[5]})
  return #pairs_
end

local function expire_due(bound)
  local due = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, bound)
  for _, order in ipairs(due) do
    local key = prefix .. 'order:' .. order
    if redis.call('HGET', key, 'st') == 'held' then
      end_hold(order, key, 'expired', 'expire', '')
    else
      redis.call('ZREM', KEYS[5], order)
    end
  end
end

-- Operations -----------------------------------------------------------------------------------------------------

-- The first answer to this order, again (a Hold retried answers HELD whatever became of the hold since).
local function replay(o, pairs_)
  if op == 'hold' then return reply('HELD', 1, 0, tonumber(o.exp)) end
  return reply('DISPENSED', 1, tonumber(o.late or '0'), 0, 0, 0, with_records(pairs_))
end

local function read_order()
  local f = redis.call('HMGET', order_key, 'fp', 'st', 'ids', 'exp', 'late', 'strat', 'sup')
  if not f[2] then return nil end
  return {fp = f[1], st = f[2], ids = f[3], exp = f[4], late = f[5], strat = f[6], sup = f[7]}
end

local function new_order(meta)
  local o = read_order()
  if o then
    if o.fp ~= fp then return reply('ORDER_ID_REUSED') end
    return replay(o, parse_ids(o.ids))
  end
  if not meta[1] then return reply('OUT_OF_STOCK') end
  if quantity > tonumber(meta[3] or '100') then return reply('QUANTITY_ABOVE_LIMIT') end
  local ids = choose(strategy, supplier, quantity)
  if not ids then return reply('OUT_OF_STOCK') end
  local taken = take_all(ids)
  local state, exp, kind = 'dispensed', 0, 'dispense'
  if op == 'hold' then state, exp, kind = 'held', now + ttl, 'hold' end
  redis.call('HSET', order_key, 'fp', fp, 'st', state, 'ids', format_ids(taken), 'exp', exp, 'at', now,
    'strat', strategy, 'sup', supplier)
  if op == 'hold' then redis.call('ZADD', KEYS[5], exp, order_id) end
  emit(kind, order_id, taken, client, {fp = fp, exp = exp, strat = strategy, sup = supplier})
  if op == 'hold' then return reply('HELD', 0, 0, exp) end
  return reply('DISPENSED', 0, 0, 0, 0, 0, taken)
end

-- A late payment: the hold expired, the order takes what stock there is now (by its own strategy), or nothing.
local function late_confirm(o)
  local q = #parse_ids(o.ids)
  local ids = choose(o.strat or 'expiry', o.sup or '', q)
  if not ids then return reply('HOLD_EXPIRED') end
  local taken = take_all(ids)
  redis.call('HSET', order_key, 'st', 'dispensed', 'ids', format_ids(taken), 'at', now, 'late', 1)
  emit('confirm', order_id, taken, client, o)
  return reply('DISPENSED', 0, 1, 0, 0, 0, taken)
end

local function any_expired(secrets)
  for _, s in ipairs(secrets) do
    if tonumber(s.r[4]) <= now then return true end
  end
  return false
end

local function confirm()
  local o = read_order()
  if not o then return reply('ORDER_NOT_FOUND') end
  if o.st == 'dispensed' then return replay(o, parse_ids(o.ids)) end
  if o.st == 'released' then return reply('NOT_HELD') end
  local secrets = with_records(parse_ids(o.ids))
  -- a hold past its TTL, or holding a secret that expired meanwhile (never dispensed), is a late payment
  if o.st == 'held' and (now >= tonumber(o.exp) or any_expired(secrets)) then
    end_hold(order_id, order_key, 'expired', 'expire', '')
    o.st = 'expired'
  end
  if o.st == 'expired' then return late_confirm(o) end
  redis.call('HSET', order_key, 'st', 'dispensed', 'at', now)
  redis.call('ZREM', KEYS[5], order_id)
  emit('confirm', order_id, secrets, client, o)
  return reply('DISPENSED', 0, 0, 0, 0, 0, secrets)
end

local function release()
  local o = read_order()
  if not o then return reply('ORDER_NOT_FOUND') end
  if o.st == 'dispensed' then return reply('NOT_HELD') end
  if o.st ~= 'held' then return reply('RELEASED', 1) end
  local n = end_hold(order_id, order_key, 'released', 'release', client)
  return reply('RELEASED', 0, 0, 0, n)
end

-- DispenseStream: the orders of one message on this shard, each as its own dispense, in turn.
local function dispense_many(meta, foreign)
  local out, n = {}, 0
  if not foreign then expire_due(expire_bound) end
  for i = 15, #ARGV, 6 do
    n = n + 1
    order_id, fp, quantity = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    strategy, supplier, event_base = ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
    order_key, events = KEYS[6 + n], 0
    if foreign then out[n] = reply('UNKNOWN_SKU') else out[n] = new_order(meta) end
  end
  return out
end

local meta = redis.call('HMGET', KEYS[1], 'brand', 'reuse', 'max')
local foreign = meta[1] and meta[1] ~= brand
if op == 'dispense_many' then return dispense_many(meta, foreign) end
if foreign then return reply('UNKNOWN_SKU') end
expire_due(expire_bound)
if op == 'sweep' then return reply('SWEPT', 0, 0, 0, 0, redis.call('ZCARD', KEYS[5])) end
if op == 'dispense' or op == 'hold' then return new_order(meta) end
if op == 'confirm' then return confirm() end
if op == 'release' then return release() end
return redis.error_reply('unknown op ' .. tostring(op))
