--[[ hours_lib.lua - redemption hours: included by redeem.lua. gateway/campaigns/schedule.py writes both strings
at publish time and holds the Python reference of this check (in_hours); tests/integration/test_hours_lua.py holds
the two against each other.

  tz   the campaign time zone's UTC offsets, "<from ms>:<offset s>,..." ascending (schedule.offset_table): Redis'
       Lua has no time zone data, so the publisher precomputes every change of the offset over the validity
  win  the windows, "<ISO weekday mask>:<start minute>:<end minute>,..." in local wall-clock minutes (bit d-1 of
       the mask = ISO weekday d); end <= start runs across midnight into the next day

Defines outside_hours(tz, win, now) only; reads and writes no keys.
]]

-- The offset of the last entry at or before now; an instant before the first entry takes the first one's (the
-- table starts two days before the validity, so that is only a clock far off).
local function hours_offset_ms(tz, now)
  local offset
  for from, seconds in string.gmatch(tz or '', '(%-?%d+):(%-?%d+)') do
    if offset and tonumber(from) > now then break end
    offset = tonumber(seconds)
  end
  return (offset or 0) * 1000
end

-- Lua 5.1 has no bit operators.
local function hours_on_day(mask, weekday)
  return math.floor(mask / 2 ^ (weekday - 1)) % 2 == 1
end

-- true when now (ms) is in none of the windows; no windows (nil, false from HMGET, "") means any time.
local function outside_hours(tz, win, now)
  if not win or win == '' then return false end
  local here = now + hours_offset_ms(tz, now)
  local day = math.floor(here / 86400000)
  local minute = math.floor((here - day * 86400000) / 60000)
  local weekday = (day + 3) % 7 + 1 -- 1970-01-01 was a Thursday
  local yesterday = (weekday + 5) % 7 + 1
  for mask, first, stop in string.gmatch(win, '(%d+):(%d+):(%d+)') do
    mask, first, stop = tonumber(mask), tonumber(first), tonumber(stop)
    if first < stop then
      if hours_on_day(mask, weekday) and minute >= first and minute < stop then return false end
    elseif (hours_on_day(mask, weekday) and minute >= first) or (hours_on_day(mask, yesterday) and minute < stop) then
      return false -- across midnight: the evening of a listed day, or the morning after it
    end
  end
  return true
end
