-- Admit up to ARGV[1] calls for one proxy: each needs a token from the
-- shared bucket (GCRA on Redis's clock, so no proxy's clock matters) and a
-- concurrency slot (a lease that expires unless renewed, so a proxy that
-- dies gives its slots back). A quota hold answers first: nobody calls.
--
-- KEYS: state hash, bucket (the theoretical arrival time), leases (zset
--       lease -> expiry), quota hold.
-- ARGV: wanted, lease id prefix, first lease number, lease seconds,
--       rate and limit to use before any proxy published them, then the
--       leases this proxy gives back (slots its calls freed).
-- Returns {granted, seconds until the next token (string), quota or false,
--          slots taken, slots limit}; granted leases are prefix..number,
--          number counting up from ARGV[3].
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local quota = redis.call('GET', KEYS[4])
if quota then
    for i = 7, #ARGV do
        redis.call('ZREM', KEYS[3], ARGV[i])
    end
    return {0, '0', quota, 0, 0}
end
local rate = tonumber(redis.call('HGET', KEYS[1], 'rate')) or tonumber(ARGV[5])
local limit = tonumber(redis.call('HGET', KEYS[1], 'limit')) or tonumber(ARGV[6])
for i = 7, #ARGV do
    redis.call('ZREM', KEYS[3], ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local taken = redis.call('ZCARD', KEYS[3])
local wanted = math.min(tonumber(ARGV[1]), limit - taken)
if wanted <= 0 then
    return {0, '-1', false, taken, limit}
end
-- GCRA: one call per interval; up to `tolerance` seconds of calls may go
-- early (a tenth of a second's worth: Z.AI counts per second, so bursts
-- are kept small).
local interval = 1 / rate
local tolerance = math.max(interval, 0.1)
local tat = tonumber(redis.call('GET', KEYS[2])) or now
if tat < now then
    tat = now
end
local granted = 0
if tat - now <= tolerance then
    -- (A millionth of a token for float error: the times are ~1.7e9 s.)
    granted = math.min(wanted, math.floor((now + tolerance - tat) / interval + 0.000001) + 1)
end
tat = tat + granted * interval
if granted > 0 then
    redis.call('SET', KEYS[2], string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
    local expiry = now + tonumber(ARGV[4])
    local first = tonumber(ARGV[3])
    for i = 0, granted - 1 do
        redis.call('ZADD', KEYS[3], expiry, ARGV[2] .. (first + i))
    end
end
local wait = math.max(0, tat - tolerance - now)
return {granted, string.format('%.6f', wait), false, taken + granted, limit}
