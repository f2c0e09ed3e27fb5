"""The store contract: money moves, ledgers, settlement, events, idempotency and concurrency.

Every test taking the `store` fixture runs against each implementation of the Store Protocol
(MemoryStore, and RedisStore against a private redis-server), so the two cannot drift. `events`
records what the store published: the sink calls of MemoryStore, the stream entries of RedisStore.
Tests that need a controllable clock use MemoryStore directly (the Redis store takes the server's
time; its TTL is tested in test_redis_store.py).
"""

import copy
import json
import logging
import random
import re
import sys
import threading
from datetime import UTC, datetime

import pytest

from redis_server import redis_server, unique_prefix  # noqa: F401  (fixture, requested lazily)
from validation import INT64_MAX, INT64_MIN
from wallet_store import (
    BalanceLimitExceeded,
    Idempotency,
    IdempotencyKeyReused,
    InsufficientFunds,
    MemoryStore,
    Result,
    WalletError,
)

RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")
JOIN_TIMEOUT = 60
BACKENDS = ["memory", "redis"]


class Events:
    """What a store published, as (kind, data, user_id) in publish order."""

    def all(self) -> list[tuple]:
        raise NotImplementedError

    def mark(self) -> int:
        return len(self.all())

    def since(self, mark: int) -> list[tuple]:
        return self.all()[mark:]

    def kinds(self, since: int = 0) -> list[str]:
        return [kind for kind, _, _ in self.since(since)]

    def of(self, kind: str, since: int = 0) -> list[dict]:
        return [data for k, data, _ in self.since(since) if k == kind]


class RecordingHub(Events):
    """An EventSink; data is deep-copied so later mutation by the store would show."""

    def __init__(self):
        self._lock = threading.Lock()
        self.calls = []

    def publish(self, kind, data, user_id=None):
        with self._lock:
            self.calls.append((kind, copy.deepcopy(data), user_id))

    def all(self):
        with self._lock:
            return list(self.calls)


class StreamEvents(Events):
    """The events a RedisStore appended to its stream `{prefix}events`, checking the ids are the seq."""

    def __init__(self, client, prefix):
        self.client = client
        self.key = prefix + "events"

    def all(self):
        out = []
        for seq, (entry_id, fields) in enumerate(self.client.xrange(self.key), start=1):
            assert entry_id == f"{seq}-0".encode(), "stream entry ids are the seq, from 1, without gaps"
            user = fields.get(b"u")
            out.append((fields[b"k"].decode(), json.loads(fields[b"d"]), user.decode() if user else None))
        return out


class FakeClock:
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def make_store(backend, request):
    """make_store(**options) -> (store, events) of the current backend; options as MemoryStore's."""
    made = []

    def make(**options):
        if backend == "memory":
            events = RecordingHub()
            store = MemoryStore(events, **options)
        else:
            from redis_store import RedisStore

            server = request.getfixturevalue("redis_server")
            prefix = unique_prefix()
            store = RedisStore(server.client(), prefix, **options)
            events = StreamEvents(server.client(), prefix)
        made.append(store)
        return store, events

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store_and_events(make_store):
    return make_store()


@pytest.fixture
def store(store_and_events):
    return store_and_events[0]


@pytest.fixture
def events(store_and_events):
    return store_and_events[1]


@pytest.fixture
def clock():
    return FakeClock()


def idem(key, fp=b"fp"):
    return Idempotency(key, fp)


def run_threads(targets):
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
        assert not t.is_alive(), "worker thread hung"


def ledger(store, user, limit=1000):
    return [(t["type"], t["amount"], t["balance"]) for t in store.transactions(user, limit)]


# -- deposit, withdraw, balance -------------------------------------------------


def test_unknown_user_has_zero_balance_and_no_transactions(store):
    assert store.balance("nobody") == 0
    assert store.transactions("nobody") == []
    assert store.leaderboard() == []
    assert store.healthy() is True


def test_writes_return_a_result_that_is_not_a_replay(store):
    result = store.deposit("alice", 5)
    assert isinstance(result, Result) and result.replayed is False


