"""Unit tests for wallet_store.py: money moves, ledgers, settlement, events, idempotency and concurrency.

A recording fake hub stands in for the EventHub so every publish(kind, data, user_id) can be checked.
"""

import copy
import random
import re
import sys
import threading
from datetime import UTC, datetime

import pytest

from validation import INT64_MAX
from wallet_store import (
    BalanceLimitExceeded,
    IdempotencyKeyReused,
    InsufficientFunds,
    MemoryStore,
    fingerprint,
)

RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")
JOIN_TIMEOUT = 30


class RecordingHub:
    """Records publish() calls; data is deep-copied so later mutation by the store would show."""

    def __init__(self):
        self._lock = threading.Lock()
        self.calls = []

    def publish(self, kind, data, user_id=None):
        with self._lock:
            self.calls.append((kind, copy.deepcopy(data), user_id))

    def kinds(self):
        return [kind for kind, _, _ in self.calls]

    def of(self, kind):
        return [data for k, data, _ in self.calls if k == kind]


class FakeClock:
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def hub():
    return RecordingHub()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(hub, clock):
    return MemoryStore(hub, clock=clock)


def run_threads(targets):
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
        assert not t.is_alive(), "worker thread hung"


# -- deposit, withdraw, balance -------------------------------------------------


def test_unknown_user_has_zero_balance_and_no_transactions(store):
    assert store.balance("nobody") == 0
    assert store.transactions("nobody") == []
    assert store.totals() == (0, 0)


def test_deposit_and_withdraw_move_the_balance(store):
    r1 = store.deposit("alice", 500)
    assert r1["user_id"] == "alice" and r1["balance"] == 500
    r2 = store.withdraw("alice", 200)
    assert r2 == {"user_id": "alice", "balance": 300, "transaction_id": r2["transaction_id"]}
    assert r1["transaction_id"] != r2["transaction_id"]
    assert store.balance("alice") == 300
    assert store.balance("bob") == 0


def test_withdraw_everything_leaves_zero(store):
    store.deposit("alice", 10)
    assert store.withdraw("alice", 10)["balance"] == 0
    assert store.balance("alice") == 0


def test_insufficient_funds_carries_the_balance_and_changes_nothing(store, hub):
    store.deposit("alice", 100)
    ledger_before = store.transactions("alice")
    calls_before = list(hub.calls)
    with pytest.raises(InsufficientFunds) as info:
        store.withdraw("alice", 101)
    err = info.value
    assert err.balance == 100
    assert err.http_status == 409
    assert err.body() == {"error": "insufficient_funds", "message": "not enough money", "balance": 100}
    assert store.balance("alice") == 100
    assert store.transactions("alice") == ledger_before
    assert hub.calls == calls_before


def test_withdraw_from_unknown_user_refused_with_balance_zero(store, hub):
    with pytest.raises(InsufficientFunds) as info:
        store.withdraw("ghost", 1)
    assert info.value.balance == 0
    assert store.transactions("ghost") == []
    assert hub.calls == []


def test_deposit_up_to_int64_max_is_allowed(store):
    assert store.deposit("rich", INT64_MAX)["balance"] == INT64_MAX


def test_balance_limit_exceeded_changes_nothing(store, hub):
    store.deposit("rich", INT64_MAX - 5)
    ledger_before = store.transactions("rich")
    calls_before = list(hub.calls)
    with pytest.raises(BalanceLimitExceeded) as info:
        store.deposit("rich", 6)
    assert info.value.http_status == 409
    assert info.value.body()["error"] == "balance_limit_exceeded"
    assert store.balance("rich") == INT64_MAX - 5
    assert store.transactions("rich") == ledger_before
    assert hub.calls == calls_before
    # Exactly reaching the maximum still works.
    assert store.deposit("rich", 5)["balance"] == INT64_MAX


# -- ledger ------------------------------------------------------------------------


