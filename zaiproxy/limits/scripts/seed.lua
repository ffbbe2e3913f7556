-- The first proxy to join publishes what it knows (its restored or initial
-- state); later ones adopt what is there. KEYS: state hash. ARGV: field,
-- value pairs. Returns the state (flat hash).
if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('HSET', KEYS[1], unpack(ARGV))
end
return redis.call('HGETALL', KEYS[1])
