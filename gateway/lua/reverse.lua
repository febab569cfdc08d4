--[[ reverse.lua - void one redemption (a refund or void at the till), atomically, exactly once.

Every key carries the campaign shard's hash tag {c<campaign>.<shard>}: the reversal is decided and applied in one
script call, so it serialises with every redemption of the same code (a reversal racing a redemption of a
multi-use code loses nothing: each sees the other's effect whole) and with every other reversal of it.

KEYS[1]  rgw:{c.s}:meta     brand, uses (per code), rw (reversal window, ms; 0 = none)
KEYS[2]  rgw:{c.s}:budget   un, uv: granted and not reversed (given back here); rev: reversals
KEYS[3]  rgw:{c.s}:outbox   the reversal event is appended: field x1 = layout.REVERSAL_EVENT joined by '|'
KEYS[4]  rgw:{c.s}:code:<ref>   the code's state: u:<n> (the use record), x:<n> (this use's reversal), r:<scope>

ARGV[1]  now (ms, the gateway's injected clock)     ARGV[2]  the caller's brand
ARGV[3]  redemption id                             ARGV[4]  its use number n (from the ledger)
ARGV[5]  reversal id to use (UUIDv7)               ARGV[6]  reason
ARGV[7]  idempotency field "r:<hash of client, terminal, redemption and key>"
ARGV[8]  request fingerprint                       ARGV[9]  caller "client/terminal"     ARGV[10]  client id
ARGV[11] code_ref   ARGV[12] key id   ARGV[13] campaign   ARGV[14] shard   (for the event)

x:<n> = layout.REVERSAL_RECORD joined by '|' ("xid|at|reason|caller|client"); r:<scope> = "<fingerprint>|<xid>|<at>|
<use>|<uses left>". The use number n is never granted again: seq, the last use number, is left as it is.

Reply {status, uses_left, reversal_id, at_ms, use_number, replayed, reason}; status REVERSED, ALREADY_REVERSED,
NOT_FOUND (no such use of this code with this redemption id, or another brand's), WINDOW_CLOSED (reason
REVERSAL_WINDOW_CLOSED or REVERSALS_NOT_ALLOWED) or IDEMPOTENCY_MISMATCH.
]]

local now, brand, rid, n = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local xid, reason, idem, fp, caller, client = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local DEFAULT_BRAND = '1'

local function split(value)
  local parts = {}
  for part in string.gmatch(value .. '|', '([^|]*)|') do parts[#parts + 1] = part end
  return parts
end

local function reply(status, left, id, at, replayed, why)
  return {status, left or 0, id or '', at or 0, tonumber(n), replayed or 0, why or status}
end

local meta = redis.call('HMGET', KEYS[1], 'brand', 'uses', 'rw')
if not meta[2] or (meta[1] or DEFAULT_BRAND) ~= brand then return reply('NOT_FOUND', 0, '', 0, 0, 'REDEMPTION_NOT_FOUND') end
local c = redis.call('HMGET', KEYS[4], 'uses', 'used', 'u:' .. n, 'x:' .. n, idem)
local uses = tonumber(c[1] or meta[2])

if c[5] then -- this scope's first answer
  local first = split(c[5])
  if first[1] ~= fp then return reply('IDEMPOTENCY_MISMATCH') end
  return reply('REVERSED', tonumber(first[5]), first[2], tonumber(first[3]), 1, 'REVERSED')
end
local use = c[3] and split(c[3])
if not use or use[1] ~= rid then return reply('NOT_FOUND', 0, '', 0, 0, 'REDEMPTION_NOT_FOUND') end
local left = uses - tonumber(c[2] or '0')
if c[4] then
  local earlier = split(c[4])
  return reply('ALREADY_REVERSED', left, earlier[1], tonumber(earlier[2]), 0, 'ALREADY_REVERSED')
end
local window = tonumber(meta[3] or '0')
if window <= 0 then return reply('WINDOW_CLOSED', left, '', 0, 0, 'REVERSALS_NOT_ALLOWED') end
if now - tonumber(use[2]) > window then return reply('WINDOW_CLOSED', left, '', 0, 0, 'REVERSAL_WINDOW_CLOSED') end

left = left + 1
local fv = tonumber(use[14] or '0')
redis.call('HSET', KEYS[4], 'used', tonumber(c[2]) - 1, 'x:' .. n, table.concat({xid, now, reason, caller, client}, '|'),
  idem, table.concat({fp, xid, now, n, left}, '|'))
redis.call('HINCRBY', KEYS[2], 'un', -1)
if fv > 0 then redis.call('HINCRBY', KEYS[2], 'uv', -fv) end
redis.call('HINCRBY', KEYS[2], 'rev', 1)
redis.call('XADD', KEYS[3], '*', 'x1', table.concat({xid, rid, ARGV[11], ARGV[12], ARGV[13], ARGV[14], n, now, fv,
  reason, caller, client, brand, idem, fp}, '|'))
return reply('REVERSED', left, xid, now, 0, 'REVERSED')