def test_transactions_newest_first_with_types_amounts_and_balances(store):
    store.deposit("alice", 100)
    store.withdraw("alice", 30)
    store.settle("alice", "slots", 20, 50)
    txs = store.transactions("alice")
    assert [(t["type"], t["amount"], t["balance"]) for t in txs] == [
        ("win", 50, 100),
        ("bet", 20, 50),
        ("withdraw", 30, 70),
        ("deposit", 100, 100),
    ]
    assert set(txs[0]) == {"transaction_id", "type", "amount", "balance", "created_at"}
    assert len({t["transaction_id"] for t in txs}) == 4


def test_transactions_limit_is_respected(store):
    for i in range(1, 11):
        store.deposit("alice", i)
    txs = store.transactions("alice", limit=3)
    assert [t["amount"] for t in txs] == [10, 9, 8]
    assert len(store.transactions("alice")) == 10
    assert len(store.transactions("alice", limit=1)) == 1


def test_ledger_keeps_the_newest_1000_by_default(hub):
    store = MemoryStore(hub)
    for i in range(1, 1006):
        store.deposit("alice", i)
    txs = store.transactions("alice", limit=1000)
    assert len(txs) == 1000
    assert txs[0]["amount"] == 1005
    assert txs[-1]["amount"] == 6
    assert len(store.transactions("alice", limit=5000)) == 1000
    # The balance is unaffected by trimming the ledger.
    assert store.balance("alice") == sum(range(1, 1006))


def test_ledgers_are_per_user(store):
    store.deposit("alice", 1)
    store.deposit("bob", 2)
    assert [t["amount"] for t in store.transactions("alice")] == [1]
    assert [t["amount"] for t in store.transactions("bob")] == [2]


def test_created_at_is_rfc3339_utc_with_z(store, clock):
    clock.now = 1_700_000_000.25
    store.deposit("alice", 1)
    created = store.transactions("alice")[0]["created_at"]
    assert RFC3339_UTC.fullmatch(created), created
    parsed = datetime.fromisoformat(created.replace("Z", "+00:00"))
    assert parsed == datetime.fromtimestamp(1_700_000_000.25, UTC)


def test_created_at_with_real_clock_is_rfc3339_utc():
    store = MemoryStore()
    before = datetime.now(UTC)
    store.deposit("alice", 1)
    created = store.transactions("alice")[0]["created_at"]
    assert RFC3339_UTC.fullmatch(created), created
    parsed = datetime.fromisoformat(created.replace("Z", "+00:00"))
    assert abs((parsed - before).total_seconds()) < 60


# -- settlement ----------------------------------------------------------------------


def test_settle_writes_bet_then_win_and_returns_the_outcome(store, hub):
    store.deposit("alice", 100)
    hub.calls.clear()
    outcome = store.settle("alice", "slots", 30, 75)
    assert outcome == {
        "outcome_id": outcome["outcome_id"], "user_id": "alice", "game": "slots",
        "bet": 30, "payout": 75, "net": 45, "balance": 145,
    }
    assert store.balance("alice") == 145
    newest = store.transactions("alice", limit=2)
    assert [(t["type"], t["amount"], t["balance"]) for t in newest] == [("win", 75, 145), ("bet", 30, 70)]
    assert store.leaderboard() == [{"rank": 1, "user_id": "alice", "net_winnings": 45}]


def test_settle_losing_round_writes_only_bet(store):
    store.deposit("alice", 100)
    outcome = store.settle("alice", "poker", 100, 0)
    assert outcome["net"] == -100 and outcome["balance"] == 0
    assert [(t["type"], t["amount"], t["balance"]) for t in store.transactions("alice")] == [
        ("bet", 100, 0), ("deposit", 100, 100),
    ]
    assert store.leaderboard() == [{"rank": 1, "user_id": "alice", "net_winnings": -100}]


def test_settle_free_round_writes_only_win(store):
    outcome = store.settle("alice", "bonus", 0, 40)
    assert outcome["balance"] == 40
    assert [(t["type"], t["amount"], t["balance"]) for t in store.transactions("alice")] == [("win", 40, 40)]


