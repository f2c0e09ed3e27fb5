"""The Redis store: wallets shared by any number of processes, and the reader that feeds each process's hub.

Every write is ONE Lua script (one round trip, atomic on the server): its idempotency check, the balance,
the ledger, the leaderboard, the global event `seq` and the XADD of each event to the stream
`{prefix}events` under entry id `{seq}-0`. Processes never publish events themselves: each one runs a
RedisEventReader that tails the stream and feeds its local EventHub, so every process delivers the one
global order.

Lua in Redis has only doubles (exact up to 2^53). So the scripts never do arithmetic on money: they call
INCRBY/DECRBY/HINCRBY (exact 64-bit, refusing overflow with an error caught by redis.pcall), compare
amounts as decimal strings, read results back with GET (integer replies become doubles in Lua) and build
JSON by concatenating those strings (cjson would print doubles). The leaderboard is a sorted set whose
members all score 0 and sort by bytes: a 20-character code of the exact net winnings (descending),
then ":" and the user id (ascending on ties), so 2^63-1 ranks above 2^63-2, which double scores tie.

Keys, under the prefix: `bal:{user}` (string), `ledger:{user}` (list, newest first), `net` (hash of
exact net winnings), `board` (the ranked set), `seq`, `txid`, `outid` (counters), `events` (stream; entry
id `{seq}-0`, fields k = kind, d = data JSON, e = epoch, u = user id when the event has one),
`epoch` (names the event history), `idem:{key}` (hash: fingerprint, outcome, body; expires after the
TTL) and `idem` (sorted set of keys by expiry, for the cap). A single Redis (or a primary with
replicas), not Redis Cluster: a script touches keys it computes.
"""

import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from events import HISTORY  # events kept in the stream (MAXLEN ~ keeps at least this many) and preloaded
from validation import INT64_MAX
from wallet_store import (
    BalanceLimitExceeded,
    Idempotency,
    IdempotencyKeyReused,
    InsufficientFunds,
    Result,
    StoreUnavailable,
    WalletError,
)

log = logging.getLogger("wallet.store")
reader_log = logging.getLogger("wallet.redis")

UNREACHABLE = "the wallet store (Redis) cannot be reached"
# A request must get its 503 within 3 s when Redis is gone: one connect attempt (1 s) plus one reply
# wait (1.5 s), and no retries (a retried write script whose reply was lost could apply twice).
CONNECT_TIMEOUT = 1.0
SOCKET_TIMEOUT = 1.5
# A write the script starts later than this after it was sent is refused (the reply would come after
# SOCKET_TIMEOUT, answered 503): the margin covers the script's run, the reply's trip and clock drift
# between two skew measurements.
WRITE_DEADLINE = SOCKET_TIMEOUT - 0.5
SKEW_REFRESH = 30.0  # seconds between measurements of Redis's clock against ours
# After reading some events the reader lets more gather this long before its next XREAD. One XREAD costs
# the process ~80 us of CPU whatever it returns (~4 us more per event): under load it came back with
# fewer than 2 events, and that was most of what separated a deposit from /healthz on Redis (issue 15).
# A live event waits at most this much longer (the first one after a quiet spell not at all).
READ_GATHER = 0.005
_READ_COUNT = 1000  # entries per XREAD; a read that comes back full means more are waiting: no gathering then
BOARD_SIZE = 10
# A full Redis (OOM under noeviction) or a read-only replica cannot apply writes either: 503, not 500.
_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError,
         redis.exceptions.OutOfMemoryError, OSError)
_NINES = str.maketrans("0123456789", "9876543210")

