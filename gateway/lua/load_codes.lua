-- Loads issued codes (or directory entries) into bucket hashes: gateway/campaigns/loader.py.
-- All keys of one call share one hash tag (a campaign shard's, or a brand directory's): one atomic step, so the
-- issued counter never disagrees with the bucket fields, even when the loader is killed half way.
--
-- KEYS[1]               the hash holding the counter (the shard's budget hash); any key of the call when none
-- KEYS[2 .. o+1]        own state hashes of codes whose rules differ from the campaign's (rgw:{c.s}:code:<ref>)
-- KEYS[o+2 .. #KEYS]    bucket hashes (rgw:{c.s}:b:<bucket>, or a brand directory's rgw:{d<brand>}:dir:<bucket>)
-- ARGV[1]               the counter's field ("iss"), or "" for none
-- ARGV[2]               o, the number of own state hashes
-- ARGV[3 .. #KEYS+1]    one per key after KEYS[1], in order: "field=value,field=value,..." (fields and values
--                       never contain "=" or ",": hex, decimal numbers, device ids, "<campaign>.<shard>"), or,
--                       for a bucket, "*<value>*<field><field>...": fields of FIELD hex characters sharing a value
--
-- Every field is set only where absent (HSETNX, for many fields at once). The counter grows by the number of
-- bucket fields actually added, so loading a code twice counts it once. Reply: the number of bucket fields added.

local FIELD = 20 -- a bucket field: keys.REF_CHARS - keys.BUCKET_CHARS hex characters of the code_ref
local counter = ARGV[1]
local owned = tonumber(ARGV[2])

local function pairs_of(spec)
    local fields, values = {}, {}
    if string.sub(spec, 1, 1) == '*' then
        local stop = string.find(spec, '*', 2, true)
        local value = string.sub(spec, 2, stop - 1)
        for at = stop + 1, #spec, FIELD do
            fields[#fields + 1] = string.sub(spec, at, at + FIELD - 1)
            values[#values + 1] = value
        end
        return fields, values
    end
    for field, value in string.gmatch(spec, '([^=,]+)=([^,]*)') do
        fields[#fields + 1] = field
        values[#values + 1] = value
    end
    return fields, values
end

-- Sets the fields `key` does not have yet (a reload never changes a code's overrides, nor what a redemption
-- recorded, such as a device bound at first presentation, nor a bucket field); the number it set.
local function set_absent(key, spec)
    local fields, values = pairs_of(spec)
    local present = redis.call('HMGET', key, unpack(fields))
    local absent, seen = {}, {}
    for i = 1, #fields do
        if not present[i] and not seen[fields[i]] then
            seen[fields[i]] = true
            absent[#absent + 1] = fields[i]
            absent[#absent + 1] = values[i]
        end
    end
    if #absent > 0 then
        redis.call('HSET', key, unpack(absent))
    end
    return #absent / 2
end

for i = 2, owned + 1 do
    set_absent(KEYS[i], ARGV[i + 1])
end
local added = 0
for i = owned + 2, #KEYS do
    added = added + set_absent(KEYS[i], ARGV[i + 1])
end
if counter ~= '' and added > 0 then
    redis.call('HINCRBY', KEYS[1], counter, added)
end
return added