def test_settle_zero_zero_writes_nothing_but_counts_as_played(store, hub):
    outcome = store.settle("alice", "slots", 0, 0)
    assert outcome["net"] == 0 and outcome["balance"] == 0
    assert store.transactions("alice") == []
    assert hub.of("balance") == []
    assert [row["user_id"] for row in store.leaderboard()] == ["alice"]
    assert hub.kinds() == ["game_outcome", "leaderboard"]


def test_settle_bet_larger_than_balance_refused_and_changes_nothing(store, hub):
    store.deposit("alice", 10)
    calls_before = list(hub.calls)
    with pytest.raises(InsufficientFunds) as info:
        store.settle("alice", "slots", 11, 1000)
    assert info.value.balance == 10
    assert store.balance("alice") == 10
    assert [t["type"] for t in store.transactions("alice")] == ["deposit"]
    assert store.leaderboard() == []
    assert hub.calls == calls_before


def test_settle_bet_equal_to_balance_is_allowed(store):
    store.deposit("alice", 10)
    assert store.settle("alice", "slots", 10, 0)["balance"] == 0


def test_settle_over_the_balance_limit_refused_and_changes_nothing(store, hub):
    store.deposit("alice", INT64_MAX - 10)
    calls_before = list(hub.calls)
    with pytest.raises(BalanceLimitExceeded):
        store.settle("alice", "slots", 5, 16)
    assert store.balance("alice") == INT64_MAX - 10
    assert [t["type"] for t in store.transactions("alice")] == ["deposit"]
    assert store.leaderboard() == []
    assert hub.calls == calls_before
    # net +10 lands exactly on the maximum
    assert store.settle("alice", "slots", 5, 15)["balance"] == INT64_MAX


def test_outcome_ids_are_unique(store):
    ids = {store.settle("alice", "g", 0, 0)["outcome_id"] for _ in range(5)}
    assert len(ids) == 5


# -- events ------------------------------------------------------------------------------


def test_deposit_and_withdraw_publish_one_balance_event_each(store, hub, clock):
    clock.now = 1_700_000_000.0
    d = store.deposit("alice", 100)
    w = store.withdraw("alice", 40)
    assert hub.calls == [
        ("balance", {"user_id": "alice", "balance": 100, "transaction_id": d["transaction_id"],
                     "type": "deposit", "amount": 100, "timestamp": "2023-11-14T22:13:20.000000Z"}, "alice"),
        ("balance", {"user_id": "alice", "balance": 60, "transaction_id": w["transaction_id"],
                     "type": "withdraw", "amount": 40, "timestamp": "2023-11-14T22:13:20.000000Z"}, "alice"),
    ]


def test_settle_events_balance_per_entry_in_order_then_outcome_then_leaderboard(store, hub):
    store.deposit("alice", 100)
    hub.calls.clear()
    outcome = store.settle("alice", "slots", 30, 75)
    assert hub.kinds() == ["balance", "balance", "game_outcome", "leaderboard"]
    (_, bet, uid1), (_, win, uid2), (_, game, uid3), (_, board, uid4) = hub.calls
    assert uid1 == uid2 == uid3 == "alice"
    assert uid4 is None
    assert (bet["type"], bet["amount"], bet["balance"]) == ("bet", 30, 70)
    assert (win["type"], win["amount"], win["balance"]) == ("win", 75, 145)
    # The balance events' transaction ids are the ledger's.
    ledger_ids = [t["transaction_id"] for t in store.transactions("alice", limit=2)]
    assert [win["transaction_id"], bet["transaction_id"]] == ledger_ids
    assert RFC3339_UTC.fullmatch(game.pop("timestamp"))
    assert game == outcome
    assert board == {"leaderboard": [{"rank": 1, "user_id": "alice", "net_winnings": 45}]}