def test_deposit_and_withdraw_move_the_balance(store):
    r1 = store.deposit("alice", 500).body
    assert r1["user_id"] == "alice" and r1["balance"] == 500
    r2 = store.withdraw("alice", 200).body
    assert r2 == {"user_id": "alice", "balance": 300, "transaction_id": r2["transaction_id"]}
    assert r1["transaction_id"] != r2["transaction_id"]
    assert store.balance("alice") == 300
    assert store.balance("bob") == 0


def test_withdraw_everything_leaves_zero(store):
    store.deposit("alice", 10)
    assert store.withdraw("alice", 10).body["balance"] == 0
    assert store.balance("alice") == 0


def test_insufficient_funds_carries_the_balance_and_changes_nothing(store, events):
    store.deposit("alice", 100)
    ledger_before = store.transactions("alice")
    mark = events.mark()
    with pytest.raises(InsufficientFunds) as info:
        store.withdraw("alice", 101)
    err = info.value
    assert err.balance == 100 and err.replayed is False
    assert err.code == "insufficient_funds" and err.http_status == 409
    assert err.body() == {"error": "insufficient_funds", "message": "not enough money", "balance": 100}
    assert store.balance("alice") == 100
    assert store.transactions("alice") == ledger_before
    assert events.since(mark) == []


def test_withdraw_from_unknown_user_refused_with_balance_zero(store, events):
    with pytest.raises(InsufficientFunds) as info:
        store.withdraw("ghost", 1)
    assert info.value.balance == 0
    assert store.transactions("ghost") == []
    assert events.all() == []


def test_deposit_up_to_int64_max_is_allowed(store):
    assert store.deposit("rich", INT64_MAX).body["balance"] == INT64_MAX
    assert store.balance("rich") == INT64_MAX
    assert ledger(store, "rich") == [("deposit", INT64_MAX, INT64_MAX)]


def test_balance_limit_exceeded_changes_nothing(store, events):
    store.deposit("rich", INT64_MAX - 5)
    ledger_before = store.transactions("rich")
    mark = events.mark()
    with pytest.raises(BalanceLimitExceeded) as info:
        store.deposit("rich", 6)
    assert info.value.http_status == 409
    assert info.value.body()["error"] == "balance_limit_exceeded"
    assert store.balance("rich") == INT64_MAX - 5
    assert store.transactions("rich") == ledger_before
    assert events.since(mark) == []
    # Exactly reaching the maximum still works.
    assert store.deposit("rich", 5).body["balance"] == INT64_MAX


def test_balances_near_the_limit_are_exact(store):
    # 2^53 + 1 is where doubles stop being exact: a store computing in floating point drifts here.
    store.deposit("big", 2**53 + 1)
    store.deposit("big", 2)
    assert store.balance("big") == 2**53 + 3
    store.deposit("big", INT64_MAX - 2**53 - 3)
    assert store.balance("big") == INT64_MAX
    assert store.withdraw("big", 1).body["balance"] == INT64_MAX - 1
    assert store.transactions("big", 1)[0]["balance"] == INT64_MAX - 1


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


def test_ledger_keeps_the_newest_1000_by_default(store):
    for i in range(1, 1006):
        store.deposit("alice", i)
    txs = store.transactions("alice", limit=1000)
    assert len(txs) == 1000
    assert txs[0]["amount"] == 1005
    assert txs[-1]["amount"] == 6
    assert len(store.transactions("alice", limit=5000)) == 1000
    # The balance is unaffected by trimming the ledger.
    assert store.balance("alice") == sum(range(1, 1006))


def test_ledger_limit_is_an_option(make_store):
    store, _ = make_store(ledger_limit=3)
    for i in range(1, 6):
        store.deposit("alice", i)
    assert [t["amount"] for t in store.transactions("alice", 10)] == [5, 4, 3]


def test_ledgers_are_per_user(store):
    store.deposit("alice", 1)
    store.deposit("bob", 2)
    assert [t["amount"] for t in store.transactions("alice")] == [1]
    assert [t["amount"] for t in store.transactions("bob")] == [2]


def test_created_at_is_rfc3339_utc_and_now(store):
    before = datetime.now(UTC)
    store.deposit("alice", 1)
    created = store.transactions("alice")[0]["created_at"]
    assert RFC3339_UTC.fullmatch(created), created
    parsed = datetime.fromisoformat(created.replace("Z", "+00:00"))
    assert abs((parsed - before).total_seconds()) < 60


