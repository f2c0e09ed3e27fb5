"""Several `python app.py` processes on one Redis (CONTRACT section 7), end to end over HTTP, gRPC and WebSocket.

Each process is the real program (tests/conftest.py `Server`); Redis is a private redis-server
(tests/redis_server.py). Most tests share one pair of processes and tell their data apart by user id.
"""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests
import simple_websocket

import wallet_pb2
import wallet_pb2_grpc
from conftest import ROOT, Server, wait_for
from redis_server import free_port, own_redis_server, redis_server, service_args, unique_prefix  # noqa: F401
from validation import INT64_MAX


@pytest.fixture(scope="module")
def pair(redis_server, tmp_path_factory):  # noqa: F811
    """Two processes sharing one Redis and one key prefix."""
    prefix = unique_prefix()
    log_dir = tmp_path_factory.mktemp("pair")
    servers = [Server(log_dir, service_args(redis_server, prefix)) for _ in range(2)]
    yield servers
    for srv in servers:
        code = srv.stop()
        assert code == 0, srv.log()[-3000:]
        assert "Traceback" not in srv.log(), srv.log()[-3000:]


def deposit(srv, user, amount, **kw):
    return requests.post(srv.url + "/api/wallet/deposit", json={"user_id": user, "amount": amount}, timeout=10, **kw)


def balance(srv, user):
    return requests.get(f"{srv.url}/api/wallet/balance/{user}", timeout=10).json()["balance"]


def grpc_balance(srv, user):
    with grpc.insecure_channel(srv.grpc_target) as channel:
        reply = wallet_pb2_grpc.WalletServiceStub(channel).GetBalance(
            wallet_pb2.GetBalanceRequest(user_id=user), timeout=5)
    return reply.balance


class WS:
    """A WebSocket client that subscribes by message (so nothing arrives together with the 101)."""

    def __init__(self, srv, query=""):
        self.ws = simple_websocket.Client.connect(srv.ws_url + query)

    def send(self, message):
        self.ws.send(json.dumps(message))

    def receive(self, timeout=10):
        text = self.ws.receive(timeout=timeout)
        assert text is not None, "no message in time"
        return json.loads(text)

    def subscribe(self, events, user_id=None, **extra):
        self.send({"action": "subscribe", "events": events, "user_id": user_id, **extra})
        reply = self.receive()
        assert reply["type"] == "subscribed", reply
        return reply

    def close(self):
        self.ws.close()


# -- one set of wallets ----------------------------------------------------------------------------


def test_a_write_on_one_process_is_read_on_the_other(pair, uid):
    a, b = pair
    assert deposit(a, uid, 250).json()["balance"] == 250
    assert balance(b, uid) == 250
    assert grpc_balance(b, uid) == 250
    r = requests.post(b.url + "/api/wallet/withdraw", json={"user_id": uid, "amount": 50}, timeout=10)
    assert r.json()["balance"] == 200
    assert balance(a, uid) == 200
    txs = requests.get(f"{a.url}/api/wallet/transactions/{uid}", timeout=10).json()["transactions"]
    assert [(t["type"], t["amount"], t["balance"]) for t in txs] == [("withdraw", 50, 200), ("deposit", 250, 250)]


def test_leaderboard_ranks_players_of_both_processes(pair, uid):
    a, b = pair
    for srv, user, payout in ((a, uid + "a", 10**15), (b, uid + "b", 10**15 + 1)):
        r = requests.post(srv.url + "/api/games/outcomes", timeout=10,
                          json={"user_id": user, "game": "dice", "bet": 0, "payout": payout})
        assert r.status_code == 200, r.text
    for srv in pair:
        board = requests.get(srv.url + "/api/leaderboard", timeout=10).json()["leaderboard"]
        ours = [(row["user_id"], row["net_winnings"]) for row in board if row["user_id"].startswith(uid)]
        assert ours == [(uid + "b", 10**15 + 1), (uid + "a", 10**15)]


def test_balances_at_the_64_bit_edge_are_exact_across_processes(pair, uid):
    a, b = pair
    assert deposit(a, uid, INT64_MAX - 1).json()["balance"] == INT64_MAX - 1
    assert deposit(b, uid, 1).json()["balance"] == INT64_MAX
    assert balance(a, uid) == INT64_MAX
    assert grpc_balance(a, uid) == INT64_MAX
    refused = deposit(a, uid, 1)
    assert refused.status_code == 409 and refused.json()["error"] == "balance_limit_exceeded"
    assert balance(b, uid) == INT64_MAX


