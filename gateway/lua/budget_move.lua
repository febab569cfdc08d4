--[[ budget_move.lua - one step of a budget transfer between the shards of a campaign (gateway/campaigns/budget.py).

A campaign's budget - a count n and a face value v - is split into shares, one per shard; the redeem script
grants from a shard only while what it granted (un, uv) is below its share. A transfer moves unused share from one
shard to another in three steps, each one call of this script on ONE shard (one hash tag: KEYS[1] only):

  take  on the donor:     lowers its share by at most what it has not granted, and records the transfer in
                          flight as o:<id> = "<count>|<value>|<to shard>" - in the same atomic step, so the sum of
                          the shares plus the transfers in flight never changes and never exceeds the budget
  give  on the receiver:  raises its share, once per id (i:<id> is kept: a retried give is never received twice)
  done  on the donor:     forgets o:<id>

A crash leaves o:<id> records; the next rebalance completes them (give, then done). A take to shard -1 lowers the
budget: nothing receives it. `cap` puts a limit on a shard that had none (a budget added to a live campaign): the
share becomes exactly what the shard already granted, so it grants nothing more until it is given a share.

KEYS[1]  rgw:{c.s}:budget   the shard's budget hash (gateway/campaigns/layout.py BUDGET)
ARGV[1]  "take" | "give" | "done" | "cap"
take     ARGV[2] id (uuid4 hex)   ARGV[3] count asked   ARGV[4] value asked   ARGV[5] receiving shard (-1: none)
         Reply {count taken, value taken}: each the least of what was asked and the unused share (n - un,
         v - uv; 0 where the shard has no such share). Nothing taken: no record. A take of an id already in
         flight changes nothing and replies what it took.
give     ARGV[2] id   ARGV[3] count   ARGV[4] value
         Reply 1: n += count, v += value (a zero amount leaves its field alone), i:<id> = "1"; 0: already received.
done     ARGV[2] id.   Reply 1 the record was removed, 0 there was none.
cap      ARGV[2] "n" or "v".   Reply the share after the call (set to un or uv if the shard had none).
]]

local key = KEYS[1]
local op = ARGV[1]

-- Redis' Lua turns a number given to redis.call into text with "%.14g" (1e15 would be "1e+15"): write integers
-- out explicitly.
local function int(x)
  return string.format('%d', x)
end

local function unused(share, granted)
  if not share then return 0 end
  local left = tonumber(share) - tonumber(granted or '0')
  if left < 0 then return 0 end
  return left
end

local function asked(text)
  local n = tonumber(text) or 0
  if n < 0 then return 0 end
  return n
end

if op == 'take' then
  local field = 'o:' .. ARGV[2]
  local record = redis.call('HGET', key, field)
  if record then
    local count, value = string.match(record, '^(%d+)|(%d+)|')
    return {tonumber(count), tonumber(value)}
  end
  local f = redis.call('HMGET', key, 'n', 'un', 'v', 'uv')
  local count = math.min(asked(ARGV[3]), unused(f[1], f[2]))
  local value = math.min(asked(ARGV[4]), unused(f[3], f[4]))
  if count == 0 and value == 0 then return {0, 0} end
  if count > 0 then redis.call('HINCRBY', key, 'n', int(-count)) end
  if value > 0 then redis.call('HINCRBY', key, 'v', int(-value)) end
  redis.call('HSET', key, field, int(count) .. '|' .. int(value) .. '|' .. ARGV[5])
  return {count, value}
end

if op == 'give' then
  if redis.call('HSETNX', key, 'i:' .. ARGV[2], '1') == 0 then return 0 end
  local count, value = asked(ARGV[3]), asked(ARGV[4])
  if count > 0 then redis.call('HINCRBY', key, 'n', int(count)) end
  if value > 0 then redis.call('HINCRBY', key, 'v', int(value)) end
  return 1
end

if op == 'done' then
  return redis.call('HDEL', key, 'o:' .. ARGV[2])
end

if op == 'cap' then
  local share = ARGV[2]
  if share ~= 'n' and share ~= 'v' then return redis.error_reply('budget_move: cap takes n or v') end
  local granted = share == 'n' and 'un' or 'uv'
  local current = redis.call('HGET', key, share)
  if current then return tonumber(current) end
  local used = tonumber(redis.call('HGET', key, granted) or '0')
  if used < 0 then used = 0 end
  redis.call('HSET', key, share, int(used))
  return used
end

return redis.error_reply('budget_move: unknown operation ' .. tostring(op))
