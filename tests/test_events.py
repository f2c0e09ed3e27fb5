"""Unit tests for events.py: a started EventHub with real threads and in-process subscribers.

No sleeps: `hub.flush()` returns once the dispatcher has handled everything submitted before it, and
waits on conditions have deadlines.
"""

import threading
import tracemalloc

import pytest

from conftest import wait_for
from events import HISTORY, TOPICS, Event, EventHub, Live, MemoryEventLog, matches

TIMEOUT = 30.0  # only a hang ever gets near this


class Sub:
    """An events.Subscriber that records what the dispatcher hands it."""

    def __init__(self, capacity=None):
        self.capacity = capacity
        self.got: list[Event] = []
        self.lives: list[Live] = []
        self.cancelled: list[str] = []
        self.order: list[object] = []  # replies (Live) and events, in the order the dispatcher produced them

    def deliver(self, event):
        if self.capacity is not None and len(self.got) >= self.capacity:
            return False
        self.got.append(event)
        self.order.append(event)
        return True

    def cancel(self, reason):
        self.cancelled.append(reason)

    def on_live(self, live):
        self.lives.append(live)
        self.order.append(live)
        self.order.extend(live.replay)

    def seqs(self):
        return [e.seq for e in self.got]


@pytest.fixture
def hub():
    hub = EventHub().start()
    yield hub
    hub.stop()


@pytest.fixture
def log(hub):
    return MemoryEventLog(hub)


def outcome(user_id, n=0):
    return {"outcome_id": f"out_{n}", "user_id": user_id, "game": "slots", "bet": 1, "payout": 2,
            "net": 1, "balance": 10, "timestamp": "2024-01-01T00:00:00.000000Z"}


def balance(user_id, n=0):
    return {"user_id": user_id, "balance": n, "transaction_id": f"tx_{n}", "type": "deposit",
            "amount": 1, "timestamp": "2024-01-01T00:00:00.000000Z"}


def board(*user_ids):
    return {"leaderboard": [{"rank": i, "user_id": u, "net_winnings": 100 - i}
                            for i, u in enumerate(user_ids, start=1)]}


def subscribe(hub, sub, events, user_id=None, **kw):
    live = hub.subscribe(sub, events, user_id, on_live=sub.on_live, **kw)
    assert live is not None, "subscribe did not go live"
    return live


# -- numbering, order, filters ------------------------------------------------------------------


def test_topics_and_matching():
    assert set(TOPICS) == {"game_outcomes", "leaderboard", "balance"}
    o, b, lb = Event(1, "game_outcome", {}, "a"), Event(2, "balance", {}, "a"), Event(3, "leaderboard", {}, None)
    assert matches(o, {"game_outcomes"}, None) and matches(o, {"game_outcomes"}, "a")
    assert not matches(o, {"game_outcomes"}, "b") and not matches(o, {"balance"}, "a")
    assert matches(b, {"balance"}, "a") and not matches(b, {"balance"}, None) and not matches(b, {"balance"}, "b")
    assert matches(lb, {"leaderboard"}, "x") and not matches(lb, {"game_outcomes"}, None)
    assert not matches(Event(4, "nonsense", {}, None), set(TOPICS), None)


def test_memory_log_numbers_from_one_in_publish_order(hub, log):
    sub = Sub()
    live = subscribe(hub, sub, ["game_outcomes"])
    assert (live.seq, live.recovered, live.replay) == (0, None, ())
    assert isinstance(live.epoch, str) and live.epoch == hub.epoch
    for n in range(5):
        log.publish("game_outcome", outcome("a", n), "a")
    assert hub.flush(TIMEOUT)
    assert sub.seqs() == [1, 2, 3, 4, 5]
    assert [e.data["outcome_id"] for e in sub.got] == [f"out_{n}" for n in range(5)]
    assert hub.seq == 5


def test_filters_route_each_event_to_the_right_subscribers(hub, log):
    everyone, alice, alice_balance, boards = Sub(), Sub(), Sub(), Sub()
    subscribe(hub, everyone, ["game_outcomes"])
    subscribe(hub, alice, ["game_outcomes"], "alice")
    subscribe(hub, alice_balance, ["balance"], "alice")
    subscribe(hub, boards, ["leaderboard"])
    log.publish("game_outcome", outcome("bob"), "bob")
    log.publish("game_outcome", outcome("alice"), "alice")
    log.publish("balance", balance("alice"), "alice")
    log.publish("balance", balance("bob"), "bob")
    log.publish("leaderboard", board("alice"))
    assert hub.flush(TIMEOUT)
    assert everyone.seqs() == [1, 2]
    assert alice.seqs() == [2]
    assert alice_balance.seqs() == [3]
    assert boards.seqs() == [5]