def test_200_concurrent_withdrawals_split_across_both_never_overdraw(pair, uid):
    a, b = pair
    deposit(a, uid, 1000)

    def withdraw(i):
        with requests.Session() as session:
            srv = pair[i % 2]
            return session.post(srv.url + "/api/wallet/withdraw", json={"user_id": uid, "amount": 10}, timeout=30)

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(withdraw, range(200)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 100 and statuses.count(409) == 100, statuses
    assert all(r.json()["error"] == "insufficient_funds" for r in responses if r.status_code == 409)
    assert sorted(r.json()["balance"] for r in responses if r.status_code == 200) == list(range(0, 1000, 10))
    assert balance(a, uid) == balance(b, uid) == 0


def test_one_idempotency_key_sent_to_both_at_once_applies_once(pair, uid):
    key = "k-" + uid

    def send(i):
        return deposit(pair[i % 2], uid, 30, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(send, range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    assert len({r.text for r in responses}) == 1
    replayed = [r.headers.get("Idempotent-Replayed") for r in responses]
    assert replayed.count("true") == 19
    assert balance(pair[0], uid) == 30


def test_websocket_on_one_receives_events_of_writes_on_the_other_in_seq_order(pair, uid):
    a, b = pair
    ws = WS(a)
    try:
        live = ws.subscribe(["balance", "game_outcomes"], uid)
        for i in range(10):
            deposit(pair[i % 2], uid, i + 1)
        r = requests.post(b.url + "/api/games/outcomes", timeout=10,
                          json={"user_id": uid, "game": "dice", "bet": 5, "payout": 8})
        assert r.status_code == 200
        messages = [ws.receive() for _ in range(13)]  # 10 deposits, bet, win, game_outcome
        seqs = [m["seq"] for m in messages]
        assert seqs == sorted(set(seqs)) and seqs[0] > live["seq"]
        assert [m["type"] for m in messages] == ["balance"] * 12 + ["game_outcome"]
        assert [m["data"]["balance"] for m in messages[:10]] == [sum(range(1, n + 2)) for n in range(10)]
        assert messages[-1]["data"]["outcome_id"] == r.json()["outcome_id"]
        ws.send({"action": "ping"})
        assert ws.receive()["type"] == "pong"  # nothing was delivered twice
    finally:
        ws.close()


def test_both_processes_name_the_same_epoch(pair, uid):
    epochs = []
    for srv in pair:
        ws = WS(srv)
        try:
            epochs.append(ws.subscribe(["balance"], uid)["epoch"])
        finally:
            ws.close()
    assert epochs[0] == epochs[1] and epochs[0]


# -- crashes and outages ---------------------------------------------------------------------------


def test_sigkilled_process_loses_nothing_it_answered(redis_server, tmp_path, uid):  # noqa: F811
    prefix = unique_prefix()
    srv = Server(tmp_path, service_args(redis_server, prefix))
    answered = [deposit(srv, f"{uid}-{i}", i + 1).json()["balance"] for i in range(20)]
    ws = WS(srv)
    epoch = ws.subscribe(["balance"], f"{uid}-0")["epoch"]
    ws.close()
    srv.stop(signal.SIGKILL)
    again = Server(tmp_path, service_args(redis_server, prefix))
    try:
        assert [balance(again, f"{uid}-{i}") for i in range(20)] == answered
        # The event history survives too: the same epoch, and a client can resume from any seq.
        ws = WS(again)
        try:
            reply = ws.subscribe(["balance"], f"{uid}-3", since=0, epoch=epoch)
            assert reply["epoch"] == epoch and reply["recovered"] is True
            replay = ws.receive()
            assert (replay["type"], replay["data"]["user_id"], replay["data"]["balance"]) == ("balance", f"{uid}-3", 4)
        finally:
            ws.close()
    finally:
        assert again.stop() == 0


def test_redis_stopped_gives_503_then_everything_resumes(own_redis_server, tmp_path, uid):  # noqa: F811
    srv = Server(tmp_path, service_args(own_redis_server, "w:"))
    try:
        deposit(srv, uid, 5)
        ws = WS(srv)
        ws.subscribe(["balance"], uid)
        own_redis_server.stop()

        started = time.monotonic()
        r = deposit(srv, uid, 1)
        assert time.monotonic() - started < 3.0
        assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
        r = requests.get(f"{srv.url}/api/wallet/balance/{uid}", timeout=10)
        assert r.status_code == 503 and r.json()["error"] == "unavailable"
        health = requests.get(srv.url + "/healthz", timeout=10)
        assert health.status_code == 503 and health.json() == {"status": "unavailable"}
        with pytest.raises(grpc.RpcError) as info:
            grpc_balance(srv, uid)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        ws.send({"action": "ping"})
        assert ws.receive()["type"] == "pong"  # the WebSocket stays open

        own_redis_server.start()  # empty: this server keeps no data
        wait_for(lambda: requests.get(srv.url + "/healthz", timeout=10).status_code == 200, timeout=15,
                 message="/healthz 200 again")
        assert deposit(srv, uid, 2).json()["balance"] == 2
        # The history was lost with Redis: the subscriber is told to resync (1011) rather than left waiting.
        with pytest.raises(simple_websocket.ConnectionClosed) as closed:
            while True:
                message = ws.receive()
                assert message["type"] == "balance"
        assert closed.value.reason == 1011
    finally:
        srv.stop()
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


def test_unreachable_redis_at_start_up_exits_1_naming_host_and_port():
    port = free_port()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--http-port", "0", "--grpc-port", "0",
         "--redis-url", f"redis://:s3cret-pass@127.0.0.1:{port}/0"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 1, proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr
    assert "s3cret-pass" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