def test_leaderboard_event_only_when_the_top_ten_changes(store, hub):
    for i in range(10):
        store.settle(f"top{i}", "g", 0, 1000 + i)
    assert len(hub.of("leaderboard")) == 10
    hub.calls.clear()

    # An 11th player who does not make the top 10: outcome published, leaderboard not.
    store.settle("outsider", "g", 0, 5)
    assert hub.kinds() == ["balance", "game_outcome"]
    hub.calls.clear()

    # A zero-net round for a member changes nothing visible.
    store.settle("top3", "g", 0, 0)
    assert hub.kinds() == ["game_outcome"]
    hub.calls.clear()

    # The outsider climbs into the top 10: leaderboard published with the new board.
    store.settle("outsider", "g", 0, 2000)
    assert hub.kinds() == ["balance", "game_outcome", "leaderboard"]
    board = hub.of("leaderboard")[0]["leaderboard"]
    assert board[0] == {"rank": 1, "user_id": "outsider", "net_winnings": 2005}
    assert "top0" not in [row["user_id"] for row in board]
    assert board == store.leaderboard()


def test_refused_operations_publish_nothing(store, hub):
    store.deposit("alice", 5)
    store.deposit("max", INT64_MAX)
    hub.calls.clear()
    for attempt in (
        lambda: store.withdraw("alice", 6),
        lambda: store.settle("alice", "g", 6, 0),
        lambda: store.deposit("max", 1),
        lambda: store.settle("max", "g", 0, 1),
    ):
        with pytest.raises((InsufficientFunds, BalanceLimitExceeded)):
            attempt()
    assert hub.calls == []


# -- idempotency --------------------------------------------------------------------------


class CountingOp:
    """An operation for run_idempotent that counts its runs."""

    def __init__(self, fn):
        self.fn = fn
        self.runs = 0

    def __call__(self):
        self.runs += 1
        return self.fn()


def deposit_op(store, user, amount):
    return CountingOp(lambda: (200, store.deposit(user, amount)))


def test_fingerprint_depends_on_method_path_and_body():
    fp = fingerprint("POST", "/api/wallet/deposit", '{"amount":1,"user_id":"a"}')
    assert fp == fingerprint("POST", "/api/wallet/deposit", '{"amount":1,"user_id":"a"}')
    assert fp != fingerprint("POST", "/api/wallet/withdraw", '{"amount":1,"user_id":"a"}')
    assert fp != fingerprint("POST", "/api/wallet/deposit", '{"amount":2,"user_id":"a"}')
    assert fp != fingerprint("PUT", "/api/wallet/deposit", '{"amount":1,"user_id":"a"}')


def test_replay_returns_first_answer_and_does_not_run_again(store, hub):
    op = deposit_op(store, "alice", 100)
    status, body, replayed = store.run_idempotent("k1", b"fp", op)
    assert (status, replayed) == (200, False)
    assert body["balance"] == 100
    calls_before = list(hub.calls)

    again = deposit_op(store, "alice", 100)
    assert store.run_idempotent("k1", b"fp", again) == (200, body, True)
    assert again.runs == 0 and op.runs == 1
    assert store.balance("alice") == 100
    assert len(store.transactions("alice")) == 1
    assert hub.calls == calls_before


def test_same_key_different_fingerprint_is_rejected(store):
    store.run_idempotent("k1", b"fp-a", deposit_op(store, "alice", 100))
    other = deposit_op(store, "alice", 100)
    with pytest.raises(IdempotencyKeyReused) as info:
        store.run_idempotent("k1", b"fp-b", other)
    assert info.value.http_status == 422
    assert info.value.body()["error"] == "idempotency_key_reused"
    assert other.runs == 0
    assert store.balance("alice") == 100


def test_different_keys_are_independent(store):
    store.run_idempotent("k1", b"fp", deposit_op(store, "alice", 100))
    _, body, replayed = store.run_idempotent("k2", b"fp", deposit_op(store, "alice", 100))
    assert not replayed and body["balance"] == 200


def test_status_400_is_not_remembered(store):
    bad = CountingOp(lambda: (400, {"error": "invalid_request", "message": "amount must be an integer"}))
    assert store.run_idempotent("k1", b"fp-a", bad)[::2] == (400, False)
    assert store.run_idempotent("k1", b"fp-a", bad)[::2] == (400, False)
    assert bad.runs == 2
    # The key is still free, even for another request.
    _, body, replayed = store.run_idempotent("k1", b"fp-b", deposit_op(store, "alice", 5))
    assert not replayed and body["balance"] == 5
    assert store.idempotency_size() == 1


