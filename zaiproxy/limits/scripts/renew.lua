-- Extend this proxy's leases (those it still holds) by ARGV[1] seconds
-- from now on Redis's clock. KEYS: leases. ARGV: seconds, lease ids...
-- Returns how many were still there (a lease that expired meanwhile is
-- not revived: its slot may already be someone else's).
local t = redis.call('TIME')
local expiry = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
    renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', expiry, ARGV[i])
end
return renewed
