"""Redis-specific behaviour of redis_store.py against private redis-servers (tests/redis_server.py).

The Store contract itself runs against Redis in test_store.py and test_store_model.py; here: exact
64-bit values in Redis, several clients (as several processes would be), TTLs, Redis going away and
coming back, start-up errors, and the event reader that feeds a process's hub.
"""

import os
import signal
import threading
import time

import pytest

import redis_store
from conftest import wait_for
from redis_server import RedisServer, own_redis_server, redis_server, unique_prefix  # noqa: F401  (fixtures)
from redis_store import RedisEventReader, RedisStartupError, RedisStore, open_redis
from validation import INT64_MAX, INT64_MIN
from wallet_store import Idempotency, InsufficientFunds, StoreUnavailable

JOIN_TIMEOUT = 60


class FakeHub:
    """Records what a reader hands over, in the EventHub's feed/preload/reset signatures."""

    def __init__(self):
        self._lock = threading.Lock()
        self.calls = []
        self.gate = threading.Event()  # cleared: feed() waits (to make the reader fall behind on purpose)
        self.gate.set()
        self.entered = threading.Event()  # feed() was called at least once

    def follow(self, head):
        self.head = head

    def preload(self, events, epoch, last_seq, *, board=None):
        with self._lock:
            self.calls.append(("preload", list(events), epoch, last_seq, board))

    def reset(self, epoch, last_seq, *, board=None):
        with self._lock:
            self.calls.append(("reset", epoch, last_seq, board))

    def feed(self, seq, kind, data, user_id=None):
        self.entered.set()
        self.gate.wait(JOIN_TIMEOUT)
        with self._lock:
            self.calls.append(("feed", seq, kind, data, user_id))

    def of(self, action):
        with self._lock:
            return [c for c in self.calls if c[0] == action]

    def fed_seqs(self):
        return [c[1] for c in self.of("feed")]


def run_threads(targets):
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
        assert not t.is_alive(), "worker thread hung"


@pytest.fixture
def prefix():
    return unique_prefix()


@pytest.fixture
def stores(redis_server, prefix):  # noqa: F811
    """Two stores on two clients (two connection pools), as two processes would have."""
    made = [RedisStore(redis_store.connect(redis_server.url), prefix) for _ in range(2)]
    yield made
    for store in made:
        store.close()


@pytest.fixture
def readers():
    started = []

    def start(url, prefix, hub, **options):
        reader = RedisEventReader(lambda: redis_store.connect(url, socket_timeout=3.0), prefix, hub, **options)
        started.append(reader.start())
        return reader

    yield start
    for reader in started:
        reader.stop()


# -- exact 64-bit values -------------------------------------------------------------------------


def test_balance_at_int64_max_is_stored_exactly(stores, redis_server, prefix):  # noqa: F811
    store = stores[0]
    store.deposit("rich", INT64_MAX - 1)
    store.deposit("rich", 1)
    raw = redis_server.client()
    assert raw.get(prefix + "bal:rich") == b"9223372036854775807"
    assert store.balance("rich") == INT64_MAX
    assert stores[1].balance("rich") == INT64_MAX
    # Each ledger entry and event carries the exact integer (no 9.2233720368548e+18 anywhere).
    assert all(b"e+" not in row for row in raw.lrange(prefix + "ledger:rich", 0, -1))
    assert [e[1][b"d"].count(b"9223372036854775807") for e in raw.xrange(prefix + "events")] == [0, 1]


def test_net_winnings_edges_are_exact_in_redis(stores, redis_server, prefix):  # noqa: F811
    store = stores[0]
    store.settle("top", "g", 0, INT64_MAX)
    store.withdraw("top", INT64_MAX)
    store.deposit("bottom", INT64_MAX)
    store.settle("bottom", "g", INT64_MAX, 0)
    store.deposit("bottom", 1)
    store.settle("bottom", "g", 1, 0)
    raw = redis_server.client()
    assert raw.hget(prefix + "net", "top") == b"9223372036854775807"
    assert raw.hget(prefix + "net", "bottom") == b"-9223372036854775808"
    assert stores[1].leaderboard() == [
        {"rank": 1, "user_id": "top", "net_winnings": INT64_MAX},
        {"rank": 2, "user_id": "bottom", "net_winnings": INT64_MIN},
    ]


