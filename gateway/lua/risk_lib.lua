--[[ risk_lib.lua - the risk engine's Redis part: included by redeem.lua (one script with the redemption, on a
single Redis) and risk.lua (its own call, under the brand's risk tag, when the counters live elsewhere - Redis
Cluster, or RGW_RISK_REDIS_URL). The plan's format and the reply are documented in redeem.lua's header.

Expects: mode, now, campaign, brand; ARGV in redeem.lua's item layout (a = the item's offset).
]]

local function split(value)
  local parts = {}
  for part in string.gmatch(value .. '|', '([^|]*)|') do parts[#parts + 1] = part end
  return parts
end

-- Risk --------------------------------------------------------------------------------------------------------
-- A risk check returns a finding {rule, reason, mode, scope, retry_ms, quota}; "E" findings deny, "S" findings
-- are recorded only. The first enforced finding wins; every shadow finding is kept.

local function record(plan, a, f)
  if not plan.e then return end
  local kind = (mode == 'redeem') and 'redeem' or 'validate'
  local m = (f[3] == 'E') and 'enforce' or 'shadow'
  redis.call('XADD', KEYS[plan.e], '*', 'r1', table.concat({now, brand, campaign, ARGV[a + 7], ARGV[a + 8],
    ARGV[a + 6], ARGV[a + 9], f[1], f[2], m, f[4] or '', ARGV[a + 10], ARGV[a + 11], ARGV[a + 12], kind}, '|'))
end

local function denied(f)
  local status = (f[6] == 1) and 'THROTTLED' or 'RISK_DENIED'
  return {status, 0, '', 0, 0, 0, f[1], f[2], f[4] or '', f[5] or 0, ''}
end

-- What one call already read, by key: the items of a batch mostly share their client, store and terminal, and "now"
-- is the same for all of them, so a shared window is trimmed and counted once and then followed in Lua, a lock's
-- time left read once, an expiry set once - instead of once per item.
local live = {}     -- window key -> members inside the window
local expiring = {} -- window key -> its expiry was looked after in this call
local locked = {}   -- lock key -> ms left (0: not locked)

local function lock_left(key)
  local left = locked[key]
  if left == nil then
    left = math.max(redis.call('PTTL', key), 0)
    locked[key] = left
  end
  return left
end

local function check_lockouts(plan, findings)
  for _, l in ipairs(plan.l or {}) do
    local left = lock_left(KEYS[l[1]])
    if left > 0 then findings[#findings + 1] = {'lockout', 'LOCKED_OUT', l[6], l[7], left, 0} end
  end
end

local function window_size(key, window_ms)
  local n = live[key]
  if n == nil then
    n = redis.call('ZCOUNT', key, '(' .. (now - window_ms), '+inf') -- a read: nothing for the AOF
    live[key] = n
  end
  return n
end

-- Sliding window log: exact - at most `limit` counted attempts in any window of `window_ms` (fixed windows let a
-- double burst through at their boundary).
local function check_windows(plan, findings)
  for _, w in ipairs(plan.w or {}) do
    local key = KEYS[w[1]]
    local n = window_size(key, w[3])
    if n >= w[2] then
      -- admitted again once n - limit + 1 of the n in the window have left: when the limit-th newest expires
      local oldest = redis.call('ZRANGE', key, -w[2], -w[2], 'WITHSCORES')
      local retry = math.max(tonumber(oldest[2]) + w[3] - now, 1)
      findings[#findings + 1] = {w[5], w[6], w[4], w[8], retry, w[7]}
    end
  end
end

local function distance_m(lat1, lon1, lat2, lon2)
  local r = math.pi / 180
  local dlat, dlon = (lat2 - lat1) * r, (lon2 - lon1) * r
  local h = math.sin(dlat / 2) ^ 2 + math.cos(lat1 * r) * math.cos(lat2 * r) * math.sin(dlon / 2) ^ 2
  return 2 * 6371008.8 * math.asin(math.min(1, math.sqrt(h)))
end

local function check_travel(plan, a, findings)
  local t = plan.t
  if not t or ARGV[a + 10] == '' then return end
  local last = redis.call('GET', KEYS[t[1]])
  if not last then return end
  local p = split(last)
  local metres = distance_m(tonumber(p[1]), tonumber(p[2]), tonumber(ARGV[a + 10]), tonumber(ARGV[a + 11]))
  local seconds = math.max(now - tonumber(p[3]), 1) / 1000
  if metres / seconds > t[2] then findings[#findings + 1] = {'impossible_travel', 'IMPOSSIBLE_TRAVEL', t[4], '', 0, 0} end
end

-- Every check of the attempt, before anything is counted. Returns the enforced denial (or nil) and the shadow hits.
local function assess(plan, a)
  local findings = {}
  check_lockouts(plan, findings)
  check_windows(plan, findings)
  check_travel(plan, a, findings)
  local denial, hits = nil, {}
  for _, f in ipairs(findings) do
    if f[3] == 'E' and not denial then denial = f elseif f[3] ~= 'E' then hits[#hits + 1] = f end
  end
  return denial, hits
end

-- Counting is one ZADD per window. Expired members are trimmed only once the oldest is two windows old, and the
-- key's life extended to two windows only when less than one is left - each about once a window, not on every
-- attempt: every write of a script goes to the AOF (fsynced on every write with appendfsync always), and those
-- were most of the limiter's writes. A key never expires while a member inside its window exists, and holds at
-- most two windows' attempts.
local function look_after(key, window_ms)
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if oldest[2] and tonumber(oldest[2]) <= now - 2 * window_ms then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window_ms)
  end
  if redis.call('PTTL', key) < window_ms then redis.call('PEXPIRE', key, 2 * window_ms) end
end

local function count_attempt(plan, rid)
  if mode ~= 'redeem' then return end -- Validate counts nothing
  for _, w in ipairs(plan.w or {}) do
    local key = KEYS[w[1]]
    live[key] = window_size(key, w[3]) + redis.call('ZADD', key, now, rid)
    if not expiring[key] then
      expiring[key] = true
      look_after(key, w[3])
    end
  end
end

-- A failed attempt (an unknown code, another brand's) counts towards every lockout scope, Validate included: a
-- lookup that says "no such code" is a guess answered, whichever RPC asked it (OWASP OAT-002).
local function count_failure(plan, a, hits)
  for _, l in ipairs(plan.l or {}) do
    local key = KEYS[l[2]]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - l[4])
    redis.call('ZADD', key, now, ARGV[a + 4])
    redis.call('PEXPIRE', key, l[4])
    if redis.call('ZCARD', key) >= l[3] then
      local f = {'lockout', 'LOCKED_OUT', l[6], l[7], l[5], 0}
      if l[6] == 'E' then
        redis.call('SET', KEYS[l[1]], now, 'PX', l[5])
        locked[KEYS[l[1]]] = l[5]
        redis.call('DEL', key)
      end
      hits[#hits + 1] = f
    end
  end
end

local function after_redemption(plan, a)
  local t = plan.t
  if t and ARGV[a + 10] ~= '' then
    redis.call('SET', KEYS[t[1]], ARGV[a + 10] .. '|' .. ARGV[a + 11] .. '|' .. now, 'PX', t[3])
  end
end

-- Code <-> device: a bound code answers only its device; uses per device per campaign shard are capped.
local function shadow_text(hits)
  local parts = {}
  for _, f in ipairs(hits) do
    if f[3] ~= 'E' then parts[#parts + 1] = f[1] .. ':' .. f[2] end
  end
  return table.concat(parts, ',')
end

local function finish(plan, a, reply, hits)
  for _, f in ipairs(hits) do record(plan, a, f) end
  reply[11] = shadow_text(hits)
  return reply
end

-- The verdict of everything decided before the code is looked at: an in-process denial (x), or the locks,
-- windows and travel; a denial is recorded and returned as the item's reply. Also the shadow hits so far.
local function verdict(plan, a)
  local hits = {}
  for _, s in ipairs(plan.s or {}) do hits[#hits + 1] = {s[1], s[2], 'S', s[3], 0, 0} end
  local denial = nil
  if plan.x then
    denial = {plan.x[1], plan.x[2], 'E', plan.x[3], 0, 0}
  else
    local found
    denial, found = assess(plan, a)
    for _, f in ipairs(found) do hits[#hits + 1] = f end
  end
  if not denial then return nil, hits end
  record(plan, a, denial)
  return finish(plan, a, denied(denial), hits), hits
end