@pytest.mark.parametrize("ts", [0.0, 0.9999995, 0.4999995, 1.0000005, 1_700_000_000.25, 1_795_970_150.9999996,
                                1_795_970_150.0000004, 2**31 + 0.5e-6, 4_102_444_799.999999])
def test_rfc3339_is_what_datetime_gives_to_the_microsecond(ts):
    from wallet_store import rfc3339
    # rfc3339 formats the second once and the microseconds itself: rounding at the edges must agree.
    for t in (ts, ts + random.uniform(0, 1)):
        assert rfc3339(t) == datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def test_created_at_follows_the_store_clock(clock):
    store = MemoryStore(RecordingHub(), clock=clock)
    clock.now = 1_700_000_000.25
    store.deposit("alice", 1)
    created = store.transactions("alice")[0]["created_at"]
    assert RFC3339_UTC.fullmatch(created), created
    parsed = datetime.fromisoformat(created.replace("Z", "+00:00"))
    assert parsed == datetime.fromtimestamp(1_700_000_000.25, UTC)


# -- settlement ----------------------------------------------------------------------


def test_settle_writes_bet_then_win_and_returns_the_outcome(store):
    store.deposit("alice", 100)
    outcome = store.settle("alice", "slots", 30, 75).body
    assert outcome == {
        "outcome_id": outcome["outcome_id"], "user_id": "alice", "game": "slots",
        "bet": 30, "payout": 75, "net": 45, "balance": 145,
    }
    assert store.balance("alice") == 145
    assert ledger(store, "alice", 2) == [("win", 75, 145), ("bet", 30, 70)]
    assert store.leaderboard() == [{"rank": 1, "user_id": "alice", "net_winnings": 45}]


def test_settle_losing_round_writes_only_bet(store):
    store.deposit("alice", 100)
    outcome = store.settle("alice", "poker", 100, 0).body
    assert outcome["net"] == -100 and outcome["balance"] == 0
    assert ledger(store, "alice") == [("bet", 100, 0), ("deposit", 100, 100)]
    assert store.leaderboard() == [{"rank": 1, "user_id": "alice", "net_winnings": -100}]


def test_settle_free_round_writes_only_win(store):
    outcome = store.settle("alice", "bonus", 0, 40).body
    assert outcome["balance"] == 40
    assert ledger(store, "alice") == [("win", 40, 40)]


def test_settle_zero_zero_writes_nothing_but_counts_as_played(store, events):
    outcome = store.settle("alice", "slots", 0, 0).body
    assert outcome["net"] == 0 and outcome["balance"] == 0
    assert store.transactions("alice") == []
    assert events.of("balance") == []
    assert store.leaderboard() == [{"rank": 1, "user_id": "alice", "net_winnings": 0}]
    assert events.kinds() == ["game_outcome", "leaderboard"]


def test_settle_bet_larger_than_balance_refused_and_changes_nothing(store, events):
    store.deposit("alice", 10)
    mark = events.mark()
    with pytest.raises(InsufficientFunds) as info:
        store.settle("alice", "slots", 11, 1000)
    assert info.value.balance == 10
    assert store.balance("alice") == 10
    assert [t["type"] for t in store.transactions("alice")] == ["deposit"]
    assert store.leaderboard() == []
    assert events.since(mark) == []


def test_settle_bet_equal_to_balance_is_allowed(store):
    store.deposit("alice", 10)
    assert store.settle("alice", "slots", 10, 0).body["balance"] == 0


def test_settle_over_the_balance_limit_refused_and_changes_nothing(store, events):
    store.deposit("alice", INT64_MAX - 10)
    mark = events.mark()
    with pytest.raises(BalanceLimitExceeded):
        store.settle("alice", "slots", 5, 16)
    assert store.balance("alice") == INT64_MAX - 10
    assert [t["type"] for t in store.transactions("alice")] == ["deposit"]
    assert store.leaderboard() == []
    assert events.since(mark) == []
    # net +10 lands exactly on the maximum
    assert store.settle("alice", "slots", 5, 15).body["balance"] == INT64_MAX
    assert ledger(store, "alice", 2) == [("win", 15, INT64_MAX), ("bet", 5, INT64_MAX - 15)]