def test_status_409_is_remembered(store):
    def withdraw():
        try:
            return 200, store.withdraw("alice", 50)
        except InsufficientFunds as exc:
            return exc.status, exc.body()

    first = CountingOp(withdraw)
    status, body, replayed = store.run_idempotent("k1", b"fp", first)
    assert (status, replayed) == (409, False)
    assert body["error"] == "insufficient_funds" and body["balance"] == 0

    store.deposit("alice", 100)  # would succeed now, but the key replays the first answer
    second = CountingOp(withdraw)
    assert store.run_idempotent("k1", b"fp", second) == (409, body, True)
    assert second.runs == 0
    assert store.balance("alice") == 100


def test_records_expire_after_the_ttl(hub, clock):
    store = MemoryStore(hub, clock=clock, idempotency_ttl=100)
    store.run_idempotent("k1", b"fp", deposit_op(store, "alice", 10))

    clock.now += 99
    assert store.run_idempotent("k1", b"fp", deposit_op(store, "alice", 10))[2] is True
    assert store.balance("alice") == 10

    clock.now += 2  # 101 s after the first request
    op = deposit_op(store, "alice", 10)
    _, body, replayed = store.run_idempotent("k1", b"fp", op)
    assert replayed is False and op.runs == 1 and body["balance"] == 20


def test_expired_key_accepts_a_different_request(hub, clock):
    store = MemoryStore(hub, clock=clock, idempotency_ttl=100)
    store.run_idempotent("k1", b"fp-a", deposit_op(store, "alice", 10))
    clock.now += 101
    _, body, replayed = store.run_idempotent("k1", b"fp-b", deposit_op(store, "alice", 1))
    assert not replayed and body["balance"] == 11


def test_default_ttl_is_24_hours(store, clock):
    store.run_idempotent("k1", b"fp", deposit_op(store, "alice", 10))
    clock.now += 24 * 3600 - 1
    assert store.run_idempotent("k1", b"fp", deposit_op(store, "alice", 10))[2] is True
    clock.now += 2
    assert store.run_idempotent("k1", b"fp", deposit_op(store, "alice", 10))[2] is False


def test_expired_records_are_purged(hub, clock):
    store = MemoryStore(hub, clock=clock, idempotency_ttl=100)
    for i in range(5):
        store.run_idempotent(f"old{i}", b"fp", deposit_op(store, "alice", 1))
    clock.now += 101
    store.run_idempotent("new", b"fp", deposit_op(store, "alice", 1))
    assert store.idempotency_size() == 1


def test_cap_evicts_the_oldest_first(hub, clock):
    store = MemoryStore(hub, clock=clock, idempotency_cap=3)
    for i in range(1, 5):  # k1..k4; k1 is the oldest and must go
        clock.now += 1
        store.run_idempotent(f"k{i}", b"fp", deposit_op(store, "alice", 1))
    assert store.idempotency_size() == 3
    for i in (2, 3, 4):
        op = deposit_op(store, "alice", 1)
        assert store.run_idempotent(f"k{i}", b"fp", op)[2] is True, f"k{i} should still be remembered"
        assert op.runs == 0
    op = deposit_op(store, "alice", 1)
    assert store.run_idempotent("k1", b"other-fp", op)[2] is False  # forgotten: a new request
    assert op.runs == 1
    assert store.idempotency_size() == 3
    assert store.balance("alice") == 5


def test_operation_exception_is_not_remembered_and_releases_the_lock(store):
    def boom():
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        store.run_idempotent("k1", b"fp", boom)
    assert store.idempotency_size() == 0

    # The store is still usable from another thread (the lock was released).
    done = threading.Event()
    threading.Thread(target=lambda: (store.deposit("alice", 1), done.set()), daemon=True).start()
    assert done.wait(5)
    assert store.run_idempotent("k1", b"fp", deposit_op(store, "alice", 1))[2] is False


# -- concurrency ---------------------------------------------------------------------------