def test_amounts_outside_int64_never_reach_redis(stores):
    for bad in (0, -1, INT64_MAX + 1, 1.0, True, "5"):
        with pytest.raises(ValueError):
            stores[0].deposit("alice", bad)
    with pytest.raises(ValueError):
        stores[0].settle("alice", "g", -1, 0)
    assert stores[0].balance("alice") == 0


# -- several clients -----------------------------------------------------------------------------


def test_concurrent_withdrawals_through_two_clients_never_overdraw(stores):
    stores[0].deposit("shared", 1000)
    n_threads, attempts = 16, 20
    barrier = threading.Barrier(n_threads)
    taken, refused, errors = [], [], []

    def worker(idx):
        store = stores[idx % 2]
        try:
            barrier.wait(JOIN_TIMEOUT)
            for _ in range(attempts):
                try:
                    taken.append(store.withdraw("shared", 7).body["balance"])
                except InsufficientFunds as exc:
                    refused.append(exc.balance)
        except Exception as exc:
            errors.append(exc)

    run_threads([lambda i=i: worker(i) for i in range(n_threads)])
    assert errors == []
    assert len(taken) == 1000 // 7  # every 7 that was there was taken, and not one more
    assert sorted(taken, reverse=True) == [1000 - 7 * i for i in range(1, len(taken) + 1)]
    assert all(balance < 7 for balance in refused)
    assert stores[1].balance("shared") == 1000 % 7
    assert len(stores[1].transactions("shared", 1000)) == 1 + len(taken)


def test_one_key_from_many_threads_and_two_clients_applies_once(stores):
    n = 24
    barrier = threading.Barrier(n)
    results, errors = [], []

    def worker(idx):
        try:
            barrier.wait(JOIN_TIMEOUT)
            results.append(stores[idx % 2].settle("p", "dice", 0, 50, idem=Idempotency("one-key", b"fp")))
        except Exception as exc:
            errors.append(exc)

    run_threads([lambda i=i: worker(i) for i in range(n)])
    assert errors == []
    assert sorted(r.replayed for r in results) == [False] + [True] * (n - 1)
    assert len({r.body["outcome_id"] for r in results}) == 1
    assert stores[0].balance("p") == 50
    assert stores[1].leaderboard() == [{"rank": 1, "user_id": "p", "net_winnings": 50}]


def test_ids_are_unique_across_clients(stores):
    tids = {stores[i % 2].deposit("alice", 1).body["transaction_id"] for i in range(20)}
    oids = {stores[i % 2].settle("alice", "g", 0, 0).body["outcome_id"] for i in range(20)}
    assert len(tids) == 20 and len(oids) == 20


# -- idempotency records ------------------------------------------------------------------------


def test_idempotency_records_expire_after_24_hours_by_default(stores, redis_server, prefix):  # noqa: F811
    stores[0].deposit("alice", 1, idem=Idempotency("k", b"fp"))
    ttl_ms = redis_server.client().pttl(prefix + "idem:k")
    assert 24 * 3600 * 1000 - 60_000 < ttl_ms <= 24 * 3600 * 1000


def test_idempotency_record_is_forgotten_after_its_ttl(redis_server, prefix):  # noqa: F811
    store = RedisStore(redis_store.connect(redis_server.url), prefix, idempotency_ttl=0.5)
    raw = redis_server.client()
    first = store.deposit("alice", 10, idem=Idempotency("k", b"fp-a"))
    assert raw.pttl(prefix + "idem:k") <= 500
    wait_for(lambda: not raw.exists(prefix + "idem:k"), timeout=10, message="the record to expire")
    again = store.deposit("alice", 1, idem=Idempotency("k", b"fp-b"))
    assert not again.replayed and again.body["balance"] == 11 and first.body["balance"] == 10
    assert store.idempotency_size() == 1
    store.close()