def test_outcome_ids_are_unique(store):
    ids = {store.settle("alice", "g", 0, 0).body["outcome_id"] for _ in range(5)}
    assert len(ids) == 5


# -- net winnings within 64 bits (issue 16) -----------------------------------------------


def climb_net(store, user, target):
    """Bring a player's net winnings to `target` (>= 0) with free wins and withdrawals in between."""
    remaining = target
    while remaining:
        step = min(remaining, INT64_MAX)
        store.settle(user, "g", 0, step)
        store.withdraw(user, step)
        remaining -= step


def net_of(store, user):
    return next((row["net_winnings"] for row in store.leaderboard() if row["user_id"] == user), None)


def assert_refused_changing_nothing(store, events, user, attempt):
    balance, txs, board, mark = store.balance(user), store.transactions(user, 1000), store.leaderboard(), events.mark()
    with pytest.raises(BalanceLimitExceeded) as info:
        attempt()
    assert info.value.code == "balance_limit_exceeded" and info.value.http_status == 409
    assert "net winnings" in info.value.message
    assert store.balance(user) == balance
    assert store.transactions(user, 1000) == txs
    assert store.leaderboard() == board
    assert events.since(mark) == []


def test_net_winnings_up_to_int64_max_accepted_one_more_refused(store, events):
    climb_net(store, "lucky", INT64_MAX - 1)
    assert net_of(store, "lucky") == INT64_MAX - 1
    assert store.balance("lucky") == 0
    # Exactly 2^63-1 is accepted.
    outcome = store.settle("lucky", "g", 0, 1).body
    assert outcome["net"] == 1 and outcome["balance"] == 1
    assert net_of(store, "lucky") == INT64_MAX
    # One cent more would leave the range: refused, nothing changed.
    assert_refused_changing_nothing(store, events, "lucky", lambda: store.settle("lucky", "g", 0, 1))
    assert_refused_changing_nothing(store, events, "lucky", lambda: store.settle("lucky", "g", 1, 2))
    # A losing round is still fine, and after it the win fits again.
    store.settle("lucky", "g", 1, 0)
    assert net_of(store, "lucky") == INT64_MAX - 1
    store.settle("lucky", "g", 0, 1)
    assert net_of(store, "lucky") == INT64_MAX


def test_net_winnings_down_to_int64_min_accepted_one_more_refused(store, events):
    # Lose INT64_MAX (deposit, bet it all), then 1 more: net = -2^63 exactly.
    store.deposit("unlucky", INT64_MAX)
    store.settle("unlucky", "g", INT64_MAX, 0)
    assert net_of(store, "unlucky") == INT64_MIN + 1
    store.deposit("unlucky", 10)
    store.settle("unlucky", "g", 1, 0)
    assert net_of(store, "unlucky") == INT64_MIN
    assert store.balance("unlucky") == 9
    assert_refused_changing_nothing(store, events, "unlucky", lambda: store.settle("unlucky", "g", 1, 0))
    assert_refused_changing_nothing(store, events, "unlucky", lambda: store.settle("unlucky", "g", 3, 1))
    # A round that does not lower the net still settles.
    assert store.settle("unlucky", "g", 3, 3).body["net"] == 0
    assert net_of(store, "unlucky") == INT64_MIN


def test_net_limit_refusal_is_remembered_under_its_key(store):
    climb_net(store, "lucky", INT64_MAX)
    with pytest.raises(BalanceLimitExceeded) as first:
        store.settle("lucky", "g", 0, 1, idem=idem("net-k"))
    assert first.value.replayed is False
    with pytest.raises(BalanceLimitExceeded) as again:
        store.settle("lucky", "g", 0, 1, idem=idem("net-k"))
    assert again.value.replayed is True
    assert again.value.body() == first.value.body()


