"""The wallet store: its Protocol, its errors, and the in-memory implementation behind one lock."""

import copy
import itertools
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple, Protocol

from errors import ServiceError
from leaderboard import Leaderboard
from validation import INT64_MAX, INT64_MIN

log = logging.getLogger("wallet.store")


class WalletError(ServiceError):
    """A refused wallet operation. `replayed` is True when it is an idempotent replay of an earlier refusal."""

    replayed = False


class InsufficientFunds(WalletError):
    code = "insufficient_funds"

    def __init__(self, balance: int) -> None:
        super().__init__("not enough money", balance=balance)
        self.balance = balance


class BalanceLimitExceeded(WalletError):
    code = "balance_limit_exceeded"

    def __init__(self, what: str = "the balance") -> None:
        super().__init__(f"{what} would leave the signed 64-bit range (at most {INT64_MAX} cents)")


class IdempotencyKeyReused(WalletError):
    code = "idempotency_key_reused"

    def __init__(self) -> None:
        super().__init__("this Idempotency-Key was already used with a different request")


class StoreUnavailable(WalletError):
    """The backing store (Redis) cannot be reached; nothing was applied."""

    code = "unavailable"


class Idempotency(NamedTuple):
    """An Idempotency-Key and the fingerprint of the request it came with (opaque to the store)."""

    key: str
    fingerprint: bytes


class Result(NamedTuple):
    """A write's success body, and whether it is the replay of an earlier answer under the same key."""

    body: dict
    replayed: bool = False


_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def rfc3339(ts: float) -> str:
    """UTC with microseconds and a Z, as datetime.fromtimestamp(ts, UTC).isoformat() gives: every event has one.

    The date and time of day are formatted once per second (the whole conversion was 1.6 us per event).
    """
    global _second
    second = math.floor(ts)
    micros = round((ts - second) * 1_000_000)  # half to even, as datetime rounds
    if micros == 1_000_000:
        second, micros = second + 1, 0
    cached = _second
    if cached[0] != second:
        cached = _second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{micros:06d}Z"


class EventSink(Protocol):
    """Where a store publishes the events of its writes, in the order the writes were applied."""

    def publish(self, kind: str, data: dict, user_id: str | None = None) -> None: ...


class Store(Protocol):
    """What HTTP, WebSocket and gRPC may ask of the wallets; the in-memory and Redis stores implement it.

    Writes are atomic with their idempotency check: with `idem`, the first request under a key runs
    and its result (or its WalletError) is remembered; a later one with the same fingerprint gets it
    back with replayed=True (raised errors carry `replayed`); another fingerprint raises
    IdempotencyKeyReused. Every method may raise StoreUnavailable.
    """

    def balance(self, user_id: str) -> int: ...
    def transactions(self, user_id: str, limit: int = 50) -> list[dict]: ...
    def leaderboard(self) -> list[dict]: ...
    def deposit(self, user_id: str, amount: int, idem: Idempotency | None = None) -> Result: ...
    def withdraw(self, user_id: str, amount: int, idem: Idempotency | None = None) -> Result: ...
    def settle(self, user_id: str, game: str, bet: int, payout: int, idem: Idempotency | None = None) -> Result: ...
    def healthy(self) -> bool: ...
    def close(self) -> None: ...


class _NullSink:
    def publish(self, kind: str, data: dict, user_id: str | None = None) -> None:
        pass