def test_balance_without_user_id_delivers_nothing(hub, log):
    sub = Sub()
    subscribe(hub, sub, ["balance"])
    log.publish("balance", balance("a"), "a")
    assert hub.flush(TIMEOUT)
    assert sub.got == []


def test_a_new_user_id_replaces_the_old_one_and_unsubscribe_stops_delivery(hub, log):
    sub = Sub()
    subscribe(hub, sub, ["game_outcomes", "balance"], "a")
    live = subscribe(hub, sub, [], "b")
    assert (live.events, live.user_id) == (("balance", "game_outcomes"), "b")
    log.publish("game_outcome", outcome("a"), "a")
    log.publish("game_outcome", outcome("b"), "b")
    live = hub.unsubscribe(sub, ["game_outcomes"], on_live=sub.on_live)
    assert live.events == ("balance",) and live.seq == 2
    log.publish("game_outcome", outcome("b"), "b")
    log.publish("balance", balance("b"), "b")
    assert hub.flush(TIMEOUT)
    assert sub.seqs() == [2, 4]


def test_disconnect_stops_delivery(hub, log):
    sub = Sub()
    subscribe(hub, sub, ["game_outcomes"])
    assert hub.subscriber_count() == 1
    hub.disconnect(sub)
    log.publish("game_outcome", outcome("a"), "a")
    assert hub.flush(TIMEOUT)
    assert sub.got == [] and hub.subscriber_count() == 0


def test_on_live_runs_at_the_exact_point_of_the_stream(hub, log):
    """Everything before the change is not delivered, everything after is, and the reply sits between."""
    sub = Sub()
    for n in range(3):
        log.publish("game_outcome", outcome("a", n), "a")
    live = subscribe(hub, sub, ["game_outcomes"])
    log.publish("game_outcome", outcome("a", 9), "a")
    assert hub.flush(TIMEOUT)
    assert live.seq == 3
    assert sub.order == [live, sub.got[0]] and sub.seqs() == [4]


def test_snapshot_carries_the_board_as_of_the_change(hub, log):
    sub = Sub()
    live = subscribe(hub, sub, ["leaderboard"])
    assert live.snapshot and live.board == {"leaderboard": []}
    log.publish("leaderboard", board("a"))
    log.publish("game_outcome", outcome("a"), "a")
    later = Sub()
    live = subscribe(hub, later, ["leaderboard", "game_outcomes"])
    assert live.snapshot and live.board == board("a") and live.seq == 2
    live = subscribe(hub, later, ["game_outcomes"])
    assert not live.snapshot and live.board is None  # only a subscribe naming leaderboard gets one


def test_overflowing_subscriber_is_dropped_and_others_keep_everything(hub, log):
    slow, fast = Sub(capacity=3), Sub()
    subscribe(hub, slow, ["game_outcomes"])
    subscribe(hub, fast, ["game_outcomes"])
    for n in range(10):
        log.publish("game_outcome", outcome("a", n), "a")
    assert hub.flush(TIMEOUT)
    assert slow.seqs() == [1, 2, 3]  # refused the 4th, then forgotten: not asked again
    assert fast.seqs() == list(range(1, 11))
    assert subscribe is not None and hub.subscribe(slow, ["leaderboard"]) is None, "a dropped subscriber came back"


