--[[ failures.lua - count one failed attempt that never reached the redeem script (a code with the right shape
but a wrong check character: a guess) against every lockout scope of the caller, atomically, exactly as
redeem.lua counts an unknown code. All keys are in the brand's risk tag {r<brand>} (risk/keys.py).

KEYS[1]            the brand's risk-event stream
KEYS[2k], KEYS[2k+1]  lockout k: its lock key and its failures key
ARGV[1] now (ms)   ARGV[2] member (a unique id for this attempt)
ARGV[3 .. 12]      event fields: brand, campaign (0), store, term, client, dev, lat, lon, acc, kind
ARGV[13 ..]        per lockout, 5 fields: threshold, window_ms, cooldown_ms, mode ("E" or "S"), scope label

Reply: the number of scopes this failure locked (enforced) and the number of shadow lockouts.
]]

local now, member = tonumber(ARGV[1]), ARGV[2]
local locked, shadow = 0, 0
for k = 0, (#KEYS - 1) / 2 - 1 do
  local a = 13 + k * 5
  local lock, fails = KEYS[2 + 2 * k], KEYS[3 + 2 * k]
  local threshold, window, cooldown = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local mode, scope = ARGV[a + 3], ARGV[a + 4]
  if redis.call('EXISTS', lock) == 0 then
    redis.call('ZREMRANGEBYSCORE', fails, '-inf', now - window)
    redis.call('ZADD', fails, now, member)
    redis.call('PEXPIRE', fails, window)
    if redis.call('ZCARD', fails) >= threshold then
      local m = 'shadow'
      if mode == 'E' then
        redis.call('SET', lock, now, 'PX', cooldown)
        redis.call('DEL', fails)
        m, locked = 'enforce', locked + 1
      else
        shadow = shadow + 1
      end
      redis.call('XADD', KEYS[1], '*', 'r1', table.concat({now, ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8],
        'lockout', 'LOCKED_OUT', m, scope, ARGV[9], ARGV[10], ARGV[11], ARGV[12]}, '|'))
    end
  end
end
return {locked, shadow}