class MemoryStore:
    """The in-process store: all state in dicts, every method atomic under one re-entrant lock.

    Events go to the sink while the lock is held, so their order is the order the operations were
    applied; the sink only enqueues, so a write never waits on a WebSocket client.
    """

    def __init__(self, events: EventSink | None = None, *, ledger_limit: int = 1000,
                 idempotency_ttl: float = 24 * 3600, idempotency_cap: int = 1_000_000,
                 clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.RLock()
        self._events = events or _NullSink()
        self._clock = clock
        self._balances: dict[str, int] = {}
        self._ledgers: dict[str, deque] = {}
        self._ledger_limit = ledger_limit
        self._ids = itertools.count(1)
        self._outcome_ids = itertools.count(1)
        self._board = Leaderboard()
        # key -> (fingerprint, Result or WalletError, expires_at), oldest first
        self._idem: OrderedDict[str, tuple] = OrderedDict()
        self._idem_ttl = idempotency_ttl
        self._idem_cap = idempotency_cap

    # -- reads ---------------------------------------------------------------

    def balance(self, user_id: str) -> int:
        with self._lock:
            return self._balances.get(user_id, 0)

    def transactions(self, user_id: str, limit: int = 50) -> list[dict]:
        with self._lock:
            ledger = self._ledgers.get(user_id, ())
            newest = list(itertools.islice(reversed(ledger), limit))
        return [
            {"transaction_id": tid, "type": kind, "amount": amount, "balance": balance, "created_at": rfc3339(ts)}
            for tid, kind, amount, balance, ts in newest
        ]

    def leaderboard(self) -> list[dict]:
        with self._lock:
            return self._board.top()

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def totals(self) -> tuple[int, int]:
        """Sum of all balances and number of wallets (for tests and the benchmark)."""
        with self._lock:
            return sum(self._balances.values()), len(self._balances)

    # -- writes --------------------------------------------------------------

    def deposit(self, user_id: str, amount: int, idem: Idempotency | None = None) -> Result:
        return self._idempotent(idem, self._deposit, user_id, amount)

    def withdraw(self, user_id: str, amount: int, idem: Idempotency | None = None) -> Result:
        return self._idempotent(idem, self._withdraw, user_id, amount)

    def settle(self, user_id: str, game: str, bet: int, payout: int, idem: Idempotency | None = None) -> Result:
        """Settle one finished round: take the stake, pay the payout, rank the player."""
        return self._idempotent(idem, self._settle, user_id, game, bet, payout)

    def _entry(self, user_id, kind, amount, balance, now):
        tid = f"tx_{next(self._ids)}"
        ledger = self._ledgers.get(user_id)
        if ledger is None:
            ledger = self._ledgers[user_id] = deque(maxlen=self._ledger_limit)
        ledger.append((tid, kind, amount, balance, now))
        self._balances[user_id] = balance
        self._events.publish("balance", {
            "user_id": user_id, "balance": balance, "transaction_id": tid,
            "type": kind, "amount": amount, "timestamp": rfc3339(now),
        }, user_id)
        return tid

    def _deposit(self, user_id, amount):
        balance = self._balances.get(user_id, 0) + amount
        if balance > INT64_MAX:
            raise BalanceLimitExceeded()
        tid = self._entry(user_id, "deposit", amount, balance, self._clock())
        return {"user_id": user_id, "balance": balance, "transaction_id": tid}

    def _withdraw(self, user_id, amount):
        current = self._balances.get(user_id, 0)
        if amount > current:
            raise InsufficientFunds(current)
        balance = current - amount
        tid = self._entry(user_id, "withdraw", amount, balance, self._clock())
        return {"user_id": user_id, "balance": balance, "transaction_id": tid}

    def _settle(self, user_id, game, bet, payout):
        current = self._balances.get(user_id, 0)
        if bet > current:
            raise InsufficientFunds(current)
        balance = current - bet + payout
        if balance > INT64_MAX:
            raise BalanceLimitExceeded()
        if not INT64_MIN <= self._board.net(user_id) + payout - bet <= INT64_MAX:
            raise BalanceLimitExceeded("the net winnings")
        now = self._clock()
        if bet:
            self._entry(user_id, "bet", bet, current - bet, now)
        if payout:
            self._entry(user_id, "win", payout, balance, now)
        outcome = {
            "outcome_id": f"out_{next(self._outcome_ids)}", "user_id": user_id, "game": game,
            "bet": bet, "payout": payout, "net": payout - bet, "balance": balance,
        }
        self._events.publish("game_outcome", {**outcome, "timestamp": rfc3339(now)}, user_id)
        if self._board.record(user_id, payout - bet):
            self._events.publish("leaderboard", {"leaderboard": self._board.top()})
        return outcome

    # -- idempotency ---------------------------------------------------------

    def _idempotent(self, idem, operation, *args):
        """Run operation(*args) at most once per key, remembering its result or its WalletError.

        Holding the lock across the check and the operation is what makes concurrent requests with
        one key apply once.
        """
        with self._lock:
            if idem is None:
                return Result(operation(*args))
            now = self._clock()
            record = self._idem.get(idem.key)
            if record is not None and record[2] <= now:
                del self._idem[idem.key]
                record = None
            if record is not None:
                if record[0] != idem.fingerprint:
                    raise IdempotencyKeyReused()
                outcome = record[1]
                if isinstance(outcome, WalletError):
                    replay = copy.copy(outcome)
                    replay.replayed = True
                    raise replay
                return Result(outcome, True)
            try:
                body = operation(*args)
            except WalletError as exc:
                self._remember(idem, exc, now)
                raise
            self._remember(idem, body, now)
            return Result(body)

    def _remember(self, idem, outcome, now):
        idem_records = self._idem
        idem_records[idem.key] = (idem.fingerprint, outcome, now + self._idem_ttl)
        # Oldest first: expired records and the overflow beyond the cap sit at the front.
        while idem_records:
            oldest_key, oldest = next(iter(idem_records.items()))
            if oldest[2] <= now:
                del idem_records[oldest_key]
            elif len(idem_records) > self._idem_cap:
                del idem_records[oldest_key]
                log.warning("idempotency cap of %d keys reached: forgot a key %.0f s before its 24 h expiry",
                            self._idem_cap, oldest[2] - now)
            else:
                break

    def idempotency_size(self) -> int:
        with self._lock:
            return len(self._idem)
