"""Unit tests for events.py: a started EventHub with real threads and in-process subscribers.

No sleeps: tests wait for conditions with deadlines, and `flush()` uses the fact that
subscription commands travel through the dispatcher's queue behind every earlier event.
"""

import json
import threading
import time

import pytest

from events import TOPICS, EventHub, Message, Subscriber

TIMEOUT = 30.0  # only a hang ever gets near this


class Client:
    """A subscriber plus the messages it has drained, decoded."""

    def __init__(self, hub, queue_size=1000):
        self.hub = hub
        self.woken = threading.Event()
        self.cutoff_calls = 0
        self.cutoff_event = threading.Event()
        self.sub = hub.connect(Subscriber(self.woken.set, queue_size, on_cutoff=self._on_cutoff))
        self.received = []

    def _on_cutoff(self):
        self.cutoff_calls += 1
        self.cutoff_event.set()

    def collect(self):
        for message in self.sub.drain():
            assert isinstance(message, Message)
            self.received.append(json.loads(message.text))
        return self.received

    def wait_until(self, condition, timeout=TIMEOUT, what="messages"):
        """Drain whenever woken until condition(received) holds; fail at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            self.woken.clear()
            if condition(self.collect()):
                return self.received
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; got {self.received[-5:]!r}")
            self.woken.wait(remaining)

    def wait_count(self, n, **kw):
        return self.wait_until(lambda got: len(got) >= n, what=f"{n} messages", **kw)

    def events(self, kind=None):
        return [m for m in self.received if "seq" in m and (kind is None or m["type"] == kind)]

    def subscribe(self, events, user_id=None, reply_id=None, **kw):
        assert self.hub.subscribe(self.sub, events, user_id, reply_id, **kw), "subscribe did not go live"

    def unsubscribe(self, events, reply_id=None):
        assert self.hub.unsubscribe(self.sub, events, reply_id), "unsubscribe timed out"


@pytest.fixture
def hub():
    hub = EventHub().start()
    yield hub
    hub.stop()
    assert not hub._thread.is_alive(), "dispatcher thread did not stop"


def flush(hub):
    """Return once the dispatcher has handled every event published so far."""
    assert hub.subscribe(Subscriber(lambda: None), []), "dispatcher did not catch up"


def outcome(user_id, n=0):
    return {"outcome_id": f"out_{n}", "user_id": user_id, "game": "slots", "bet": 1, "payout": 2,
            "net": 1, "balance": 10, "timestamp": "2024-01-01T00:00:00.000000Z"}


def balance(user_id, n=0):
    return {"user_id": user_id, "balance": n, "transaction_id": f"tx_{n}", "type": "deposit",
            "amount": 1, "timestamp": "2024-01-01T00:00:00.000000Z"}


def board(*user_ids):
    return {"leaderboard": [{"rank": i, "user_id": u, "net_winnings": 100 - i}
                            for i, u in enumerate(user_ids, start=1)]}


# -- delivery and order -----------------------------------------------------------


def test_topics():
    assert set(TOPICS) == {"game_outcomes", "leaderboard", "balance"}


def test_events_arrive_in_seq_order_with_their_data(hub):
    client = Client(hub)
    client.subscribe(["game_outcomes"])
    for i in range(200):
        hub.publish("game_outcome", outcome("alice", i), "alice")
    client.wait_count(201)  # `subscribed` + 200 events
    assert client.received[0]["type"] == "subscribed"
    events = client.events()
    assert [e["seq"] for e in events] == list(range(1, 201))
    assert [e["data"]["outcome_id"] for e in events] == [f"out_{i}" for i in range(200)]
    assert events[0] == {"type": "game_outcome", "seq": 1, "data": outcome("alice", 0)}


def test_balance_event_shape(hub):
    client = Client(hub)
    client.subscribe(["balance"], "alice")
    hub.publish("balance", balance("alice", 5), "alice")
    client.wait_count(2)
    assert client.received[1] == {"type": "balance", "seq": 1, "data": balance("alice", 5)}


def test_events_published_before_subscribing_are_not_delivered(hub):
    hub.publish("game_outcome", outcome("alice", 1), "alice")
    client = Client(hub)
    client.subscribe(["game_outcomes"])
    hub.publish("game_outcome", outcome("alice", 2), "alice")
    client.wait_count(2)
    flush(hub)
    client.collect()
    assert [e["seq"] for e in client.events()] == [2]


# -- filters --------------------------------------------------------------------------


def publish_mix(hub):
    hub.publish("game_outcome", outcome("alice", 1), "alice")
    hub.publish("game_outcome", outcome("bob", 2), "bob")
    hub.publish("balance", balance("alice", 3), "alice")
    hub.publish("balance", balance("bob", 4), "bob")
    hub.publish("leaderboard", board("bob", "alice"))
    flush(hub)


def test_filters_route_each_event_to_the_right_subscribers(hub):
    all_outcomes, alice_outcomes, alice_balance, leaderboard, nothing = (Client(hub) for _ in range(5))
    all_outcomes.subscribe(["game_outcomes"])
    alice_outcomes.subscribe(["game_outcomes"], "alice")
    alice_balance.subscribe(["balance"], "alice")
    leaderboard.subscribe(["leaderboard"])
    nothing.subscribe([])
    publish_mix(hub)
    for client in (all_outcomes, alice_outcomes, alice_balance, leaderboard, nothing):
        client.collect()

    def seen(client):
        return [(e["type"], e["data"].get("user_id")) for e in client.events()]

    assert seen(all_outcomes) == [("game_outcome", "alice"), ("game_outcome", "bob")]
    assert seen(alice_outcomes) == [("game_outcome", "alice")]
    assert seen(alice_balance) == [("balance", "alice")]
    # The leaderboard subscriber also got its snapshot (seq 0) on subscribing.
    assert [(e["seq"], e["data"]) for e in leaderboard.events()] == [(0, {"leaderboard": []}),
                                                                     (5, board("bob", "alice"))]
    assert nothing.events() == []


def test_several_topics_on_one_connection_interleave_in_seq_order(hub):
    client = Client(hub)
    client.subscribe(["game_outcomes", "balance", "leaderboard"], "alice")
    publish_mix(hub)
    client.collect()
    events = [e for e in client.events() if e["seq"] > 0]
    assert [(e["seq"], e["type"]) for e in events] == [(1, "game_outcome"), (3, "balance"), (5, "leaderboard")]


def test_balance_without_user_id_delivers_nothing(hub):
    client = Client(hub)
    client.subscribe(["balance"])
    publish_mix(hub)
    client.collect()
    assert client.events() == []


def test_a_new_user_id_replaces_the_old_one(hub):
    client = Client(hub)
    client.subscribe(["balance", "game_outcomes"], "alice")
    client.subscribe([], "bob")
    assert client.wait_count(2)[1] == {"type": "subscribed", "events": ["balance", "game_outcomes"],
                                       "user_id": "bob"}
    publish_mix(hub)
    client.collect()
    assert [(e["type"], e["data"]["user_id"]) for e in client.events()] == [("game_outcome", "bob"),
                                                                           ("balance", "bob")]


def test_quiet_subscribe_sets_the_user_without_a_reply(hub):
    client = Client(hub)
    client.subscribe(["balance"], "alice", quiet=True)
    hub.publish("balance", balance("alice", 1), "alice")
    flush(hub)
    client.collect()
    assert [m["type"] for m in client.received] == ["balance"]


def test_unsubscribe_stops_delivery(hub):
    client = Client(hub)
    client.subscribe(["game_outcomes", "leaderboard"])
    hub.publish("game_outcome", outcome("alice", 1), "alice")
    client.unsubscribe(["game_outcomes"])
    hub.publish("game_outcome", outcome("alice", 2), "alice")
    hub.publish("leaderboard", board("alice"))
    flush(hub)
    client.collect()
    assert [m["type"] for m in client.received] == [
        "subscribed", "leaderboard", "game_outcome", "unsubscribed", "leaderboard",
    ]
    assert [e["seq"] for e in client.events("game_outcome")] == [1]
    assert client.received[3] == {"type": "unsubscribed", "events": ["leaderboard"]}


def test_disconnect_stops_delivery_and_counts(hub):
    client = Client(hub)
    client.subscribe(["game_outcomes"])
    assert hub.connection_count() == 1
    hub.disconnect(client.sub)
    assert hub.connection_count() == 0
    hub.publish("game_outcome", outcome("alice"), "alice")
    flush(hub)
    client.collect()
    assert client.events() == []


# -- replies and the leaderboard snapshot ----------------------------------------


def test_subscribed_and_unsubscribed_replies_carry_the_id(hub):
    client = Client(hub)
    client.subscribe(["game_outcomes"], "alice", reply_id="r1")
    client.subscribe(["leaderboard"], reply_id=2)
    client.unsubscribe(["game_outcomes"], reply_id="r3")
    client.subscribe([])
    client.wait_count(5)
    assert client.received == [
        {"type": "subscribed", "events": ["game_outcomes"], "user_id": "alice", "id": "r1"},
        {"type": "subscribed", "events": ["game_outcomes", "leaderboard"], "user_id": "alice", "id": 2},
        {"type": "leaderboard", "seq": 0, "data": {"leaderboard": []}},
        {"type": "unsubscribed", "events": ["leaderboard"], "id": "r3"},
        {"type": "subscribed", "events": ["leaderboard"], "user_id": "alice"},  # no id asked, none given
    ]


def test_subscribed_without_user_gives_null(hub):
    client = Client(hub)
    client.subscribe(["game_outcomes"])
    assert client.wait_count(1)[0] == {"type": "subscribed", "events": ["game_outcomes"], "user_id": None}


def test_leaderboard_snapshot_carries_the_latest_board_and_seq(hub):
    hub.publish("leaderboard", board("alice"))
    hub.publish("leaderboard", board("bob", "alice"))
    hub.publish("game_outcome", outcome("carol"), "carol")  # nobody listens, but it is numbered
    hub.publish("balance", balance("carol"), "carol")
    client = Client(hub)
    client.subscribe(["leaderboard"], reply_id="x")
    client.wait_count(2)
    assert client.received == [
        {"type": "subscribed", "events": ["leaderboard"], "user_id": None, "id": "x"},
        {"type": "leaderboard", "seq": 4, "data": board("bob", "alice")},
    ]
    hub.publish("leaderboard", board("carol"))
    client.wait_count(3)
    assert client.received[2] == {"type": "leaderboard", "seq": 5, "data": board("carol")}


def test_snapshot_seq_is_the_last_event_before_the_subscribe_not_after():
    """Queue board A, the subscribe, then board B before the dispatcher runs: snapshot is A (seq 1), then B."""
    hub = EventHub()  # not started yet, so everything below queues up in order
    try:
        client = Client(hub)
        hub.publish("leaderboard", board("alice"))
        assert hub.subscribe(client.sub, ["leaderboard"], timeout=0) is False  # queued, not yet live
        hub.publish("leaderboard", board("bob"))
        hub.start()
        client.wait_count(3)
        assert client.received == [
            {"type": "subscribed", "events": ["leaderboard"], "user_id": None},
            {"type": "leaderboard", "seq": 1, "data": board("alice")},
            {"type": "leaderboard", "seq": 2, "data": board("bob")},
        ]
    finally:
        hub.stop()


def test_no_snapshot_without_leaderboard(hub):
    hub.publish("leaderboard", board("alice"))
    client = Client(hub)
    client.subscribe(["game_outcomes"])
    flush(hub)
    client.collect()
    assert [m["type"] for m in client.received] == ["subscribed"]


# -- slow subscribers --------------------------------------------------------------


def test_full_queue_cuts_off_only_that_subscriber(hub):
    slow = Client(hub, queue_size=5)
    fast = Client(hub)
    slow.subscribe(["game_outcomes"])
    fast.subscribe(["game_outcomes"])
    slow.wait_count(1)  # the writer took the `subscribed` reply; from now on slow reads nothing
    for i in range(20):
        hub.publish("game_outcome", outcome("alice", i), "alice")
    fast.wait_count(21)
    assert slow.cutoff_event.wait(TIMEOUT)
    assert slow.sub.cut_off is True
    assert [e["seq"] for e in fast.events()] == list(range(1, 21))

    # What slow has queued is an in-order prefix no longer than its queue; then nothing more.
    slow.collect()
    seqs = [e["seq"] for e in slow.events()]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) <= 5
    for i in range(5):
        hub.publish("game_outcome", outcome("alice", 100 + i), "alice")
    fast.wait_count(26)
    flush(hub)
    assert slow.collect() == slow.received and len(slow.events()) == len(seqs)
    assert slow.cutoff_calls == 1
    # A cut-off subscriber cannot subscribe again.
    slow.subscribe(["game_outcomes"])
    assert slow.collect() == slow.received and len(slow.received) == 1 + len(seqs)


def test_queue_holds_exactly_queue_size_events_before_cut_off(hub):
    client = Client(hub, queue_size=5)
    client.subscribe(["balance"], "alice")
    client.wait_count(1)
    for i in range(5):
        hub.publish("balance", balance("alice", i), "alice")
    flush(hub)
    assert client.sub.cut_off is False
    hub.publish("balance", balance("alice", 5), "alice")
    assert client.cutoff_event.wait(TIMEOUT)
    client.collect()
    assert [e["seq"] for e in client.events()] == [1, 2, 3, 4, 5]


def test_cut_off_wakes_the_subscriber_after_marking_it(hub):
    seen = []  # sub.cut_off as it was at each wake() call
    sub = hub.connect(Subscriber(lambda: seen.append(sub.cut_off), queue_size=1))
    assert hub.subscribe(sub, ["game_outcomes"])
    sub.drain()
    hub.publish("game_outcome", outcome("a", 1), "a")  # fills the queue
    hub.publish("game_outcome", outcome("a", 2), "a")  # overflows it
    flush(hub)
    assert sub.cut_off
    assert seen[-1] is True, "the connection must be woken once cut_off is set, so it can close with 1013"


def test_many_publishers_and_a_stalled_subscriber_never_block(hub):
    """20k publishes from 8 threads complete; the stalled reader is cut off, the other gets everything."""
    n_threads, per_thread = 8, 2500
    stalled = Client(hub, queue_size=5)
    reader = Client(hub, queue_size=10**6)  # big enough never to be cut off while we read in bursts
    stalled.subscribe(["game_outcomes"])
    reader.subscribe(["game_outcomes"])
    stalled.wait_count(1)
    barrier = threading.Barrier(n_threads)

    def publisher(t):
        barrier.wait(TIMEOUT)
        for i in range(per_thread):
            hub.publish("game_outcome", {"t": t, "i": i}, "u")

    threads = [threading.Thread(target=publisher, args=(t,), daemon=True) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), "publish() blocked"

    total = n_threads * per_thread
    reader.wait_count(1 + total)
    assert stalled.sub.cut_off and stalled.cutoff_calls == 1
    events = reader.events()
    assert [e["seq"] for e in events] == list(range(1, total + 1))
    # Each publisher's own events keep their order.
    per = {t: [e["data"]["i"] for e in events if e["data"]["t"] == t] for t in range(n_threads)}
    assert per == {t: list(range(per_thread)) for t in range(n_threads)}


def test_seq_strictly_increasing_for_a_reader_draining_during_publishing(hub):
    n_threads, per_thread = 4, 1000
    reader = Client(hub, queue_size=10**6)
    reader.subscribe(["balance"], "alice")
    reader.wait_count(1)
    barrier = threading.Barrier(n_threads + 1)

    def publisher():
        barrier.wait(TIMEOUT)
        for i in range(per_thread):
            hub.publish("balance", balance("alice", i), "alice")

    threads = [threading.Thread(target=publisher, daemon=True) for _ in range(n_threads)]
    for t in threads:
        t.start()
    barrier.wait(TIMEOUT)
    reader.wait_count(1 + n_threads * per_thread)  # drains while the publishers run
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    seqs = [e["seq"] for e in reader.events()]
    assert all(a < b for a, b in zip(seqs, seqs[1:], strict=False))
    assert len(seqs) == n_threads * per_thread


# -- shutdown -----------------------------------------------------------------------


def test_close_all_sets_close_code_and_wakes_every_connection(hub):
    a, b, gone = Client(hub), Client(hub), Client(hub)
    hub.disconnect(gone.sub)
    for c in (a, b, gone):
        c.woken.clear()
    assert hub.close_all(1001) == 2
    for c in (a, b):
        assert c.woken.is_set()
        assert c.sub.close_code == 1001
    assert gone.sub.close_code is None and not gone.woken.is_set()


def test_stop_ends_the_dispatcher():
    hub = EventHub().start()
    hub.stop()
    assert not hub._thread.is_alive()