def test_leaderboard_ranks_exactly_at_the_64_bit_edge(store):
    climb_net(store, "b_max", INT64_MAX)
    climb_net(store, "a_below", INT64_MAX - 1)
    climb_net(store, "c_below2", INT64_MAX - 2)
    store.settle("d_zero", "g", 0, 0)
    store.deposit("e_min", INT64_MAX)
    store.settle("e_min", "g", INT64_MAX, 0)
    store.deposit("e_min", 1)
    store.settle("e_min", "g", 1, 0)
    store.deposit("f_min1", INT64_MAX)
    store.settle("f_min1", "g", INT64_MAX, 0)
    # Doubles cannot tell these apart; an exact store ranks by the integers, not by the user ids.
    assert [(r["rank"], r["user_id"], r["net_winnings"]) for r in store.leaderboard()] == [
        (1, "b_max", INT64_MAX),
        (2, "a_below", INT64_MAX - 1),
        (3, "c_below2", INT64_MAX - 2),
        (4, "d_zero", 0),
        (5, "f_min1", INT64_MIN + 1),
        (6, "e_min", INT64_MIN),
    ]


def test_leaderboard_event_carries_exact_edge_values(store, events):
    climb_net(store, "edge", INT64_MAX)
    board = events.of("leaderboard")[-1]["leaderboard"]
    assert board == [{"rank": 1, "user_id": "edge", "net_winnings": INT64_MAX}]
    outcome = events.of("game_outcome")[-1]
    assert outcome["user_id"] == "edge"


# -- events ------------------------------------------------------------------------------


def test_deposit_and_withdraw_publish_one_balance_event_each(store, events):
    d = store.deposit("alice", 100).body
    w = store.withdraw("alice", 40).body
    (k1, e1, u1), (k2, e2, u2) = events.all()
    assert (k1, u1, k2, u2) == ("balance", "alice", "balance", "alice")
    assert RFC3339_UTC.fullmatch(e1.pop("timestamp")) and RFC3339_UTC.fullmatch(e2.pop("timestamp"))
    assert e1 == {"user_id": "alice", "balance": 100, "transaction_id": d["transaction_id"],
                  "type": "deposit", "amount": 100}
    assert e2 == {"user_id": "alice", "balance": 60, "transaction_id": w["transaction_id"],
                  "type": "withdraw", "amount": 40}


def test_event_timestamps_match_the_ledger(store, events):
    store.deposit("alice", 7)
    assert events.of("balance")[0]["timestamp"] == store.transactions("alice")[0]["created_at"]


def test_balance_event_timestamp_follows_the_store_clock(clock):
    hub = RecordingHub()
    store = MemoryStore(hub, clock=clock)
    clock.now = 1_700_000_000.0
    store.deposit("alice", 100)
    assert hub.of("balance")[0]["timestamp"] == "2023-11-14T22:13:20.000000Z"


def test_settle_events_balance_per_entry_in_order_then_outcome_then_leaderboard(store, events):
    store.deposit("alice", 100)
    mark = events.mark()
    outcome = store.settle("alice", "slots", 30, 75).body
    assert events.kinds(mark) == ["balance", "balance", "game_outcome", "leaderboard"]
    (_, bet, uid1), (_, win, uid2), (_, game, uid3), (_, board, uid4) = events.since(mark)
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


def test_leaderboard_event_only_when_the_top_ten_changes(store, events):
    for i in range(10):
        store.settle(f"top{i}", "g", 0, 1000 + i)
    assert len(events.of("leaderboard")) == 10

    # An 11th player who does not make the top 10: outcome published, leaderboard not.
    mark = events.mark()
    store.settle("outsider", "g", 0, 5)
    assert events.kinds(mark) == ["balance", "game_outcome"]

    # A zero-net round for a member changes nothing visible.
    mark = events.mark()
    store.settle("top3", "g", 0, 0)
    assert events.kinds(mark) == ["game_outcome"]

    # A member's score changes without a change of order: still a new board.
    mark = events.mark()
    store.settle("top9", "g", 0, 1)
    assert events.kinds(mark) == ["balance", "game_outcome", "leaderboard"]

    # The outsider climbs into the top 10: leaderboard published with the new board.
    mark = events.mark()
    store.settle("outsider", "g", 0, 2000)
    assert events.kinds(mark) == ["balance", "game_outcome", "leaderboard"]
    board = events.of("leaderboard", mark)[0]["leaderboard"]
    assert board[0] == {"rank": 1, "user_id": "outsider", "net_winnings": 2005}
    assert "top0" not in [row["user_id"] for row in board]
    assert board == store.leaderboard()
    assert len(board) == 10


