"""The Lua scripts the Redis store runs: each one is one atomic round trip.

The write is a compare-and-swap, not a re-implementation of the write rule.
Python computes ``apply_write(stored, before, after)`` (store/base.py, the
specification every adapter shares) against the exact bytes it last saw,
and ``WRITE`` stores the result only if those bytes are still what Redis
holds; otherwise it answers with what is there now, and Python computes again
(usually it is ``before``, the record the caller has just read, so the common
write is one round trip). So clocks only move forward because the written
record *is* the forward merge of the stored one, and ``WRITE`` itself refuses
to touch a record that has ended, whatever it is asked.

Every script names all its keys in KEYS, and they share one hash tag (see
``redis_codec``): they run unchanged on a Cluster. The one exception is the
audit stream that ``CREATE`` and ``WRITE`` may be given last in KEYS, with the
change's events: it has no hash tag, so the store passes it only where all
keys are one server's (standalone, Sentinel; see ``RedisStore.write``).
"""

from __future__ import annotations

# A session's record and Redis's clock, in one round trip: {{seconds, microseconds}, record or nil}.
READ = """
return {redis.call('TIME'), redis.call('GET', KEYS[1])}
"""

_KEEP = """
-- The safety-net TTL: live records outlast their sweeper deadline by ARGV safety ms (no TTL at +inf).
local function keep(key, expires, safety)
  if expires == '+inf' then
    redis.call('PERSIST', key)
    return
  end
  local t = redis.call('TIME')
  local left = tonumber(expires) - (tonumber(t[1]) + tonumber(t[2]) / 1000000)
  if left < 0 then left = 0 end
  redis.call('PEXPIRE', key, math.floor(left * 1000) + tonumber(safety))
end
"""

# The change's audit events, appended before anything else is written: a stream that refuses them (wrong
# type, out of memory) stops the script with nothing written, and once they are in, the rest cannot fail.
_AUDIT = """
local function audit(first)
  for i = first + 1, #ARGV, 2 do
    redis.call('XADD', KEYS[#KEYS], 'MAXLEN', '~', ARGV[first], '*', 'ts', ARGV[i], 'e', ARGV[i + 1])
  end
end
"""

# KEYS: record, due index, ended index, write marker[, audit stream]. ARGV: record, member, ended ('1'/'0'), score,
# safety ms, ended keep ms, write id[, audit cap, then (ts, event JSON) per event]. Never an upsert: an existing
# record (an ended one included) is left alone and 0 returned, unless it is exactly these bytes and the marker
# holds this create's random id: then it is this very create, sent again after its reply was lost, and it
# answers 1 again, writing nothing.
CREATE = _KEEP + _AUDIT + """
local held = redis.call('GET', KEYS[1])
if held then
  if held == ARGV[1] and redis.call('GET', KEYS[4]) == ARGV[7] then return 1 end
  return 0
end
audit(8)
redis.call('SET', KEYS[4], ARGV[7], 'PX', 60000)
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
else
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
  keep(KEYS[1], ARGV[4], ARGV[5])
end
return 1
"""

# KEYS: record, due index, ended index, write marker[, audit stream].
# ARGV: expected record, new record, member, index change ('' | 'due' | 'end'), score, safety ms, ended keep ms,
# ended channel, write id[, audit cap, then (ts, event JSON) per event].
# {1}: written. {0, current record or nil}: not written (it changed, is gone, or has ended).
# An end also leaves its random write id in the write marker for a minute: the same end sent again after its
# reply was lost finds the record already ended with exactly its bytes and the marker holding its id, and
# answers {1} again, writing nothing (another writer's identical end, a sweeper's, carries another id).
WRITE = _KEEP + _AUDIT + """
local cur = redis.call('GET', KEYS[1])
if cur ~= ARGV[1] then
  if cur == ARGV[2] and ARGV[4] == 'end' and redis.call('GET', KEYS[4]) == ARGV[9] then return {1} end
  return {0, cur}
end
if math.floor(string.byte(cur, 2) / 2) % 2 == 1 then return {0, cur} end  -- ended: never touched again
audit(10)
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
local change = ARGV[4]
if change == 'end' then
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  redis.call('SET', KEYS[4], ARGV[9], 'PX', 60000)
  redis.call('PUBLISH', ARGV[8], ARGV[3])  -- every replica's connection monitors re-check it (store.watch)
elseif change == 'due' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[3])
  keep(KEYS[1], ARGV[5], ARGV[6])
end
return {1}
"""

# KEYS: login-attempt counter. ARGV: now, window seconds, add (an integer). The count in the current window
# after adding: a positive add opens a window if none is live; a negative one gives back, never below 0.
FAILURES = """
local now, window, add = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'start', 'count')
local start, count = tonumber(v[1]), tonumber(v[2]) or 0
if start == nil or now - start >= window then start, count = now, 0 end
if add > 0 then
  count = count + add
  redis.call('HSET', KEYS[1], 'start', string.format('%.17g', start), 'count', count)
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
elseif add < 0 and count > 0 then
  count = math.max(0, count + add)
  redis.call('HSET', KEYS[1], 'count', count)
end
return count
"""

# KEYS: the audit stream. ARGV: before (Unix seconds), batch size. Deletes the oldest entries whose ``ts`` is
# before the instant, stopping at the first newer one; returns {deleted, more to look at (1/0)}.
PURGE_AUDIT = """
local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', tonumber(ARGV[2]))
local before, ids = tonumber(ARGV[1]), {}
for _, entry in ipairs(entries) do
  local fields, ts = entry[2], nil
  for i = 1, #fields, 2 do
    if fields[i] == 'ts' then ts = tonumber(fields[i + 1]) end
  end
  if ts == nil or ts >= before then
    if #ids > 0 then redis.call('XDEL', KEYS[1], unpack(ids)) end
    return {#ids, 0}
  end
  ids[#ids + 1] = entry[1]
end
if #ids > 0 then redis.call('XDEL', KEYS[1], unpack(ids)) end
return {#ids, #entries == tonumber(ARGV[2]) and 1 or 0}
"""

# KEYS: the marker. ARGV: now, until (store clock, Unix seconds), safety TTL in ms. 1 the first time (the
# marker then holds ``until``), 0 while a marker with a later ``until`` than now is there.
FIRST_USE = """
local held = tonumber(redis.call('GET', KEYS[1]))
if held ~= nil and held > tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
return 1
"""