def test_cap_eviction_deletes_the_record(redis_server, prefix):  # noqa: F811
    store = RedisStore(redis_store.connect(redis_server.url), prefix, idempotency_cap=2)
    raw = redis_server.client()
    for key in ("a", "b", "c"):
        store.deposit("alice", 1, idem=Idempotency(key, b"fp"))
    assert not raw.exists(prefix + "idem:a")
    assert raw.exists(prefix + "idem:b") and raw.exists(prefix + "idem:c")
    assert raw.zrange(prefix + "idem", 0, -1) == [b"b", b"c"]
    store.close()


# -- Redis going away ----------------------------------------------------------------------------


def assert_unavailable_quickly(call):
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"took {elapsed:.2f}s"
    assert info.value.code == "unavailable" and info.value.http_status == 503
    assert info.value.message == "the wallet store (Redis) cannot be reached"


def test_stopped_redis_gives_store_unavailable_within_3s_then_recovers(own_redis_server):  # noqa: F811
    store = RedisStore(redis_store.connect(own_redis_server.url), "w:")
    store.deposit("alice", 5)
    own_redis_server.stop()
    assert store.healthy() is False
    for call in (lambda: store.deposit("alice", 1), lambda: store.withdraw("alice", 1),
                 lambda: store.settle("alice", "g", 1, 0), lambda: store.balance("alice"),
                 lambda: store.transactions("alice"), lambda: store.leaderboard(),
                 lambda: store.deposit("alice", 1, idem=Idempotency("k", b"fp"))):
        assert_unavailable_quickly(call)
    own_redis_server.start()
    # Same store object, no restart: the pool reconnects (the data is gone: this server keeps none).
    assert store.healthy() is True
    assert store.deposit("alice", 3).body["balance"] == 3
    store.close()


def test_hung_redis_times_out_within_3s(own_redis_server):  # noqa: F811
    store = RedisStore(redis_store.connect(own_redis_server.url), "w:")
    store.deposit("alice", 5)

    def scripts_run():
        return store.client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)

    before = scripts_run()
    os.kill(own_redis_server.proc.pid, signal.SIGSTOP)
    try:
        assert_unavailable_quickly(lambda: store.deposit("alice", 1))
        assert_unavailable_quickly(lambda: store.balance("alice"))
    finally:
        os.kill(own_redis_server.proc.pid, signal.SIGCONT)
    wait_for(store.healthy, timeout=10, message="Redis answering again")
    # The deposit answered 503 waited in Redis's socket; when Redis resumes it runs past its deadline
    # and is refused, so "nothing was applied" holds. (Redis may also drop it with its closed connection.)
    try:
        wait_for(lambda: scripts_run() > before, timeout=2, message="the stalled write to reach the script")
    except AssertionError:
        pass
    assert store.balance("alice") == 5
    assert store.deposit("alice", 1).body["balance"] == 6  # and writes work again
    store.close()


def test_open_redis_unreachable_names_host_and_port_not_the_password():
    from redis_server import free_port

    port = free_port()
    started = time.monotonic()
    with pytest.raises(RedisStartupError) as info:
        open_redis(f"redis://:s3cret-pass@127.0.0.1:{port}/0", "wallet:", FakeHub())
    assert time.monotonic() - started < 3.0
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "s3cret-pass" not in message


def test_open_redis_wrong_password_hides_it(redis_server):  # noqa: F811
    # This server has no password: Redis refuses AUTH; the message must still not echo it.
    with pytest.raises(RedisStartupError) as info:
        open_redis(f"redis://user:s3cret-pass@127.0.0.1:{redis_server.port}/0", "wallet:", FakeHub())
    assert "s3cret-pass" not in str(info.value)
    assert f"127.0.0.1:{redis_server.port}" in str(info.value)


def test_open_redis_returns_a_store_and_a_started_reader(redis_server, prefix):  # noqa: F811
    hub = FakeHub()
    store, reader = open_redis(redis_server.url, prefix, hub)
    try:
        assert hub.of("preload") == [("preload", [], reader.epoch, 0, {"leaderboard": []})]
        store.deposit("alice", 4)
        wait_for(lambda: hub.fed_seqs() == [1], message="the deposit's event")
    finally:
        reader.stop()
        store.close()


def test_describe_never_shows_the_password():
    assert redis_store.describe("redis://:pw@db.example:6380/2") == "db.example:6380"
    assert redis_store.describe("rediss://u:pw@db.example/0") == "db.example:6379"


