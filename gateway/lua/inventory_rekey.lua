-- Swaps the ciphertext of secrets after `rgw keys rotate` re-encrypted them in Postgres: gateway/inventory/loader.py.
--
-- KEYS[1]   a SKU shard's secrets hash (rgw:{k<sku>.<shard>}:sec): id -> SECRET_RECORD joined by '|'
--           (supplier|cost|currency|expiry_ms|left|used|key_id|nonce_b64|ct_b64)
-- ARGV      six per secret: id, the key id and nonce (base64) it had, the new key id, nonce and ciphertext
--
-- Compare and set: only a record still present and still sealed as expected changes, and only its last three
-- fields - what a dispense or a hold changed meanwhile (left, used) stays as it is. Reply: records changed.

local function split(record)
    local fields, start = {}, 1
    while true do
        local stop = string.find(record, '|', start, true)
        if not stop then
            fields[#fields + 1] = string.sub(record, start)
            return fields
        end
        fields[#fields + 1] = string.sub(record, start, stop - 1)
        start = stop + 1
    end
end

local sec = KEYS[1]
local changed = 0
for i = 1, #ARGV, 6 do
    local record = redis.call('HGET', sec, ARGV[i])
    if record then
        local fields = split(record)
        if #fields == 9 and fields[7] == ARGV[i + 1] and fields[8] == ARGV[i + 2] then
            fields[7], fields[8], fields[9] = ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
            redis.call('HSET', sec, ARGV[i], table.concat(fields, '|'))
            changed = changed + 1
        end
    end
end
return changed
