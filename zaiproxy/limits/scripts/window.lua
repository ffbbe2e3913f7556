-- Once a window per proxy: add this proxy's outcomes to the shared window
-- (numbered on Redis's clock), say it is alive, and claim the judging of
-- the previous window: exactly one proxy (SET NX) gets its totals.
--
-- KEYS: state hash, instances (zset name -> last seen), quota hold.
-- ARGV: key prefix, window seconds, instance name, successes, frequency
--       429s, concurrency 429s, calls in flight at the first 1302 (-1:
--       none), rate waits, slot waits, accepted calls per second.
-- Returns {previous window's totals (flat hash) or false, state (flat
--          hash), instances alive, Redis's time (string), whether a quota
--          hold is in force}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local span = tonumber(ARGV[2])
local index = math.floor(now / span)
local prefix = ARGV[1]
local window = prefix .. ':window:' .. index
local keep = math.ceil(span * 10)
redis.call('HINCRBY', window, 'successes', ARGV[4])
redis.call('HINCRBY', window, 'frequency', ARGV[5])
redis.call('HINCRBY', window, 'concurrency', ARGV[6])
redis.call('HINCRBY', window, 'rate_waits', ARGV[8])
redis.call('HINCRBY', window, 'slot_waits', ARGV[9])
redis.call('HINCRBYFLOAT', window, 'accepted', ARGV[10])
redis.call('HINCRBY', window, 'reporters', 1)
local at = tonumber(ARGV[7])
if at >= 0 then
    local seen = tonumber(redis.call('HGET', window, 'concurrency_at'))
    if not seen or at < seen then
        redis.call('HSET', window, 'concurrency_at', at)
    end
end
redis.call('EXPIRE', window, keep)
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 3 * span)
redis.call('EXPIRE', KEYS[2], keep)
local alive = redis.call('ZCARD', KEYS[2])
local totals = false
if redis.call('SET', prefix .. ':judged:' .. (index - 1), ARGV[3], 'NX', 'EX', keep) then
    totals = redis.call('HGETALL', prefix .. ':window:' .. (index - 1))
end
local held = redis.call('EXISTS', KEYS[3])
return {totals, redis.call('HGETALL', KEYS[1]), alive, string.format('%.6f', now), held}