# -- the event reader ----------------------------------------------------------------------------


def test_reader_preloads_history_and_feeds_new_events_in_seq_order(stores, redis_server, prefix, readers):  # noqa: F811
    stores[0].deposit("alice", 100)
    stores[1].settle("alice", "dice", 30, 75)  # bet, win, game_outcome, leaderboard
    hub = FakeHub()
    reader = readers(redis_server.url, prefix, hub)
    ((_, events, epoch, last_seq, board),) = hub.of("preload")
    assert [(seq, kind) for seq, kind, _, _ in events] == [
        (1, "balance"), (2, "balance"), (3, "balance"), (4, "game_outcome"), (5, "leaderboard")]
    assert events[3][2]["net"] == 45 and events[3][3] == "alice" and events[4][3] is None
    assert (epoch, last_seq) == (reader.epoch, 5)
    assert board == {"leaderboard": [{"rank": 1, "user_id": "alice", "net_winnings": 45}]}

    # Writes through both clients (as two processes) arrive once each, in one seq order.
    def writer(store, user):
        for _ in range(25):
            store.deposit(user, 1)

    run_threads([lambda: writer(stores[0], "a"), lambda: writer(stores[1], "b")])
    wait_for(lambda: len(hub.fed_seqs()) == 50, message="50 events fed")
    assert hub.fed_seqs() == list(range(6, 56))
    fed = hub.of("feed")
    assert {c[4] for c in fed} == {"a", "b"}
    assert [c[3]["balance"] for c in fed if c[4] == "a"] == list(range(1, 26))
    assert hub.of("reset") == []


def test_preload_keeps_the_newest_history_only(stores, redis_server, prefix, readers):  # noqa: F811
    for _ in range(30):
        stores[0].deposit("alice", 1)
    hub = FakeHub()
    readers(redis_server.url, prefix, hub, history=10)
    ((_, events, _, last_seq, _),) = hub.of("preload")
    assert [e[0] for e in events] == list(range(21, 31)) and last_seq == 30


def test_epoch_survives_a_new_reader(stores, redis_server, prefix, readers):  # noqa: F811
    stores[0].deposit("alice", 1)
    first = readers(redis_server.url, prefix, FakeHub())
    second = readers(redis_server.url, prefix, FakeHub())
    assert first.epoch == second.epoch and first.epoch
    assert redis_server.client().get(prefix + "epoch").decode() == first.epoch


def test_epoch_is_named_by_the_first_write_when_no_reader_did(stores, redis_server, prefix):  # noqa: F811
    stores[0].deposit("alice", 1)
    assert redis_server.client().get(prefix + "epoch")


def test_flushed_redis_changes_the_epoch_and_resets_the_hub(own_redis_server, readers):  # noqa: F811
    store = RedisStore(redis_store.connect(own_redis_server.url), "w:")
    store.deposit("alice", 1)
    store.deposit("alice", 2)
    hub = FakeHub()
    reader = readers(own_redis_server.url, "w:", hub)
    old_epoch = reader.epoch
    own_redis_server.client().flushall()
    wait_for(lambda: hub.of("reset"), message="the reader to notice the flush")
    ((_, new_epoch, last_seq, board),) = hub.of("reset")
    assert new_epoch != old_epoch and last_seq == 0 and board == {"leaderboard": []}
    # The new history numbers from 1 again, and is delivered.
    store.deposit("bob", 7)
    wait_for(lambda: hub.fed_seqs() == [1], message="the first event of the new history")
    assert hub.of("feed")[0][3]["user_id"] == "bob"
    assert reader.epoch == new_epoch
    store.close()


def test_writes_before_the_reader_notices_a_flush_are_not_lost(own_redis_server, readers):  # noqa: F811
    store = RedisStore(redis_store.connect(own_redis_server.url), "w:")
    for _ in range(5):
        store.deposit("alice", 1)
    hub = FakeHub()
    hub.gate.clear()  # the reader falls behind...
    reader = readers(own_redis_server.url, "w:", hub)
    old_epoch = reader.epoch
    store.deposit("alice", 1)  # seq 6: the reader is stuck feeding it
    wait_for(hub.entered.is_set, message="the reader holding seq 6")
    own_redis_server.client().flushall()
    for _ in range(8):  # seq 1..8 of a new history, before the reader looks again
        store.deposit("bob", 1)
    hub.gate.set()
    wait_for(lambda: hub.of("reset"), message="the reset")
    ((_, epoch, last_seq, _),) = hub.of("reset")
    assert epoch != old_epoch and last_seq == 8
    ((_, events, _, _, _),) = [c for c in hub.of("preload") if c[2] == epoch]
    assert [e[0] for e in events] == list(range(1, 9))
    assert all(e[3] == "bob" for e in events)