_SCRIPT = r"""
local P, TOKEN, IK, FP = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local TTL_MS, CAP, LEDGER, MAXLEN = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local OP, UID = ARGV[9], ARGV[10]
local JUID = cjson.encode(UID)
local BK, NETK, BOARDK = P .. 'bal:' .. UID, P .. 'net', P .. 'board'

local t = redis.call('TIME')
local SEC, USEC = tonumber(t[1]), tonumber(t[2])
local NOW_US = SEC * 1000000 + USEC  -- < 2^53: exact
-- The caller has answered 503 by this time (Redis was stalled and the request waited in its socket):
-- applying it now would move money after "nothing was applied".
if NOW_US > tonumber(ARGV[#ARGV]) then return {'late', '', 0, 0} end

local function rfc3339()
  -- days since 1970-01-01 to a civil date (H. Hinnant's algorithm); os.date is not available here
  local days = math.floor(SEC / 86400)
  local rem = SEC - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%06dZ', y, m, d,
    math.floor(rem / 3600), math.floor(rem % 3600 / 60), rem % 60, USEC)
end
local TS = rfc3339()

-- a > b for non-negative decimal strings without leading zeros (byte-wise: no doubles, no locale)
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return false
end

local function overflowed(reply)
  if type(reply) == 'table' and reply.err then
    if string.find(reply.err, 'overflow', 1, true) then return true end
    error(reply)  -- the error table keeps its code (OOM, READONLY...) for the client
  end
  return false
end

local function nines(s) return (string.gsub(s, '%d', function(c) return string.char(105 - string.byte(c)) end)) end

-- 20 characters that sort (as bytes) by net winnings descending
local function board_code(net)
  if string.sub(net, 1, 1) == '-' then
    local a = string.sub(net, 2)
    return '1' .. string.rep('0', 19 - #a) .. a
  end
  return '0' .. nines(string.rep('0', 19 - #net) .. net)
end

local function board_net(member)
  local digits = string.sub(member, 2, 20)
  if string.sub(member, 1, 1) == '1' then return '-' .. string.match(digits, '^0*(%d+)$') end
  return string.match(nines(digits), '^0*(%d+)$')
end

local function board_json(members)
  local rows = {}
  for i, m in ipairs(members) do
    rows[i] = '{"rank":' .. i .. ',"user_id":' .. cjson.encode(string.sub(m, 22)) ..
      ',"net_winnings":' .. board_net(m) .. '}'
  end
  return '{"leaderboard":[' .. table.concat(rows, ',') .. ']}'
end

local EPOCH = nil
local function emit(kind, data, uid)
  local seq = redis.call('INCR', P .. 'seq')
  if seq == 1 then
    -- a new history (first write ever, or Redis lost its data): name it, unless a reader already did
    redis.call('SET', P .. 'epoch', string.format('%d%06d-%s', SEC, USEC, TOKEN), 'NX')
  end
  -- each entry names its history, so a reader sees a flush in the entries themselves
  EPOCH = EPOCH or redis.call('GET', P .. 'epoch') or ''
  local id = string.format('%d-0', seq)
  if uid then
    redis.call('XADD', P .. 'events', 'MAXLEN', '~', MAXLEN, id, 'k', kind, 'd', data, 'e', EPOCH, 'u', uid)
  else
    redis.call('XADD', P .. 'events', 'MAXLEN', '~', MAXLEN, id, 'k', kind, 'd', data, 'e', EPOCH)
  end
end

local function entry(kind, amount, balance)
  local tid = string.format('tx_%d', redis.call('INCR', P .. 'txid'))
  local lk = P .. 'ledger:' .. UID
  redis.call('LPUSH', lk, '{"transaction_id":"' .. tid .. '","type":"' .. kind .. '","amount":' .. amount ..
    ',"balance":' .. balance .. ',"created_at":"' .. TS .. '"}')
  redis.call('LTRIM', lk, 0, LEDGER - 1)
  emit('balance', '{"user_id":' .. JUID .. ',"balance":' .. balance .. ',"transaction_id":"' .. tid ..
    '","type":"' .. kind .. '","amount":' .. amount .. ',"timestamp":"' .. TS .. '"}', UID)
  return tid
end

local function money_body(balance, tid)
  return '{"user_id":' .. JUID .. ',"balance":' .. balance .. ',"transaction_id":"' .. tid .. '"}'
end

local function deposit(amount)
  if overflowed(redis.pcall('INCRBY', BK, amount)) then return 'err', 'balance_limit_exceeded:balance' end
  local balance = redis.call('GET', BK)
  return 'ok', money_body(balance, entry('deposit', amount, balance))
end

local function withdraw(amount)
  local current = redis.call('GET', BK) or '0'
  if greater(amount, current) then return 'err', 'insufficient_funds:' .. current end
  redis.call('DECRBY', BK, amount)
  local balance = redis.call('GET', BK)
  return 'ok', money_body(balance, entry('withdraw', amount, balance))
end

local function settle(game, bet, payout, net)
  local current = redis.call('GET', BK) or '0'
  if greater(bet, current) then return 'err', 'insufficient_funds:' .. current end
  -- apply, then undo on overflow: the script is atomic, nobody sees the intermediate state
  redis.call('DECRBY', BK, bet)
  local after_bet = redis.call('GET', BK)
  if overflowed(redis.pcall('INCRBY', BK, payout)) then
    redis.call('INCRBY', BK, bet)
    return 'err', 'balance_limit_exceeded:balance'
  end
  local old_net = redis.call('HGET', NETK, UID)
  if overflowed(redis.pcall('HINCRBY', NETK, UID, net)) then
    redis.call('DECRBY', BK, payout)
    redis.call('INCRBY', BK, bet)
    return 'err', 'balance_limit_exceeded:net'
  end
  local balance = redis.call('GET', BK)
  if bet ~= '0' then entry('bet', bet, after_bet) end
  if payout ~= '0' then entry('win', payout, balance) end
  local body = '{"outcome_id":"' .. string.format('out_%d', redis.call('INCR', P .. 'outid')) ..
    '","user_id":' .. JUID .. ',"game":' .. cjson.encode(game) .. ',"bet":' .. bet .. ',"payout":' .. payout ..
    ',"net":' .. net .. ',"balance":' .. balance .. '}'
  emit('game_outcome', string.sub(body, 1, -2) .. ',"timestamp":"' .. TS .. '"}', UID)
  local new_net = redis.call('HGET', NETK, UID)
  if new_net ~= old_net then
    local before = redis.call('ZRANGE', BOARDK, 0, 9)
    if old_net then redis.call('ZREM', BOARDK, board_code(old_net) .. ':' .. UID) end
    redis.call('ZADD', BOARDK, 0, board_code(new_net) .. ':' .. UID)
    local after = redis.call('ZRANGE', BOARDK, 0, 9)
    local changed = #before ~= #after
    for i = 1, #after do changed = changed or before[i] ~= after[i] end
    if changed then emit('leaderboard', board_json(after)) end
  end
  return 'ok', body
end

-- idempotency: a remembered outcome under the key is replayed; another fingerprint is refused
local IDK = P .. 'idem:' .. IK
if IK ~= '' then
  local rec = redis.call('HMGET', IDK, 'f', 's', 'b')
  if rec[1] then
    if rec[1] ~= FP then return {'reused', '', 0, 0} end
    return {'replay_' .. rec[2], rec[3], 0, 0}
  end
end

local status, payload
if OP == 'deposit' then status, payload = deposit(ARGV[11])
elseif OP == 'withdraw' then status, payload = withdraw(ARGV[11])
else status, payload = settle(ARGV[11], ARGV[12], ARGV[13], ARGV[14]) end

local evicted, earliest_ms = 0, 0
if IK ~= '' then
  redis.call('HSET', IDK, 'f', FP, 's', status, 'b', payload)
  redis.call('PEXPIRE', IDK, TTL_MS)
  -- the index orders keys by expiry; expired ones are gone from Redis already
  local index = P .. 'idem'
  local now_ms = math.floor(NOW_US / 1000)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now_ms)
  redis.call('ZADD', index, now_ms + TTL_MS, IK)
  local over = redis.call('ZCARD', index) - CAP
  if over > 0 then
    local gone = redis.call('ZPOPMIN', index, over)
    for i = 1, #gone, 2 do
      redis.call('DEL', P .. 'idem:' .. gone[i])
      evicted = evicted + 1
      if i == 1 then earliest_ms = tonumber(gone[2]) - now_ms end
    end
  end
end
return {status, payload, evicted, earliest_ms}
"""