def test_leaderboard_ties_by_user_id_ascending(store):
    for user in ["carol", "alice", "Bob", "_x", "-y", "alice2"]:
        store.settle(user, "g", 0, 10)
    assert [row["user_id"] for row in store.leaderboard()] == ["-y", "Bob", "_x", "alice", "alice2", "carol"]
    assert [row["rank"] for row in store.leaderboard()] == [1, 2, 3, 4, 5, 6]


def test_refused_operations_publish_nothing(store, events):
    store.deposit("alice", 5)
    store.deposit("max", INT64_MAX)
    mark = events.mark()
    for attempt in (
        lambda: store.withdraw("alice", 6),
        lambda: store.settle("alice", "g", 6, 0),
        lambda: store.deposit("max", 1),
        lambda: store.settle("max", "g", 0, 1),
    ):
        with pytest.raises((InsufficientFunds, BalanceLimitExceeded)):
            attempt()
    assert events.since(mark) == []


# -- idempotency --------------------------------------------------------------------------


def test_replay_returns_first_answer_and_does_not_run_again(store, events):
    first = store.deposit("alice", 100, idem=idem("k1"))
    assert first.replayed is False and first.body["balance"] == 100
    mark = events.mark()

    again = store.deposit("alice", 100, idem=idem("k1"))
    assert again == Result(first.body, True)
    assert store.balance("alice") == 100
    assert len(store.transactions("alice")) == 1
    assert events.since(mark) == []


def test_replay_of_settle_and_withdraw(store):
    store.deposit("alice", 100)
    w = store.withdraw("alice", 10, idem=idem("w"))
    s = store.settle("alice", "dice", 20, 5, idem=idem("s"))
    assert store.withdraw("alice", 10, idem=idem("w")) == Result(w.body, True)
    assert store.settle("alice", "dice", 20, 5, idem=idem("s")) == Result(s.body, True)
    assert store.balance("alice") == 75
    assert store.leaderboard() == [{"rank": 1, "user_id": "alice", "net_winnings": -15}]


def test_same_key_different_fingerprint_is_rejected(store):
    store.deposit("alice", 100, idem=idem("k1", b"fp-a"))
    with pytest.raises(IdempotencyKeyReused) as info:
        store.deposit("alice", 100, idem=idem("k1", b"fp-b"))
    assert info.value.http_status == 422
    assert info.value.body()["error"] == "idempotency_key_reused"
    assert store.balance("alice") == 100


def test_keys_are_global_across_operations(store):
    store.deposit("alice", 100, idem=idem("k1", b"deposit-fp"))
    with pytest.raises(IdempotencyKeyReused):
        store.withdraw("alice", 1, idem=idem("k1", b"withdraw-fp"))
    with pytest.raises(IdempotencyKeyReused):
        store.settle("alice", "g", 1, 0, idem=idem("k1", b"settle-fp"))
    assert store.balance("alice") == 100


def test_fingerprints_are_opaque_bytes(store):
    binary = bytes(range(256))
    store.deposit("alice", 1, idem=idem("bin", binary))
    assert store.deposit("alice", 1, idem=idem("bin", binary)).replayed is True
    with pytest.raises(IdempotencyKeyReused):
        store.deposit("alice", 1, idem=idem("bin", binary[:-1]))


def test_different_keys_are_independent(store):
    store.deposit("alice", 100, idem=idem("k1"))
    result = store.deposit("alice", 100, idem=idem("k2"))
    assert not result.replayed and result.body["balance"] == 200