def test_restarted_redis_without_data_resets_and_reader_recovers(own_redis_server, readers):  # noqa: F811
    store = RedisStore(redis_store.connect(own_redis_server.url), "w:")
    store.deposit("alice", 1)
    hub = FakeHub()
    reader = readers(own_redis_server.url, "w:", hub)
    old_epoch = reader.epoch
    own_redis_server.stop()
    wait_for(lambda: not reader.connected, message="the reader to notice")
    own_redis_server.start()
    wait_for(lambda: hub.of("reset"), timeout=15, message="the reset after the restart")
    assert hub.of("reset")[0][1] != old_epoch
    store.deposit("carol", 2)
    wait_for(lambda: any(c[4] == "carol" for c in hub.of("feed")), message="events after the restart")
    assert reader.connected
    store.close()


def test_restarted_redis_with_its_data_keeps_the_epoch_and_delivers_what_was_missed(tmp_path, readers):
    server = RedisServer(tmp_path / "aof", persistent=True)
    try:
        store = RedisStore(redis_store.connect(server.url), "w:")
        store.deposit("alice", 1)
        hub = FakeHub()
        reader = readers(server.url, "w:", hub)
        epoch = reader.epoch
        server.stop()
        wait_for(lambda: not reader.connected, message="the reader to notice")
        server.start()
        wait_for(store.healthy, message="Redis back")
        store.deposit("alice", 2)  # seq 2, written after the restart
        wait_for(lambda: hub.fed_seqs() == [2], timeout=15, message="the missed event")
        assert hub.of("reset") == [] and reader.epoch == epoch
        assert store.balance("alice") == 3
        store.close()
    finally:
        server.stop()


def test_trimmed_events_make_the_reader_resync(stores, redis_server, prefix, readers):  # noqa: F811
    hub = FakeHub()
    reader = readers(redis_server.url, prefix, hub)
    hub.gate.clear()
    stores[0].deposit("alice", 1)  # seq 1: the reader holds it until the gate opens
    wait_for(hub.entered.is_set, message="the reader holding seq 1")
    for _ in range(20):
        stores[0].deposit("alice", 1)
    redis_server.client().xtrim(prefix + "events", maxlen=5, approximate=False)  # seq 17..21 remain
    hub.gate.set()
    wait_for(lambda: hub.of("reset"), message="the resync")
    ((_, epoch, last_seq, _),) = hub.of("reset")
    assert epoch == reader.epoch and last_seq == 21
    assert [e[0] for e in hub.of("preload")[-1][1]] == [17, 18, 19, 20, 21]
    stores[0].deposit("alice", 1)
    wait_for(lambda: hub.fed_seqs()[-1] == 22, message="seq 22 fed")
    assert hub.fed_seqs() == [1, 22]


def test_stream_keeps_at_least_the_history_size(redis_server, prefix):  # noqa: F811
    store = RedisStore(redis_store.connect(redis_server.url), prefix, history=150)
    pipe_count = 400
    for _ in range(pipe_count):
        store.deposit("alice", 1)
    length = redis_server.client().xlen(prefix + "events")
    assert 150 <= length < pipe_count
    store.close()



def test_reader_drives_the_real_event_hub(stores, redis_server, prefix, readers):  # noqa: F811
    from events import EventHub

    stores[0].deposit("alice", 1)
    hub = EventHub().start()
    try:
        reader = readers(redis_server.url, prefix, hub)
        wait_for(lambda: hub.epoch == reader.epoch and hub.seq == 1, message="the preload")
        stores[1].settle("alice", "dice", 1, 3)
        wait_for(lambda: hub.seq == 5, message="four more events")
    finally:
        hub.stop()