class RedisStartupError(Exception):
    """Redis could not be reached (or the URL is unusable) at start-up; the message never holds a password."""


def _refusal(payload: str) -> WalletError:
    code, _, detail = payload.partition(":")
    if code == "insufficient_funds":
        return InsufficientFunds(int(detail))
    if code == "balance_limit_exceeded":
        return BalanceLimitExceeded("the net winnings" if detail == "net" else "the balance")
    raise RuntimeError(f"unknown refusal from the Redis script: {payload!r}")


def _board_row(rank: int, member: bytes) -> dict:
    code = member[:20].decode()
    digits = code[1:]
    net = -int(digits) if code[0] == "1" else int(digits.translate(_NINES))
    return {"rank": rank, "user_id": member[21:].decode(), "net_winnings": net}


def _int64(value: Any, what: str, low: int) -> str:
    # The Lua side trusts its decimal strings: only exact Python ints in range reach it.
    if type(value) is not int or not low <= value <= INT64_MAX:
        raise ValueError(f"{what} must be an int from {low} to 2**63-1, not {value!r}")
    return str(value)


class RedisStore:
    """The Store Protocol over one redis-py client (thread-safe; its pool gives each call a connection).

    Any Redis failure (refused connection, timeout, read-only replica) raises StoreUnavailable.
    """

    def __init__(self, client: redis.Redis, prefix: str = "wallet:", *, ledger_limit: int = 1000,
                 idempotency_ttl: float = 24 * 3600, idempotency_cap: int = 1_000_000,
                 history: int = HISTORY) -> None:
        self.client = client
        self.prefix = prefix
        self._ledger_limit = ledger_limit
        self._ttl_ms = max(1, round(idempotency_ttl * 1000))
        self._cap = idempotency_cap
        self._history = history
        # Names a new event history together with the server's time; random so two Redis servers never agree.
        self._token = secrets.token_hex(4)
        self._script = client.register_script(_SCRIPT)
        self._skew_us = 0  # Redis's clock minus ours, measured now and then (see _deadline_us)
        self._skew_at = float("-inf")
        self._warned_at = 0.0

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _call(self, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except (*_DOWN, redis.ResponseError) as exc:
            # A write refused inside a script (OOM, READONLY) arrives as a plain ResponseError with its text.
            text = str(exc)
            if not isinstance(exc, _DOWN) and "OOM command not allowed" not in text and "READONLY" not in text:
                raise
            # Every request fails while Redis is gone: one line every few seconds says so.
            now = time.monotonic()
            if now - self._warned_at > 5.0:
                self._warned_at = now
                log.warning("Redis cannot serve requests (%s): answering 503", type(exc).__name__)
            raise StoreUnavailable(UNREACHABLE) from None

    # -- reads ---------------------------------------------------------------

    def balance(self, user_id: str) -> int:
        value = self._call(self.client.get, self._key("bal:" + user_id))
        return int(value) if value is not None else 0

    def transactions(self, user_id: str, limit: int = 50) -> list[dict]:
        if limit < 1:
            return []
        rows = self._call(self.client.lrange, self._key("ledger:" + user_id), 0, limit - 1)
        return [json.loads(row) for row in rows]

    def leaderboard(self) -> list[dict]:
        members = self._call(self.client.zrange, self._key("board"), 0, BOARD_SIZE - 1)
        return [_board_row(rank, m) for rank, m in enumerate(members, start=1)]

    def head_seq(self) -> int:
        """The seq of the newest event any process has published (for EventHub.follow)."""
        value = self._call(self.client.get, self._key("seq"))
        return int(value) if value is not None else 0

    def healthy(self) -> bool:
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False

    def close(self) -> None:
        self.client.close()

    def idempotency_size(self) -> int:
        """Keys remembered and not yet expired (for tests and operators)."""
        now_ms = int(time.time() * 1000)
        return self._call(self.client.zcount, self._key("idem"), f"({now_ms}", "+inf")

    # -- writes --------------------------------------------------------------

    def deposit(self, user_id: str, amount: int, idem: Idempotency | None = None) -> Result:
        return self._write(idem, "deposit", user_id, _int64(amount, "amount", 1))

    def withdraw(self, user_id: str, amount: int, idem: Idempotency | None = None) -> Result:
        return self._write(idem, "withdraw", user_id, _int64(amount, "amount", 1))

    def settle(self, user_id: str, game: str, bet: int, payout: int, idem: Idempotency | None = None) -> Result:
        bet_s, payout_s = _int64(bet, "bet", 0), _int64(payout, "payout", 0)
        return self._write(idem, "settle", user_id, game, bet_s, payout_s, str(payout - bet))

    def _deadline_us(self) -> int:
        """The latest Redis time at which a write sent now may still apply: before our reply timeout."""
        now = time.time()
        if now - self._skew_at > SKEW_REFRESH:
            seconds, micros = self._call(self.client.time)
            self._skew_us = round(seconds * 1_000_000 + micros - time.time() * 1_000_000)
            self._skew_at = now
        return round(now * 1_000_000) + self._skew_us + round(WRITE_DEADLINE * 1_000_000)

    def _write(self, idem: Idempotency | None, op: str, *args: str) -> Result:
        key, fp = (idem.key, idem.fingerprint) if idem is not None else ("", b"")
        argv = [self.prefix, self._token, key, fp, self._ttl_ms, self._cap, self._ledger_limit, self._history,
                op, *args, self._deadline_us()]
        status, payload, evicted, earliest_ms = self._call(self._script, [], argv)
        if evicted:
            log.warning("idempotency cap of %d keys reached: forgot %d key(s), the oldest %.0f s before its "
                        "24 h expiry", self._cap, evicted, earliest_ms / 1000)
        status, payload = status.decode(), payload.decode()
        if status == "late":
            log.warning("a write reached Redis after its deadline and was not applied: answering 503")
            raise StoreUnavailable(UNREACHABLE)
        if status == "ok":
            return Result(json.loads(payload))
        if status == "replay_ok":
            return Result(json.loads(payload), True)
        if status == "reused":
            raise IdempotencyKeyReused()
        error = _refusal(payload)
        error.replayed = status == "replay_err"
        raise error


# -- events ----------------------------------------------------------------------


def _event(entry_id: bytes, fields: dict) -> tuple[int, str, dict, str | None]:
    user = fields.get(b"u")
    return (int(entry_id.split(b"-", 1)[0]), fields[b"k"].decode(), json.loads(fields[b"d"]),
            user.decode() if user is not None else None)


class RedisEventReader:
    """One thread per process: tails `{prefix}events` and feeds the local hub in `seq` order.

    start() names or adopts the epoch (`{prefix}epoch`, SET NX), preloads the newest events into
    `hub.preload(events, epoch, last_seq, board=...)` and starts tailing (XREAD BLOCK) with `hub.feed(...)`.
    Every entry carries the epoch it was written in (and a quiet read checks the key): when it changed
    (Redis lost its data and a new history began) or entries were trimmed before the reader got them,
    it calls `hub.reset(epoch, last_seq, board=...)` then `hub.preload(...)` with what the stream holds.
    While Redis is gone it retries every half second.
    """

    def __init__(self, client_factory: Callable[[], redis.Redis], prefix: str, hub: Any, *,
                 history: int = HISTORY, block_ms: int = 1000) -> None:
        self._factory = client_factory
        self._prefix = prefix
        self._stream = prefix + "events"
        self._epoch_key = prefix + "epoch"
        self._hub = hub
        self._history = history
        self._block_ms = block_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self.epoch: str | None = None
        self.last_seq = 0
        self.connected = False

    def start(self) -> "RedisEventReader":
        """Preload the history, then tail in a thread. Raises redis errors when Redis cannot be reached."""
        self._client = self._factory()
        try:
            epoch, events, last_seq, board = self._snapshot(self._client)
        except BaseException:
            self._client.close()
            raise
        self._hub.preload(events, epoch, last_seq, board=board)
        self.epoch, self.last_seq, self.connected = epoch, last_seq, True
        self._thread = threading.Thread(target=self._run, name="redis-event-reader", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop tailing; prompt even while the thread waits in XREAD (shutdown has a 5 s budget)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        while True:
            client = self._client
            if client is not None:
                try:
                    # Shuts the sockets down, which wakes a blocked XREAD at once. Repeated: the thread
                    # may have been opening a new connection (to a hung Redis) when the first one went.
                    client.connection_pool.disconnect()
                except Exception:  # a dying connection must not stop the shutdown
                    pass
            if self._thread is None or not self._thread.is_alive() or time.monotonic() > deadline:
                return
            self._thread.join(0.05)

    def _snapshot(self, client: redis.Redis) -> tuple[str, list[tuple], int, dict]:
        """The epoch, the newest retained events (oldest first), the last seq and the board, read atomically."""
        while True:
            pipe = client.pipeline(transaction=True)
            pipe.get(self._epoch_key)
            pipe.xrevrange(self._stream, count=self._history)
            pipe.get(self._prefix + "seq")
            pipe.zrange(self._prefix + "board", 0, BOARD_SIZE - 1)
            epoch, newest, seq, members = pipe.execute()
            if epoch is None:
                client.set(self._epoch_key, f"{int(time.time() * 1e6)}-{uuid.uuid4().hex[:8]}", nx=True)
                continue
            events = [_event(entry_id, fields) for entry_id, fields in reversed(newest)]
            last_seq = events[-1][0] if events else int(seq or 0)
            board = {"leaderboard": [_board_row(rank, m) for rank, m in enumerate(members, start=1)]}
            return epoch.decode(), events, last_seq, board

    def _run(self) -> None:
        client = self._client
        while not self._stop.is_set():
            try:
                if client is None:
                    client = self._client = self._factory()
                    self._resync(client)
                fed = self._step(client)
                if not self.connected:
                    reader_log.info("event reader: Redis is back (epoch %s, seq %d)", self.epoch, self.last_seq)
                    self.connected = True
                if 0 < fed < _READ_COUNT:
                    self._stop.wait(READ_GATHER)
            except _DOWN as exc:
                if self._stop.is_set():
                    break
                if self.connected:
                    reader_log.warning("event reader: Redis unreachable (%s); retrying", exc)
                    self.connected = False
                client = self._drop(client)
                self._stop.wait(0.5)
            except Exception:
                if self._stop.is_set():
                    break
                reader_log.exception("event reader failed; starting over")
                client = self._drop(client)
                self._stop.wait(1.0)
        self._drop(client)

    def _drop(self, client: redis.Redis | None) -> None:
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a dead connection must not stop the loop
                pass
        self._client = None
        return None

    def _step(self, client: redis.Redis) -> int:
        """Read what the stream has after last_seq (waiting up to block_ms) into the hub; how many were fed."""
        batches = client.xread({self._stream: f"{self.last_seq}-0"}, count=_READ_COUNT, block=self._block_ms)
        if not batches:
            # Quiet: check that our history still exists (a flush without writes shows only here).
            epoch = client.get(self._epoch_key)
            if epoch is None or epoch.decode() != self.epoch:
                self._resync(client)
            return 0
        epoch = self.epoch.encode()
        fed = 0
        for _stream, entries in batches:
            for entry_id, fields in entries:
                if fields.get(b"e") != epoch:
                    # Written in another history (Redis lost its data since): start over from the new one.
                    self._resync(client)
                    return fed
                event = _event(entry_id, fields)
                if event[0] != self.last_seq + 1:
                    # Trimmed before we read them (a long outage): subscribers must resync.
                    reader_log.warning("event reader: events after seq %d were trimmed before delivery",
                                       self.last_seq)
                    self._resync(client, force=True)
                    return fed
                self._hub.feed(*event)
                self.last_seq = event[0]
                fed += 1
        return fed

    def _resync(self, client: redis.Redis, force: bool = False) -> None:
        """After a reconnect or an epoch change: same history -> carry on; otherwise restart the hub's history.

        The hub drops its subscribers (they reconnect with `since`) and takes the stream's newest events.
        """
        epoch, events, last_seq, board = self._snapshot(client)
        if epoch == self.epoch and last_seq >= self.last_seq and not force:
            return  # tailing from last_seq catches up; a gap is detected there
        if epoch != self.epoch:
            reader_log.warning("event reader: the event history changed (epoch %s -> %s): subscribers resync",
                               self.epoch, epoch)
        elif last_seq < self.last_seq:
            # Redis came back from a persistence file without its newest writes (appendfsync everysec):
            # the seqs after last_seq will name other events than the ones delivered.
            reader_log.warning("event reader: Redis came back at seq %d, behind the %d delivered: subscribers "
                               "resync", last_seq, self.last_seq)
        self._hub.reset(epoch, last_seq, board=board)
        self._hub.preload(events, epoch, last_seq, board=board)
        self.epoch, self.last_seq = epoch, last_seq


# -- opening -----------------------------------------------------------------------


def connect(url: str, *, socket_timeout: float = SOCKET_TIMEOUT) -> redis.Redis:
    """A client with short timeouts and no retries, so a lost Redis is an error within seconds."""
    return redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=CONNECT_TIMEOUT,
                                retry=Retry(NoBackoff(), 0), decode_responses=False, protocol=2)


def describe(url: str) -> str:
    """host:port (or the socket path) of a Redis URL, never its password."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return parts.path
        return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
    except ValueError:
        return "an unparsable address"


def open_redis(url: str, prefix: str, hub: Any, **store_options: Any) -> tuple[RedisStore, RedisEventReader]:
    """Connect, check Redis answers, and start the event reader (preloading the hub's history).

    Raises RedisStartupError naming host and port when Redis cannot be reached. The caller stops the
    reader and closes the store at shutdown.
    """
    where = describe(url)
    password = urlsplit(url).password if "://" in url else None

    def clean(exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        return text.replace(password, "***") if password else text

    try:
        client = connect(url)
    except ValueError as exc:
        raise RedisStartupError(f"the Redis URL for {where} is not usable: {clean(exc)}") from None
    try:
        client.ping()
        store = RedisStore(client, prefix, **store_options)
        # The reader's connection blocks in XREAD for block_ms: its timeout must be longer.
        reader = RedisEventReader(lambda: connect(url, socket_timeout=3.0), prefix, hub).start()
        hub.follow(store.head_seq)  # subscriptions go live only once this process has read up to the head
    except (redis.RedisError, OSError) as exc:
        client.close()
        raise RedisStartupError(f"cannot reach Redis at {where}: {clean(exc)}") from None
    return store, reader