def test_many_publishers_keep_one_order_for_every_subscriber(hub, log):
    subs = [Sub() for _ in range(3)]
    for sub in subs:
        subscribe(hub, sub, ["game_outcomes"])

    def publish(user):
        for n in range(500):
            log.publish("game_outcome", outcome(user, n), user)

    threads = [threading.Thread(target=publish, args=(f"u{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert hub.flush(TIMEOUT)
    for sub in subs:
        assert sub.seqs() == list(range(1, 2001))
        for i in range(4):
            mine = [e.data["outcome_id"] for e in sub.got if e.user_id == f"u{i}"]
            assert mine == [f"out_{n}" for n in range(500)]


def test_feed_ignores_a_seq_already_taken_in_and_unknown_kinds(hub):
    sub = Sub()
    subscribe(hub, sub, list(TOPICS), "a")
    hub.feed(1, "game_outcome", outcome("a"), "a")
    hub.feed(1, "game_outcome", outcome("a", 1), "a")  # a duplicate (a reader that re-read an entry)
    hub.feed(2, "mystery", {}, None)  # numbered, retained, delivered to nobody (not as a leaderboard)
    hub.feed(3, "balance", balance("a"), "a")
    assert hub.flush(TIMEOUT)
    assert [(e.seq, e.kind) for e in sub.got] == [(1, "game_outcome"), (3, "balance")]
    assert sub.got[0].data["outcome_id"] == "out_0"


# -- history and recovery -----------------------------------------------------------------------


def test_recovery_replays_matching_retained_events_after_since(hub, log):
    first = Sub()
    live = subscribe(hub, first, ["game_outcomes", "balance"], "a")
    for n in range(6):
        log.publish("game_outcome", outcome("a" if n % 2 else "b", n), "a" if n % 2 else "b")
        log.publish("balance", balance("a", n), "a")
    assert hub.flush(TIMEOUT)
    seen = first.seqs()
    since = seen[2]  # it lost the connection after its third event
    again = Sub()
    live = subscribe(hub, again, ["game_outcomes", "balance"], "a", since=since, epoch=live.epoch)
    assert live.recovered is True and live.seq == 12 and not live.snapshot
    assert [e.seq for e in live.replay] == [s for s in seen if s > since]
    assert all(e.user_id == "a" for e in live.replay)
    log.publish("balance", balance("a", 99), "a")
    assert hub.flush(TIMEOUT)
    assert again.order == [live, *live.replay, again.got[-1]] and again.seqs() == [13]


def test_recovery_replays_only_the_topics_asked_for(hub, log):
    log.publish("game_outcome", outcome("a"), "a")
    log.publish("leaderboard", board("a"))
    log.publish("balance", balance("a"), "a")
    live = subscribe(hub, Sub(), ["leaderboard"], since=0, epoch=hub.epoch)
    assert live.recovered and [e.seq for e in live.replay] == [2] and not live.snapshot and live.board is None
    live = subscribe(hub, Sub(), ["game_outcomes"], since=3, epoch=hub.epoch)
    assert live.recovered and live.replay == ()  # nothing after since: recovered, nothing to replay


@pytest.mark.parametrize("case", ["wrong-epoch", "future-since"])
def test_no_recovery_for_another_epoch_or_a_seq_never_reached(case):
    hub = EventHub(catch_up=0.2).start()
    try:
        MemoryEventLog(hub).publish("game_outcome", outcome("a"), "a")
        since, epoch = (0, "not-" + hub.epoch) if case == "wrong-epoch" else (5, hub.epoch)
        live = subscribe(hub, Sub(), ["game_outcomes", "leaderboard"], since=since, epoch=epoch)
        assert live.recovered is False and live.replay == ()
        assert live.snapshot and live.board == {"leaderboard": []}
    finally:
        hub.stop()


def test_recovery_waits_for_a_since_this_hub_has_not_reached_yet():
    """A client saw seq 5 through another process; this hub's reader is at 3: it catches up, then recovers."""
    hub = EventHub(catch_up=TIMEOUT).start()
    try:
        for n in range(1, 4):
            hub.feed(n, "game_outcome", outcome("a", n), "a")
        sub, result = Sub(), []
        waiter = threading.Thread(target=lambda: result.append(
            hub.subscribe(sub, ["game_outcomes"], since=5, epoch=hub.epoch, on_live=sub.on_live, timeout=TIMEOUT)))
        waiter.start()
        wait_for(lambda: hub.pending_recoveries() == 1, timeout=TIMEOUT, message="the recovery to wait")
        assert not result, "went live before reaching since"
        for n in range(4, 8):
            hub.feed(n, "game_outcome", outcome("a", n), "a")
        waiter.join(TIMEOUT)
        live = result[0]
        assert live.recovered is True and live.seq >= 5
        hub.feed(8, "game_outcome", outcome("a", 8), "a")
        assert hub.flush(TIMEOUT)
        assert [e.seq for e in live.replay] + sub.seqs() == [6, 7, 8]
    finally:
        hub.stop()


def test_a_followed_log_makes_a_subscription_wait_for_its_head():
    """Another process published up to seq 5; this hub has read 3: `subscribed` comes at 5, and events
    3 to 5 (published before the subscription) are not delivered as new."""
    hub = EventHub(catch_up=TIMEOUT).start()
    hub.follow(lambda: 5)
    try:
        for n in range(1, 4):
            hub.feed(n, "game_outcome", outcome("a", n), "a")
        sub, result = Sub(), []
        waiter = threading.Thread(target=lambda: result.append(
            hub.subscribe(sub, ["game_outcomes"], on_live=sub.on_live, timeout=TIMEOUT)))
        waiter.start()
        wait_for(lambda: hub.pending_recoveries() == 1, timeout=TIMEOUT, message="the subscription to wait")
        assert not result, "went live before reaching the log's head"
        for n in range(4, 7):
            hub.feed(n, "game_outcome", outcome("a", n), "a")
        waiter.join(TIMEOUT)
        assert result[0].seq >= 5 and result[0].recovered is None
        assert hub.flush(TIMEOUT)
        assert all(seq > result[0].seq for seq in sub.seqs())
    finally:
        hub.stop()


def test_an_unreachable_log_head_does_not_hold_a_subscription():
    def head():
        raise ConnectionError("Redis is gone")

    hub = EventHub(catch_up=TIMEOUT).start()
    hub.follow(head)
    try:
        hub.feed(1, "game_outcome", outcome("a", 1), "a")
        live = hub.subscribe(Sub(), ["game_outcomes"], timeout=TIMEOUT)
        assert live is not None and live.seq == 1
    finally:
        hub.stop()


def test_a_waiting_recovery_ends_with_its_connection():
    hub = EventHub(catch_up=TIMEOUT).start()
    try:
        sub, result = Sub(), []
        waiter = threading.Thread(target=lambda: result.append(
            hub.subscribe(sub, ["game_outcomes"], since=9, epoch=hub.epoch, timeout=TIMEOUT)))
        waiter.start()
        wait_for(lambda: hub.pending_recoveries() == 1, timeout=TIMEOUT, message="the recovery to wait")
        hub.disconnect(sub)
        waiter.join(TIMEOUT)
        assert result == [None] and hub.subscriber_count() == 0
    finally:
        hub.stop()


def test_history_keeps_the_newest_events_and_refuses_older_since():
    hub = EventHub(history=5).start()
    try:
        log = MemoryEventLog(hub)
        for n in range(12):
            log.publish("game_outcome", outcome("a", n), "a")
        assert hub.flush(TIMEOUT)
        assert subscribe(hub, Sub(), ["game_outcomes"], since=6, epoch=hub.epoch).recovered is False
        live = subscribe(hub, Sub(), ["game_outcomes"], since=7, epoch=hub.epoch)
        assert live.recovered is True and [e.seq for e in live.replay] == [8, 9, 10, 11, 12]
    finally:
        hub.stop()


def test_default_history_holds_10000_events():
    assert HISTORY >= 10_000
    hub = EventHub().start()
    try:
        log = MemoryEventLog(hub)
        for n in range(HISTORY + 50):
            log.publish("balance", balance("a", n), "a")
        assert hub.flush(TIMEOUT)
        live = subscribe(hub, Sub(), ["balance"], "a", since=50, epoch=hub.epoch)
        assert live.recovered and len(live.replay) == HISTORY
        assert subscribe(hub, Sub(), ["balance"], "a", since=49, epoch=hub.epoch).recovered is False
    finally:
        hub.stop()


def test_each_hub_has_its_own_epoch():
    assert EventHub().epoch != EventHub().epoch
    assert EventHub("fixed").epoch == "fixed"


def test_replay_boundary_is_exact_under_concurrent_feeds(hub, log):
    """Subscribers that recover while four threads publish: replay + live is every event after since, once."""
    writers_done = threading.Event()

    def publish(user):
        n = 0
        while not writers_done.is_set() and n < 2000:  # 8,000 in all: every since stays retained
            log.publish("game_outcome", outcome(user, n), user)
            n += 1

    threads = [threading.Thread(target=publish, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        subs = []
        for back in range(30):
            sub = Sub()
            live = subscribe(hub, sub, ["game_outcomes"], since=max(0, hub.seq - back * 7), epoch=hub.epoch)
            subs.append((sub, live))
    finally:
        writers_done.set()
        for t in threads:
            t.join(TIMEOUT)
    assert hub.flush(TIMEOUT)
    last = hub.seq
    for sub, live in subs:
        assert live.recovered, live
        since = live.replay[0].seq - 1 if live.replay else live.seq
        got = [e.seq for e in live.replay] + sub.seqs()
        assert got == list(range(since + 1, last + 1)), f"gap or duplicate after since={since}"
        assert all(e.seq <= live.seq for e in live.replay) and all(s > live.seq for s in sub.seqs())


def test_reset_cancels_subscribers_and_adopts_the_new_history(hub, log):
    sub = Sub()
    old = subscribe(hub, sub, ["game_outcomes", "leaderboard"])
    log.publish("leaderboard", board("a"))
    hub.reset("epoch-2", 40)
    assert sub.cancelled == ["resync"]
    assert hub.epoch == "epoch-2" and hub.seq == 40
    hub.feed(41, "game_outcome", outcome("a"), "a")
    assert hub.flush(TIMEOUT)
    assert sub.seqs() == [1]  # nothing after the reset reaches a cancelled subscriber
    again = Sub()
    live = subscribe(hub, again, ["game_outcomes", "leaderboard"], since=1, epoch=old.epoch)
    assert live.recovered is False and live.epoch == "epoch-2" and live.seq == 41
    assert live.snapshot and live.board is None  # unknown after a reset: the front end reads the store
    live = subscribe(hub, Sub(), ["game_outcomes"], since=40, epoch="epoch-2")
    assert live.recovered and [e.seq for e in live.replay] == [41]


def test_preload_fills_the_history_without_delivering(hub):
    sub = Sub()
    subscribe(hub, sub, list(TOPICS), "a")
    events = [(n, "balance", balance("a", n), "a") if n != 95 else (n, "leaderboard", board("z"), None)
              for n in range(91, 101)]
    hub.preload(events, "shared", 100)
    assert hub.flush(TIMEOUT) and sub.got == []
    live = subscribe(hub, Sub(), ["balance", "leaderboard"], "a", since=94, epoch="shared")
    assert live.recovered and [e.seq for e in live.replay] == [95, 96, 97, 98, 99, 100]
    live = subscribe(hub, Sub(), ["leaderboard"])
    assert live.board == board("z") and live.seq == 100
    assert subscribe(hub, Sub(), ["balance"], "a", since=89, epoch="shared").recovered is False
    assert subscribe(hub, Sub(), ["balance"], "a", since=90, epoch="shared").recovered is True


def test_preload_before_start_needs_no_dispatcher():
    hub = EventHub()
    hub.preload([(1, "game_outcome", outcome("a"), "a")], "e", 1, board=board("q"))
    hub.start()
    try:
        live = subscribe(hub, Sub(), ["game_outcomes", "leaderboard"], since=0, epoch="e")
        assert live.recovered and [e.seq for e in live.replay] == [1]
        assert subscribe(hub, Sub(), ["leaderboard"]).board == board("q")
    finally:
        hub.stop()


def test_memory_of_a_full_history():
    """Bytes per retained event: the event, its data dict and strings, and the frame cached on it."""
    import ws

    hub = EventHub(history=HISTORY)
    log = MemoryEventLog(hub)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        hub.start()
        for n in range(HISTORY):
            user = f"user{n % 500:05d}"
            data = {"outcome_id": f"out_{n:012d}", "user_id": user, "game": "slots", "bet": 100,
                    "payout": 250, "net": 150, "balance": 100_000 + n,
                    "timestamp": f"2026-11-29T14:{n % 60:02d}:00.000000Z"}
            log.publish("game_outcome", data, user)
        live = hub.subscribe(Sub(), ["game_outcomes"], since=0, epoch=hub.epoch)
        assert live.recovered and len(live.replay) == HISTORY
        for event in live.replay:  # the first receiver encodes each event; the frame stays with it
            ws.event_frame(event)
        del live
        after = tracemalloc.take_snapshot()
    finally:
        hub.stop()
        tracemalloc.stop()
    per_event = sum(s.size_diff for s in after.compare_to(before, "filename")) / HISTORY
    print(f"\nretained history: {per_event:.0f} bytes per event ({per_event * HISTORY / 1e6:.1f} MB for {HISTORY})")
    assert per_event < 2000