def test_refusal_409_is_remembered(store, events):
    with pytest.raises(InsufficientFunds) as first:
        store.withdraw("alice", 50, idem=idem("k1"))
    assert first.value.replayed is False
    assert first.value.body() == {"error": "insufficient_funds", "message": "not enough money", "balance": 0}

    store.deposit("alice", 100)  # would succeed now, but the key replays the first answer
    mark = events.mark()
    with pytest.raises(InsufficientFunds) as again:
        store.withdraw("alice", 50, idem=idem("k1"))
    assert again.value.replayed is True
    assert again.value.body() == first.value.body()
    assert again.value.http_status == 409
    assert store.balance("alice") == 100
    assert events.since(mark) == []
    # The remembered refusal is still bound to its fingerprint.
    with pytest.raises(IdempotencyKeyReused):
        store.withdraw("alice", 50, idem=idem("k1", b"other"))


def test_balance_limit_refusal_is_remembered(store):
    store.deposit("max", INT64_MAX)
    with pytest.raises(BalanceLimitExceeded):
        store.deposit("max", 1, idem=idem("k1"))
    store.withdraw("max", 10)
    with pytest.raises(BalanceLimitExceeded) as again:
        store.deposit("max", 1, idem=idem("k1"))
    assert again.value.replayed is True
    assert store.balance("max") == INT64_MAX - 10


def test_refused_key_reuse_is_not_remembered(store):
    store.deposit("alice", 1, idem=idem("k1", b"a"))
    for _ in range(2):
        with pytest.raises(IdempotencyKeyReused) as info:
            store.deposit("alice", 1, idem=idem("k1", b"b"))
        assert info.value.replayed is False
    assert store.deposit("alice", 1, idem=idem("k1", b"a")).replayed is True


def test_cap_evicts_the_oldest_first(make_store, caplog):
    store, _ = make_store(idempotency_cap=3)
    for i in range(1, 5):  # k1..k4; k1 is the oldest and must go
        store.deposit("alice", 1, idem=idem(f"k{i}"))
    assert store.idempotency_size() == 3
    for i in (2, 3, 4):
        assert store.deposit("alice", 1, idem=idem(f"k{i}")).replayed is True, f"k{i} should still be remembered"
    assert store.balance("alice") == 4
    result = store.deposit("alice", 1, idem=idem("k1", b"other-fp"))  # forgotten: a new request
    assert result.replayed is False
    assert store.idempotency_size() == 3
    assert store.balance("alice") == 5