def test_reader_stops_at_once_while_waiting_in_xread(redis_server, prefix, readers):  # noqa: F811
    reader = readers(redis_server.url, prefix, FakeHub(), block_ms=5000)
    time.sleep(0.2)  # not synchronisation: just let it enter its 5 s XREAD before stopping it
    started = time.monotonic()
    reader.stop()
    assert time.monotonic() - started < 1.0


def test_reader_gathers_after_a_read_yet_stops_at_once_and_loses_nothing(stores, redis_server, prefix, readers,  # noqa: F811
                                                                          monkeypatch):
    # After a read that returned events the reader waits READ_GATHER before the next XREAD (fewer reads
    # under load); stop() must not wait it out, and what was written meanwhile comes in the next read.
    monkeypatch.setattr(redis_store, "READ_GATHER", 30.0)
    hub = FakeHub()
    reader = readers(redis_server.url, prefix, hub, block_ms=5000)
    stores[0].deposit("gather", 1)
    wait_for(lambda: len(hub.fed_seqs()) == 1, message="the first event fed")
    for _ in range(3):
        stores[0].deposit("gather", 1)  # written while the reader gathers
    started = time.monotonic()
    reader.stop()
    assert time.monotonic() - started < 1.0
    assert len(hub.fed_seqs()) == 1  # the gathering wait was still on: nothing read since

    monkeypatch.setattr(redis_store, "READ_GATHER", 0.005)
    again = readers(redis_server.url, prefix, FakeHub(), block_ms=5000)
    stores[0].deposit("gather", 1)
    wait_for(lambda: again.last_seq == reader.last_seq + 4, message="every event, in one seq order")


def test_reader_stops_at_once_when_redis_hangs(own_redis_server, readers):  # noqa: F811
    reader = readers(own_redis_server.url, "w:", FakeHub())
    os.kill(own_redis_server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        reader.stop()
        assert time.monotonic() - started < 1.0
    finally:
        os.kill(own_redis_server.proc.pid, signal.SIGCONT)


def test_full_redis_refuses_writes_as_unavailable_and_changes_nothing(own_redis_server):  # noqa: F811
    store = RedisStore(redis_store.connect(own_redis_server.url), "w:")
    store.deposit("alice", 5)
    admin = own_redis_server.client()
    admin.config_set("maxmemory", "1")  # under noeviction every write is now refused with OOM
    try:
        for call in (lambda: store.deposit("alice", 1), lambda: store.settle("alice", "g", 1, 2),
                     lambda: store.withdraw("alice", 1, idem=Idempotency("k", b"fp"))):
            with pytest.raises(StoreUnavailable):
                call()
        assert store.balance("alice") == 5  # reads still work
    finally:
        admin.config_set("maxmemory", "0")
    assert [t["type"] for t in store.transactions("alice")] == ["deposit"]
    assert store.deposit("alice", 1).body["balance"] == 6
    store.close()


def test_redis_back_without_its_newest_writes_resets_the_hub(own_redis_server, readers):  # noqa: F811
    store = RedisStore(redis_store.connect(own_redis_server.url), "w:")
    for _ in range(5):
        store.deposit("alice", 1)
    hub = FakeHub()
    reader = readers(own_redis_server.url, "w:", hub)
    assert reader.last_seq == 5
    # What a restart from an AOF that missed its last second looks like: same epoch, history up to seq 3.
    admin = own_redis_server.client()
    kept = admin.xrange("w:events", max="3-0")
    pipe = admin.pipeline(transaction=True)
    pipe.delete("w:events")
    for entry_id, fields in kept:
        pipe.xadd("w:events", fields, id=entry_id)
    pipe.set("w:seq", 3)
    pipe.execute()
    admin.client_kill_filter(_type="normal", skipme=True)  # the reader reconnects
    wait_for(lambda: hub.of("reset"), message="the reset")
    assert hub.of("reset")[0][1:3] == (reader.epoch, 3)
    store.deposit("bob", 1)  # seq 4 again, another event than the first seq 4
    wait_for(lambda: hub.fed_seqs() == [4], message="the new seq 4")
    assert hub.of("feed")[0][4] == "bob"
    store.close()
