"""In-memory wallets: balances, per-user ledgers, game settlement and idempotency, behind one lock."""

import hashlib
import itertools
import threading
import time
from collections import OrderedDict, deque
from datetime import UTC, datetime

from leaderboard import Leaderboard
from validation import INT64_MAX


class WalletError(Exception):
    """A refused operation; carries the HTTP status and error body of the contract."""

    status = 409
    code = "conflict"

    def body(self):
        return {"error": self.code, "message": str(self)}


class InsufficientFunds(WalletError):
    code = "insufficient_funds"

    def __init__(self, balance):
        super().__init__("not enough money")
        self.balance = balance

    def body(self):
        return {**super().body(), "balance": self.balance}


class BalanceLimitExceeded(WalletError):
    code = "balance_limit_exceeded"

    def __init__(self):
        super().__init__(f"the balance would exceed the maximum of {INT64_MAX} cents")


class IdempotencyKeyReused(WalletError):
    status = 422
    code = "idempotency_key_reused"

    def __init__(self):
        super().__init__("this Idempotency-Key was already used with a different request")


def rfc3339(ts):
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def fingerprint(method, path, body):
    """Identify a request for idempotency; body is canonical JSON text (sorted keys, no spaces)."""
    return hashlib.sha256(f"{method}\n{path}\n{body}".encode()).digest()


class _NullHub:
    def publish(self, kind, data, user_id=None):
        pass


class WalletStore:
    """All state lives here and every method is atomic under one re-entrant lock.

    Events go to the hub while the lock is held, so their order is the order
    the operations were applied; hub.publish only enqueues, so it never waits
    on a WebSocket client.
    """

    def __init__(self, hub=None, *, ledger_limit=1000, idempotency_ttl=24 * 3600,
                 idempotency_cap=1_000_000, clock=time.time):
        self._lock = threading.RLock()
        self._hub = hub or _NullHub()
        self._clock = clock
        self._balances = {}
        self._ledgers = {}
        self._ledger_limit = ledger_limit
        self._ids = itertools.count(1)
        self._outcome_ids = itertools.count(1)
        self._board = Leaderboard()
        self._idem = OrderedDict()  # key -> (fingerprint, status, body, expires_at), oldest first
        self._idem_ttl = idempotency_ttl
        self._idem_cap = idempotency_cap

    # -- reads ---------------------------------------------------------------

    def balance(self, user_id):
        with self._lock:
            return self._balances.get(user_id, 0)

    def transactions(self, user_id, limit=50):
        with self._lock:
            ledger = self._ledgers.get(user_id, ())
            newest = list(itertools.islice(reversed(ledger), limit))
        return [
            {"transaction_id": tid, "type": kind, "amount": amount, "balance": balance, "created_at": rfc3339(ts)}
            for tid, kind, amount, balance, ts in newest
        ]

    def leaderboard(self):
        with self._lock:
            return self._board.top()

    def totals(self):
        """Sum of all balances and number of wallets (for tests and the benchmark)."""
        with self._lock:
            return sum(self._balances.values()), len(self._balances)

    # -- writes --------------------------------------------------------------

    def _entry(self, user_id, kind, amount, balance, now):
        tid = f"tx_{next(self._ids)}"
        ledger = self._ledgers.get(user_id)
        if ledger is None:
            ledger = self._ledgers[user_id] = deque(maxlen=self._ledger_limit)
        ledger.append((tid, kind, amount, balance, now))
        self._balances[user_id] = balance
        self._hub.publish("balance", {
            "user_id": user_id, "balance": balance, "transaction_id": tid,
            "type": kind, "amount": amount, "timestamp": rfc3339(now),
        }, user_id)
        return tid

    def deposit(self, user_id, amount):
        with self._lock:
            balance = self._balances.get(user_id, 0) + amount
            if balance > INT64_MAX:
                raise BalanceLimitExceeded()
            tid = self._entry(user_id, "deposit", amount, balance, self._clock())
            return {"user_id": user_id, "balance": balance, "transaction_id": tid}

    def withdraw(self, user_id, amount):
        with self._lock:
            current = self._balances.get(user_id, 0)
            if amount > current:
                raise InsufficientFunds(current)
            balance = current - amount
            tid = self._entry(user_id, "withdraw", amount, balance, self._clock())
            return {"user_id": user_id, "balance": balance, "transaction_id": tid}

    def settle(self, user_id, game, bet, payout):
        """Settle one finished round: take the stake, pay the payout, rank the player."""
        with self._lock:
            current = self._balances.get(user_id, 0)
            if bet > current:
                raise InsufficientFunds(current)
            balance = current - bet + payout
            if balance > INT64_MAX:
                raise BalanceLimitExceeded()
            now = self._clock()
            if bet:
                self._entry(user_id, "bet", bet, current - bet, now)
            if payout:
                self._entry(user_id, "win", payout, balance, now)
            outcome = {
                "outcome_id": f"out_{next(self._outcome_ids)}", "user_id": user_id, "game": game,
                "bet": bet, "payout": payout, "net": payout - bet, "balance": balance,
            }
            self._hub.publish("game_outcome", {**outcome, "timestamp": rfc3339(now)}, user_id)
            if self._board.record(user_id, payout - bet):
                self._hub.publish("leaderboard", {"leaderboard": self._board.top()})
            return outcome

    # -- idempotency ---------------------------------------------------------

    def run_idempotent(self, key, fp, operation):
        """Run operation() at most once per key; return (status, body, replayed).

        operation returns (status, body). Holding the lock across the check and
        the operation is what makes concurrent requests with one key apply once.
        Only 200 and 409 answers are remembered, as the contract says.
        """
        with self._lock:
            now = self._clock()
            record = self._idem.get(key)
            if record is not None and record[3] <= now:
                del self._idem[key]
                record = None
            if record is not None:
                if record[0] != fp:
                    raise IdempotencyKeyReused()
                return record[1], record[2], True
            status, body = operation()
            if status in (200, 409):
                self._remember(key, (fp, status, body, now + self._idem_ttl), now)
            return status, body, False

    def _remember(self, key, record, now):
        idem = self._idem
        idem[key] = record
        # Oldest first: expired records and the overflow beyond the cap sit at the front.
        while idem:
            oldest_key, oldest = next(iter(idem.items()))
            if oldest[3] <= now or len(idem) > self._idem_cap:
                del idem[oldest_key]
            else:
                break

    def idempotency_size(self):
        with self._lock:
            return len(self._idem)