def test_cap_eviction_of_a_young_key_logs_a_warning(make_store, caplog):
    store, _ = make_store(idempotency_cap=2)
    with caplog.at_level(logging.WARNING, logger="wallet.store"):
        store.deposit("alice", 1, idem=idem("a"))
        store.deposit("alice", 1, idem=idem("b"))
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        store.deposit("alice", 1, idem=idem("c"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "idempotency cap of 2 keys" in warnings[0].getMessage()


def test_records_expire_after_the_ttl(clock):
    store = MemoryStore(RecordingHub(), clock=clock, idempotency_ttl=100)
    store.deposit("alice", 10, idem=idem("k1"))

    clock.now += 99
    assert store.deposit("alice", 10, idem=idem("k1")).replayed is True
    assert store.balance("alice") == 10

    clock.now += 2  # 101 s after the first request
    result = store.deposit("alice", 10, idem=idem("k1"))
    assert result.replayed is False and result.body["balance"] == 20


def test_expired_key_accepts_a_different_request(clock):
    store = MemoryStore(RecordingHub(), clock=clock, idempotency_ttl=100)
    store.deposit("alice", 10, idem=idem("k1", b"fp-a"))
    clock.now += 101
    result = store.deposit("alice", 1, idem=idem("k1", b"fp-b"))
    assert not result.replayed and result.body["balance"] == 11


def test_default_ttl_is_24_hours(clock):
    store = MemoryStore(RecordingHub(), clock=clock)
    store.deposit("alice", 10, idem=idem("k1"))
    clock.now += 24 * 3600 - 1
    assert store.deposit("alice", 10, idem=idem("k1")).replayed is True
    clock.now += 2
    assert store.deposit("alice", 10, idem=idem("k1")).replayed is False


def test_expired_records_are_purged(clock):
    store = MemoryStore(RecordingHub(), clock=clock, idempotency_ttl=100)
    for i in range(5):
        store.deposit("alice", 1, idem=idem(f"old{i}"))
    clock.now += 101
    store.deposit("alice", 1, idem=idem("new"))
    assert store.idempotency_size() == 1


def test_expired_keys_are_not_evicted_with_a_warning(clock, caplog):
    store = MemoryStore(RecordingHub(), clock=clock, idempotency_ttl=100, idempotency_cap=2)
    with caplog.at_level(logging.WARNING, logger="wallet.store"):
        store.deposit("alice", 1, idem=idem("a"))
        store.deposit("alice", 1, idem=idem("b"))
        clock.now += 101
        store.deposit("alice", 1, idem=idem("c"))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert store.idempotency_size() == 1


def test_cap_warning_says_how_early_the_key_was_forgotten(clock, caplog):
    store = MemoryStore(RecordingHub(), clock=clock, idempotency_cap=1)
    with caplog.at_level(logging.WARNING, logger="wallet.store"):
        store.deposit("alice", 1, idem=idem("a"))
        clock.now += 3600
        store.deposit("alice", 1, idem=idem("b"))
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "82800 s before its 24 h expiry" in warning.getMessage()


# -- concurrency ---------------------------------------------------------------------------


@pytest.fixture
def busy_switching():
    """Switch threads very often so races have a chance to show."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


def test_concurrent_deposits_and_withdrawals_keep_the_books(store, events, busy_switching):
    users = ["u0", "u1", "u2"]
    n_threads, ops_per_thread = 8, 250
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
                    result = store.deposit(user, amount).body
                    deposited[idx] += amount
                else:
                    try:
                        result = store.withdraw(user, amount).body
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
    assert sum(store.balance(u) for u in users) == sum(deposited) - sum(withdrawn)
    assert all(store.balance(u) >= 0 for u in users)

    # Replaying each user's balance events in publish order reproduces every step exactly.
    balance_events = events.of("balance")
    assert len(balance_events) == n_threads * ops_per_thread - sum(refused)
    running = dict.fromkeys(users, 0)
    for event in balance_events:
        sign = 1 if event["type"] == "deposit" else -1
        running[event["user_id"]] += sign * event["amount"]
        assert event["balance"] == running[event["user_id"]]
        assert event["balance"] >= 0
    assert running == {u: store.balance(u) for u in users}
    assert len({e["transaction_id"] for e in balance_events}) == len(balance_events)


def test_concurrent_settlements_and_withdrawals_never_go_negative(store, events, busy_switching):
    store.deposit("p", 1000)
    barrier = threading.Barrier(8)
    errors = []

    def worker(idx):
        rng = random.Random(100 + idx)
        try:
            barrier.wait(JOIN_TIMEOUT)
            for _ in range(120):
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
    balances = [e["balance"] for e in events.of("balance")]
    assert min(balances) >= 0
    assert balances[-1] == store.balance("p")
    net = sum(o["net"] for o in events.of("game_outcome"))
    assert store.leaderboard() == [{"rank": 1, "user_id": "p", "net_winnings": net}]


def test_concurrent_requests_with_one_key_apply_once(store, events, busy_switching):
    n = 16
    barrier = threading.Barrier(n)
    results = [None] * n
    errors = []

    def worker(idx):
        try:
            barrier.wait(JOIN_TIMEOUT)
            results[idx] = store.deposit("alice", 100, idem=idem("same-key"))
        except Exception as exc:
            errors.append(exc)

    run_threads([lambda i=i: worker(i) for i in range(n)])
    assert errors == []
    assert store.balance("alice") == 100
    assert len(store.transactions("alice")) == 1
    assert len(events.of("balance")) == 1
    assert len({tuple(sorted(r.body.items())) for r in results}) == 1
    assert sorted(r.replayed for r in results) == [False] + [True] * (n - 1)


def test_concurrent_refusals_with_one_key_are_replayed(store, busy_switching):
    n = 8
    barrier = threading.Barrier(n)
    outcomes = []

    def worker():
        barrier.wait(JOIN_TIMEOUT)
        try:
            store.withdraw("nobody", 1, idem=idem("refused-key"))
        except WalletError as exc:
            outcomes.append((type(exc), exc.replayed))

    run_threads([worker] * n)
    assert sorted(outcomes, key=lambda o: o[1]) == [(InsufficientFunds, False)] + [(InsufficientFunds, True)] * (n - 1)
