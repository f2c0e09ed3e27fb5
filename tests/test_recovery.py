"""Recovery after a reconnect (CONTRACT.md section 4), against the real process over real sockets.

A client that lost its connection comes back with `since` (the last seq it saw) and `epoch`, and gets
every retained event it missed that matches its subscription, in order, once, before any live event.
Nothing sleeps to synchronise: a live event triggered after the replay proves where the replay ended.
"""

import threading
import time

import pytest
import requests
from test_ws import TIMEOUT, WS, deposit, get_board, is_event, play

from redis_server import service_args


@pytest.fixture
def connect():
    """connect(url) -> WS; every client is closed at teardown."""
    clients = []

    def open_(url):
        clients.append(WS(url))
        return clients[-1]

    yield open_
    for ws in clients:
        ws.close()


def ledger(http, base, user_id):
    """The user's transactions, oldest first."""
    r = http.get(f"{base}/api/wallet/transactions/{user_id}?limit=1000", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return list(reversed(r.json()["transactions"]))


def first_session(connect, url, query):
    """Connect with a query subscription; return (its subscribed message, the client)."""
    ws = connect(f"{url}?{query}")
    sub = ws.expect("subscribed")
    assert "recovered" not in sub, "recovered appears only when the client asked to recover"
    assert isinstance(sub["epoch"], str) and sub["epoch"] and isinstance(sub["seq"], int)
    return sub, ws


def until_tx(ws, transaction_id, what="the sentinel"):
    return ws.until(is_event("balance", transaction_id=transaction_id), what=what)


def test_reconnect_gets_exactly_the_missed_events_in_order_then_live_ones(server, connect, uid, http):
    query = f"events=balance,game_outcomes&user_id={uid}"
    sub, ws = first_session(connect, server.ws_url, query)
    dep = deposit(http, server.url, uid, 1000)
    seen, _ = until_tx(ws, dep["transaction_id"], "the first deposit")
    ws.close()

    missed = [deposit(http, server.url, uid, 1), play(http, server.url, uid, 10, 25), deposit(http, server.url, uid, 2)]
    again = connect(f"{server.ws_url}?{query}&since={seen['seq']}&epoch={sub['epoch']}")
    hello = again.expect("subscribed", recovered=True, epoch=sub["epoch"], user_id=uid)
    assert sorted(hello["events"]) == ["balance", "game_outcomes"]
    replayed = [again.recv() for _ in range(5)]  # deposit; bet, win, outcome; deposit
    assert [m["type"] for m in replayed if m["type"] == "balance"] == ["balance"] * 4
    assert [m["seq"] for m in replayed] == sorted(m["seq"] for m in replayed)
    assert replayed[0]["seq"] > seen["seq"] and replayed[-1]["seq"] <= hello["seq"]
    entries = [e for e in ledger(http, server.url, uid) if e["transaction_id"] != dep["transaction_id"]]
    assert [m["data"]["transaction_id"] for m in replayed if m["type"] == "balance"] == \
        [e["transaction_id"] for e in entries]
    assert [m["data"]["outcome_id"] for m in replayed if m["type"] == "game_outcome"] == [missed[1]["outcome_id"]]
    assert replayed[-1]["data"]["transaction_id"] == missed[2]["transaction_id"]

    live = deposit(http, server.url, uid, 3)
    msg = again.recv()  # the very next message: nothing replayed twice, nothing else in between
    assert msg["type"] == "balance" and msg["data"]["transaction_id"] == live["transaction_id"]
    assert msg["seq"] > hello["seq"]


def test_replay_respects_the_user_filter(server, connect, uid, http):
    other = "o" + uid
    query = f"events=balance,game_outcomes&user_id={uid}"
    sub, ws = first_session(connect, server.ws_url, query)
    ws.close()
    deposit(http, server.url, other, 50)
    mine = deposit(http, server.url, uid, 40)
    play(http, server.url, other, 5, 0)
    again = connect(f"{server.ws_url}?{query}&since={sub['seq']}&epoch={sub['epoch']}")
    again.expect("subscribed", recovered=True)
    first = again.recv()
    assert first["type"] == "balance" and first["data"]["transaction_id"] == mine["transaction_id"]
    again.ping()  # the replay is over: nothing of the other user came with it
    assert all(m["data"]["user_id"] == uid for m in again.received if "data" in m)


def test_since_in_a_subscribe_message(server, connect, uid, http):
    sub, ws = first_session(connect, server.ws_url, f"events=balance&user_id={uid}")
    ws.close()
    missed = deposit(http, server.url, uid, 7)
    again = connect(server.ws_url)
    again.send({"action": "subscribe", "events": ["balance"], "user_id": uid, "since": sub["seq"],
                "epoch": sub["epoch"], "id": "r"})
    hello = again.expect("subscribed", id="r", recovered=True)
    assert hello["seq"] >= sub["seq"]
    msg = again.recv()
    assert msg["type"] == "balance" and msg["data"]["transaction_id"] == missed["transaction_id"]
    again.send({"action": "subscribe", "events": [], "id": "plain"})
    assert "recovered" not in again.expect("subscribed", id="plain")


def test_recovery_of_the_leaderboard_replays_instead_of_a_snapshot(start_server, store_args, connect, http):
    srv = start_server(*store_args)
    sub, ws = first_session(connect, srv.ws_url, "events=leaderboard")
    ws.expect("leaderboard")
    ws.close()
    play(http, srv.url, "alice", 0, 100)
    play(http, srv.url, "bob", 0, 50)
    again = connect(f"{srv.ws_url}?events=leaderboard&since={sub['seq']}&epoch={sub['epoch']}")
    again.expect("subscribed", recovered=True)
    boards = [again.recv(), again.recv()]
    assert [m["type"] for m in boards] == ["leaderboard", "leaderboard"]
    assert boards[-1]["data"] == get_board(http, srv.url)
    assert boards[0]["data"]["leaderboard"] == [{"rank": 1, "user_id": "alice", "net_winnings": 100}]
    again.ping()


@pytest.mark.parametrize("how", ["query", "message"])
def test_another_epoch_gets_recovered_false_a_snapshot_and_no_replay(server, connect, uid, http, how):
    sub, ws = first_session(connect, server.ws_url, f"events=balance,leaderboard&user_id={uid}")
    ws.expect("leaderboard")
    ws.close()
    deposit(http, server.url, uid, 5)
    stale = "x" + sub["epoch"]
    if how == "query":
        again = connect(f"{server.ws_url}?events=balance,leaderboard&user_id={uid}&since={sub['seq']}&epoch={stale}")
        hello = again.expect("subscribed", recovered=False)
    else:
        again = connect(server.ws_url)
        again.send({"action": "subscribe", "events": ["balance", "leaderboard"], "user_id": uid,
                    "since": sub["seq"], "epoch": stale, "id": 1})
        hello = again.expect("subscribed", id=1, recovered=False)
    assert hello["epoch"] == sub["epoch"]
    snapshot = again.expect("leaderboard")
    assert snapshot["seq"] == hello["seq"] and snapshot["data"] == get_board(http, server.url)
    _, skipped = again.ping()
    assert skipped == [], f"replayed despite recovered false: {skipped!r}"


def test_since_beyond_the_latest_event_is_not_recovered(server, connect, uid):
    sub, ws = first_session(connect, server.ws_url, f"events=balance&user_id={uid}")
    again = connect(f"{server.ws_url}?events=balance&user_id={uid}&since={sub['seq'] + 10**6}&epoch={sub['epoch']}")
    again.expect("subscribed", recovered=False)


@pytest.mark.heavy
@pytest.mark.memory_only("10,000 writes; what is retained is the hub's history whichever store feeds it, and "
                        "the Redis stream's trimming is test_redis_store's")
def test_history_too_old_gets_recovered_false(start_server, store_args, connect, http):
    srv = start_server(*store_args)
    sub, ws = first_session(connect, srv.ws_url, "events=balance&user_id=old0")
    ws.close()
    # More than the 10,000 retained events after `since`: 4 writers, 2,510 deposits each.
    def run(i):
        with requests.Session() as s:
            for _ in range(2510):
                r = s.post(srv.url + "/api/wallet/deposit", json={"user_id": f"old{i}", "amount": 1}, timeout=TIMEOUT)
                assert r.status_code == 200

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    again = connect(f"{srv.ws_url}?events=balance,leaderboard&user_id=old0&since={sub['seq']}&epoch={sub['epoch']}")
    hello = again.expect("subscribed", recovered=False)
    assert hello["seq"] >= sub["seq"] + 10_040
    again.expect("leaderboard")
    _, skipped = again.ping()
    assert skipped == []
    # One event later, still retained: recovered.
    third = connect(f"{srv.ws_url}?events=balance&user_id=old0&since={hello['seq'] - 5}&epoch={hello['epoch']}")
    third.expect("subscribed", recovered=True)


BAD_SINCE_QUERIES = ["since=-1&epoch=e", "since=abc&epoch=e", "since=1.5&epoch=e", "since=&epoch=e", "since=5",
                     "since=%2B5&epoch=e", "since=1e3&epoch=e", "since=" + "9" * 25 + "&epoch=e", "since=1&epoch="]


@pytest.mark.parametrize("query", BAD_SINCE_QUERIES)
def test_bad_since_in_the_query_gets_invalid_request_then_1008(server, connect, query):
    ws = connect(f"{server.ws_url}?events=game_outcomes&{query}")
    code, got = ws.expect_close()
    assert code == 1008
    assert len(got) == 1 and got[0]["type"] == "error" and got[0]["error"] == "invalid_request", got


BAD_SINCE_MESSAGES = {
    "negative": {"since": -1, "epoch": "e"},
    "string": {"since": "5", "epoch": "e"},
    "float": {"since": 1.0, "epoch": "e"},
    "bool": {"since": True, "epoch": "e"},
    "no-epoch": {"since": 3},
    "epoch-not-string": {"since": 3, "epoch": 7},
    "epoch-empty": {"since": 3, "epoch": ""},
}


@pytest.mark.parametrize("name", list(BAD_SINCE_MESSAGES))
def test_bad_since_in_a_message_is_invalid_message(server, connect, name):
    ws = connect(f"{server.ws_url}?events=leaderboard")
    ws.expect("subscribed")
    ws.expect("leaderboard")
    ws.send({"action": "subscribe", "events": ["game_outcomes"], "id": "e", **BAD_SINCE_MESSAGES[name]})
    ws.expect("error", id="e", error="invalid_message")
    assert ws.subscribed_state() == (["leaderboard"], None)  # the connection stays open, unchanged


def test_reconnect_while_threads_write_loses_and_repeats_nothing(server, connect, uid, http):
    """The union of what came before, the replay and the live events is the ledger, each entry once."""
    query = f"events=balance&user_id={uid}"
    deposit(http, server.url, uid, 1)
    sub, ws = first_session(connect, server.ws_url, query)
    stop = threading.Event()
    errors = []

    def write():
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(server.url + "/api/wallet/deposit", json={"user_id": uid, "amount": 1}, timeout=TIMEOUT)
                if r.status_code != 200:
                    errors.append(r.text)

    writers = [threading.Thread(target=write) for _ in range(3)]
    for w in writers:
        w.start()
    try:
        before = [ws.recv() for _ in range(20)]
        ws.close()
        seen = before[-1]["seq"]
        again = connect(f"{server.ws_url}?{query}&since={seen}&epoch={sub['epoch']}")
        again.expect("subscribed", recovered=True)
        after = [again.recv() for _ in range(40)]  # replayed, then live: the writers never stopped
    finally:
        stop.set()
        for w in writers:
            w.join()
    assert not errors, errors[:3]
    sentinel = deposit(http, server.url, uid, 2)
    msg, rest = until_tx(again, sentinel["transaction_id"])
    after += rest + [msg]
    got = [m["data"]["transaction_id"] for m in before + after]
    assert len(got) == len(set(got)), "an event was delivered twice"
    seqs = [m["seq"] for m in before + after]
    assert seqs == sorted(seqs)
    entries = [e["transaction_id"] for e in ledger(http, server.url, uid)]
    assert got == entries[1:], "the events are not the ledger after the subscription: a gap or a reordering"


@pytest.mark.memory_only("the in-process store forgets everything on a restart; with Redis the epoch "
                        "survives it: test_epoch_and_history_survive_a_restart_with_redis")
def test_a_restart_changes_the_epoch(start_server, connect, http):
    first = start_server()
    sub, ws = first_session(connect, first.ws_url, "events=game_outcomes")
    play(http, first.url, "r1", 0, 1)
    ws.until(lambda m: m["type"] == "game_outcome", what="the outcome")
    ws.close()
    assert first.stop() == 0
    second = start_server()
    again = connect(f"{second.ws_url}?events=game_outcomes&since={sub['seq']}&epoch={sub['epoch']}")
    hello = again.expect("subscribed", recovered=False)
    assert hello["epoch"] != sub["epoch"] and hello["seq"] == 0


def test_timing_of_a_large_replay(server, connect, uid, http):
    """500 missed events come back in one go, and the connection is live right after."""
    sub, ws = first_session(connect, server.ws_url, f"events=balance&user_id={uid}")
    ws.close()
    with requests.Session() as s:
        for _ in range(500):
            deposit(s, server.url, uid, 1)
    started = time.monotonic()
    again = connect(f"{server.ws_url}?events=balance&user_id={uid}&since={sub['seq']}&epoch={sub['epoch']}")
    again.expect("subscribed", recovered=True)
    replayed = [again.recv() for _ in range(500)]
    assert [m["data"]["balance"] for m in replayed] == list(range(1, 501))
    again.ping()
    assert time.monotonic() - started < TIMEOUT


# -- with the state in Redis (CONTRACT.md section 7) -------------------------------------------------


def test_recovery_across_processes_sharing_redis(start_server, connect, redis_server, uid, http):
    args = service_args(redis_server)
    a, b = start_server(*args), start_server(*args)
    query = f"events=balance&user_id={uid}"
    sub, ws = first_session(connect, a.ws_url, query)
    first = deposit(http, a.url, uid, 100)
    seen, _ = until_tx(ws, first["transaction_id"], "the first deposit")
    ws.close()
    missed = [deposit(http, b.url, uid, 1), deposit(http, a.url, uid, 2), deposit(http, b.url, uid, 3)]

    # Reconnect to the other process: same epoch, same seqs, the missed events in order.
    again = connect(f"{b.ws_url}?{query}&since={seen['seq']}&epoch={sub['epoch']}")
    hello = again.expect("subscribed", recovered=True, epoch=sub["epoch"])
    replayed = [again.recv() for _ in missed]
    assert [m["data"]["transaction_id"] for m in replayed] == [m["transaction_id"] for m in missed]
    assert [m["seq"] for m in replayed] == list(range(seen["seq"] + 1, seen["seq"] + 4))
    assert hello["seq"] >= replayed[-1]["seq"]
    live = deposit(http, a.url, uid, 4)  # written through the first process, delivered by the second
    msg = again.recv()
    assert msg["data"]["transaction_id"] == live["transaction_id"] and msg["seq"] == replayed[-1]["seq"] + 1


def test_epoch_and_history_survive_a_restart_with_redis(start_server, connect, redis_server, uid, http):
    args = service_args(redis_server)
    first = start_server(*args)
    sub, ws = first_session(connect, first.ws_url, f"events=balance&user_id={uid}")
    ws.close()
    missed = deposit(http, first.url, uid, 9)
    assert first.stop() == 0
    second = start_server(*args)
    again = connect(f"{second.ws_url}?events=balance&user_id={uid}&since={sub['seq']}&epoch={sub['epoch']}")
    again.expect("subscribed", recovered=True, epoch=sub["epoch"])
    msg = again.recv()
    assert msg["data"]["transaction_id"] == missed["transaction_id"]


def test_redis_losing_its_data_closes_subscribers_with_1011_and_changes_the_epoch(
        start_server, connect, own_redis_server, uid, http):
    srv = start_server(*service_args(own_redis_server))
    sub, ws = first_session(connect, srv.ws_url, f"events=balance,leaderboard&user_id={uid}")
    ws.expect("leaderboard")
    deposit(http, srv.url, uid, 5)
    own_redis_server.stop(kill=True)  # no persistence: everything is gone
    own_redis_server.start()
    code, _ = ws.expect_close(timeout=30)
    assert code == 1011
    again = connect(f"{srv.ws_url}?events=balance,leaderboard&user_id={uid}&since={sub['seq'] + 1}"
                    f"&epoch={sub['epoch']}")
    hello = again.expect("subscribed", recovered=False)
    assert hello["epoch"] != sub["epoch"]
    again.expect("leaderboard")