@pytest.fixture
def busy_switching():
    """Switch threads very often so races have a chance to show."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


def test_concurrent_deposits_and_withdrawals_keep_the_books(hub, busy_switching):
    store = MemoryStore(hub)
    users = ["u0", "u1", "u2"]
    n_threads, ops_per_thread = 8, 500
    barrier = threading.Barrier(n_threads)
    deposited = [0] * n_threads
    withdrawn = [0] * n_threads
    refused = [0] * n_threads
    errors = []

    def worker(idx):
        rng = random.Random(idx)
        try:
            barrier.wait(JOIN_TIMEOUT)
            for _ in range(ops_per_thread):
                user = rng.choice(users)
                amount = rng.randint(1, 100)
                if rng.random() < 0.5:
                    result = store.deposit(user, amount)
                    deposited[idx] += amount
                else:
                    try:
                        result = store.withdraw(user, amount)
                    except InsufficientFunds as exc:
                        assert exc.balance < amount
                        refused[idx] += 1
                        continue
                    withdrawn[idx] += amount
                assert result["balance"] >= 0
        except Exception as exc:
            errors.append(exc)

    run_threads([lambda i=i: worker(i) for i in range(n_threads)])
    assert errors == []
    assert sum(refused) > 0, "the mix should include refused withdrawals"
    total, wallets = store.totals()
    assert total == sum(deposited) - sum(withdrawn)
    assert wallets == 3
    assert all(store.balance(u) >= 0 for u in users)

    # Replaying each user's balance events in publish order reproduces every step exactly.
    events = hub.of("balance")
    assert len(events) == n_threads * ops_per_thread - sum(refused)
    running = dict.fromkeys(users, 0)
    for event in events:
        sign = 1 if event["type"] == "deposit" else -1
        running[event["user_id"]] += sign * event["amount"]
        assert event["balance"] == running[event["user_id"]]
        assert event["balance"] >= 0
    assert running == {u: store.balance(u) for u in users}
    assert len({e["transaction_id"] for e in events}) == len(events)


def test_concurrent_settlements_and_withdrawals_never_go_negative(hub, busy_switching):
    store = MemoryStore(hub)
    store.deposit("p", 1000)
    barrier = threading.Barrier(8)
    errors = []

    def worker(idx):
        rng = random.Random(100 + idx)
        try:
            barrier.wait(JOIN_TIMEOUT)
            for _ in range(250):
                try:
                    if idx % 2:
                        store.settle("p", "g", rng.randint(0, 60), rng.randint(0, 50))
                    else:
                        store.withdraw("p", rng.randint(1, 30))
                except InsufficientFunds:
                    pass
        except Exception as exc:
            errors.append(exc)

    run_threads([lambda i=i: worker(i) for i in range(8)])
    assert errors == []
    balances = [e["balance"] for e in hub.of("balance")]
    assert min(balances) >= 0
    assert balances[-1] == store.balance("p")
    net = sum(o["net"] for o in hub.of("game_outcome"))
    assert store.leaderboard() == [{"rank": 1, "user_id": "p", "net_winnings": net}]


def test_concurrent_requests_with_one_key_apply_once(hub, busy_switching):
    store = MemoryStore(hub)
    n = 16
    barrier = threading.Barrier(n)
    runs = []
    results = [None] * n
    errors = []

    def operation():
        runs.append(threading.get_ident())
        return 200, store.deposit("alice", 100)

    def worker(idx):
        try:
            barrier.wait(JOIN_TIMEOUT)
            results[idx] = store.run_idempotent("same-key", b"fp", operation)
        except Exception as exc:
            errors.append(exc)

    run_threads([lambda i=i: worker(i) for i in range(n)])
    assert errors == []
    assert len(runs) == 1
    assert store.balance("alice") == 100
    assert len(store.transactions("alice")) == 1
    assert len(hub.of("balance")) == 1
    bodies = {(status, tuple(sorted(body.items()))) for status, body, _ in results}
    assert len(bodies) == 1
    assert sorted(replayed for _, _, replayed in results) == [False] + [True] * (n - 1)
