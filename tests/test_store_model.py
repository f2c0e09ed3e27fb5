"""Property-based check of the wallet store against a plain model, with idempotent retries mixed in."""

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from validation import INT64_MAX
from wallet_store import WalletError, MemoryStore, fingerprint

USERS = st.sampled_from(["a", "b", "c"])
AMOUNTS = st.one_of(st.integers(1, 1000), st.integers(INT64_MAX - 1000, INT64_MAX))
STAKES = st.one_of(st.integers(0, 1000), st.integers(INT64_MAX - 1000, INT64_MAX))
KEYS = st.sampled_from(["k1", "k2", "k3", None])


class RecordingHub:
    def __init__(self):
        self.events = []

    def publish(self, kind, data, user_id=None):
        self.events.append((kind, data))


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.hub = RecordingHub()
        self.store = MemoryStore(self.hub)
        self.balances = {}
        self.ledger = {}  # user -> [(type, amount, balance)]
        self.net = {}
        self.answers = {}  # idempotency key -> (fingerprint, status, body)

    def _apply(self, key, request, operation):
        """Run through run_idempotent exactly as the HTTP layer does, and mirror it in the model."""
        def run():
            try:
                return 200, operation()
            except WalletError as exc:
                return exc.status, exc.body()

        fp = fingerprint("POST", *request)
        if key is None:
            return run()
        if key in self.answers and self.answers[key][0] != fp:
            try:
                self.store.run_idempotent(key, fp, run)
            except WalletError as exc:
                assert exc.status == 422
                return None
            raise AssertionError("a reused key with another body must be refused")
        status, body, replayed = self.store.run_idempotent(key, fp, run)
        if key in self.answers:
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
        result = self._apply(key, ("/deposit", f"{user}:{amount}"), lambda: self.store.deposit(user, amount))
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
        result = self._apply(key, ("/withdraw", f"{user}:{amount}"), lambda: self.store.withdraw(user, amount))
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
                             lambda: self.store.settle(user, "dice", bet, payout))
        if result is None:
            return
        status, body = result
        if bet > before:
            assert status == 409 and body["error"] == "insufficient_funds"
        elif before - bet + payout > INT64_MAX:
            assert status == 409 and body["error"] == "balance_limit_exceeded"
        else:
            assert status == 200 and body["balance"] == before - bet + payout and body["net"] == payout - bet
            if bet:
                self._model_entry(user, "bet", bet, before - bet)
            if payout:
                self._model_entry(user, "win", payout, before - bet + payout)
            self.net[user] = self.net.get(user, 0) + payout - bet

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
        for kind, data in self.hub.events:
            if kind == "balance":
                last[data["user_id"]] = data["balance"]
        assert last == {u: b for u, b in self.balances.items() if u in last}
        assert set(last) == set(self.ledger)


StoreMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestStoreModel = StoreMachine.TestCase
