"""Property-based check of each store against a plain model, with idempotent retries mixed in.

Runs against every backend of test_store.py (the `make_store` fixture): MemoryStore and RedisStore.
"""

import hashlib

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from test_store import backend, make_store  # noqa: F401  (fixtures)

from redis_server import redis_server  # noqa: F401  (fixture, requested lazily by make_store)
from validation import INT64_MAX, INT64_MIN
from wallet_store import Idempotency, IdempotencyKeyReused, WalletError

USERS = st.sampled_from(["a", "b", "c"])
AMOUNTS = st.one_of(st.integers(1, 1000), st.integers(INT64_MAX - 1000, INT64_MAX))
STAKES = st.one_of(st.integers(0, 1000), st.integers(INT64_MAX - 1000, INT64_MAX))
KEYS = st.sampled_from(["k1", "k2", "k3", None])


def fingerprint(*request: str) -> bytes:
    # The store treats fingerprints as opaque bytes; the real one (app.fingerprint) hashes method, route, body.
    return hashlib.sha256("\n".join(request).encode()).digest()


class StoreMachine(RuleBasedStateMachine):
    def __init__(self, make):
        super().__init__()
        self.store, self.events = make()
        self.balances = {}
        self.ledger = {}  # user -> [(type, amount, balance)]
        self.net = {}
        self.answers = {}  # idempotency key -> (fingerprint, status, body)

    def _apply(self, key, request, operation):
        """Run a write as the HTTP layer does (status, body), and check replays against the model."""
        fp = fingerprint(*request)
        idem = None if key is None else Idempotency(key, fp)
        try:
            result = operation(idem)
            status, body, replayed = 200, result.body, result.replayed
        except IdempotencyKeyReused:
            assert key in self.answers and self.answers[key][0] != fp, "refused a key that was free"
            return None
        except WalletError as exc:
            status, body, replayed = exc.http_status, exc.body(), exc.replayed
        if key is None:
            assert not replayed
            return status, body
        if key in self.answers:
            assert self.answers[key][0] == fp, "a reused key with another body must be refused"
            assert replayed and (status, body) == self.answers[key][1:]
            return None  # a replay changes nothing
        assert not replayed
        self.answers[key] = (fp, status, body)
        return status, body

    def _model_entry(self, user, kind, amount, balance):
        self.ledger.setdefault(user, []).append((kind, amount, balance))
        self.balances[user] = balance

    @rule(user=USERS, amount=AMOUNTS, key=KEYS)
    def deposit(self, user, amount, key):
        before = self.balances.get(user, 0)
        result = self._apply(key, ("/deposit", f"{user}:{amount}"),
                             lambda idem: self.store.deposit(user, amount, idem=idem))
        if result is None:
            return
        status, body = result
        if before + amount > INT64_MAX:
            assert status == 409 and body["error"] == "balance_limit_exceeded"
        else:
            assert status == 200 and body["balance"] == before + amount
            self._model_entry(user, "deposit", amount, before + amount)

    @rule(user=USERS, amount=AMOUNTS, key=KEYS)
    def withdraw(self, user, amount, key):
        before = self.balances.get(user, 0)
        result = self._apply(key, ("/withdraw", f"{user}:{amount}"),
                             lambda idem: self.store.withdraw(user, amount, idem=idem))
        if result is None:
            return
        status, body = result
        if amount > before:
            assert (status, body) == (409, {"error": "insufficient_funds", "message": "not enough money",
                                            "balance": before})
        else:
            assert status == 200 and body["balance"] == before - amount
            self._model_entry(user, "withdraw", amount, before - amount)

    @rule(user=USERS, bet=STAKES, payout=STAKES, key=KEYS)
    def outcome(self, user, bet, payout, key):
        before = self.balances.get(user, 0)
        result = self._apply(key, ("/outcomes", f"{user}:{bet}:{payout}"),
                             lambda idem: self.store.settle(user, "dice", bet, payout, idem=idem))
        if result is None:
            return
        status, body = result
        net = self.net.get(user, 0) + payout - bet
        if bet > before:
            assert status == 409 and body["error"] == "insufficient_funds"
        elif before - bet + payout > INT64_MAX or not INT64_MIN <= net <= INT64_MAX:
            assert status == 409 and body["error"] == "balance_limit_exceeded"
        else:
            assert status == 200 and body["balance"] == before - bet + payout and body["net"] == payout - bet
            if bet:
                self._model_entry(user, "bet", bet, before - bet)
            if payout:
                self._model_entry(user, "win", payout, before - bet + payout)
            self.net[user] = net

    @invariant()
    def matches_model(self):
        for user in ("a", "b", "c"):
            balance = self.store.balance(user)
            assert balance == self.balances.get(user, 0)
            assert 0 <= balance <= INT64_MAX
            got = [(t["type"], t["amount"], t["balance"]) for t in self.store.transactions(user, 1000)]
            assert got == list(reversed(self.ledger.get(user, [])))
        expected = sorted(self.net.items(), key=lambda item: (-item[1], item[0]))
        assert [(e["user_id"], e["net_winnings"]) for e in self.store.leaderboard()] == expected

    @invariant()
    def balance_events_replay_to_balances(self):
        last = {}
        for kind, data, _ in self.events.all():
            if kind == "balance":
                last[data["user_id"]] = data["balance"]
        assert last == {u: b for u, b in self.balances.items() if u in last}
        assert set(last) == set(self.ledger)


def test_store_matches_the_model(make_store, backend):  # noqa: F811
    examples = 150
    run_state_machine_as_test(
        lambda: StoreMachine(make_store),
        settings=settings(max_examples=examples, stateful_step_count=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]),
    )

