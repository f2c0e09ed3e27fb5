"""A few seconds of mixed load: HTTP writes, gRPC reads and WebSocket subscribers at once, on each store
(a server of its own: the users here are fixed names)."""

import json
import random
import threading
import time

import grpc
import requests
import simple_websocket

import wallet_pb2
import wallet_pb2_grpc
from conftest import wait_for

USERS = [f"soak{i}" for i in range(6)]
DURATION = 4.0


def test_mixed_soak_conserves_money_and_orders_events(start_server, store_args):
    srv = start_server(*store_args)
    # One watcher per user for balance events, plus one for everything public.
    watchers = {u: simple_websocket.Client.connect(f"{srv.ws_url}?events=balance,game_outcomes&user_id={u}")
                for u in USERS}
    public = simple_websocket.Client.connect(f"{srv.ws_url}?events=game_outcomes,leaderboard")
    received = {u: [] for u in [*USERS, "public"]}
    for ws in [*watchers.values(), public]:
        assert json.loads(ws.receive(5))["type"] == "subscribed"

    def read(name, ws):
        try:
            while True:
                raw = ws.receive(timeout=10)
                if raw is None:
                    return
                received[name].append(json.loads(raw))
        except simple_websocket.ConnectionClosed:
            pass

    readers = [threading.Thread(target=read, args=item, daemon=True)
               for item in [*watchers.items(), ("public", public)]]
    for t in readers:
        t.start()

    deposited, withdrawn, net = {u: 0 for u in USERS}, {u: 0 for u in USERS}, {u: 0 for u in USERS}
    lock = threading.Lock()
    errors = []
    deadline = time.monotonic() + DURATION

    def writer(seed):
        rng = random.Random(seed)
        with requests.Session() as s:
            while time.monotonic() < deadline:
                user = rng.choice(USERS)
                op = rng.random()
                if op < 0.4:
                    amount = rng.randint(1, 500)
                    r = s.post(srv.url + "/api/wallet/deposit", json={"user_id": user, "amount": amount}, timeout=10)
                    if r.status_code == 200:
                        with lock:
                            deposited[user] += amount
                elif op < 0.7:
                    amount = rng.randint(1, 500)
                    r = s.post(srv.url + "/api/wallet/withdraw", json={"user_id": user, "amount": amount}, timeout=10)
                    if r.status_code == 200:
                        with lock:
                            withdrawn[user] += amount
                else:
                    bet, payout = rng.randint(0, 300), rng.choice([0, 0, 100, 400])
                    r = s.post(srv.url + "/api/games/outcomes",
                               json={"user_id": user, "game": "soak", "bet": bet, "payout": payout}, timeout=10)
                    if r.status_code == 200:
                        with lock:
                            net[user] += payout - bet
                if r.status_code not in (200, 409):
                    errors.append((r.status_code, r.text))

    def grpc_reader():
        with grpc.insecure_channel(srv.grpc_target) as channel:
            stub = wallet_pb2_grpc.WalletServiceStub(channel)
            while time.monotonic() < deadline:
                reply = stub.GetBalance(wallet_pb2.GetBalanceRequest(user_id=random.choice(USERS)), timeout=10)
                if reply.balance < 0:
                    errors.append(("negative balance over gRPC", reply))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    threads += [threading.Thread(target=grpc_reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:5]

    finals = {}
    for user in USERS:
        finals[user] = requests.get(f"{srv.url}/api/wallet/balance/{user}", timeout=5).json()["balance"]
        # Money is conserved exactly: nothing lost, nothing invented.
        assert finals[user] == deposited[user] - withdrawn[user] + net[user]
        assert finals[user] >= 0

    def balance_events(user):
        return [m for m in received[user] if m["type"] == "balance"]

    for user in USERS:
        wait_for(lambda u=user: balance_events(u) and balance_events(u)[-1]["data"]["balance"] == finals[u],
                 message=f"{user}'s balance events to catch up")
    for name, messages in received.items():
        seqs = [m["seq"] for m in messages if "seq" in m]
        assert seqs == sorted(set(seqs)), f"{name}: seq not strictly increasing"
    for user in USERS:
        # Each user's balance events replay to the final balance, entry by entry.
        balance = 0
        for m in balance_events(user):
            d = m["data"]
            balance += d["amount"] if d["type"] in ("deposit", "win") else -d["amount"]
            assert balance == d["balance"] >= 0
        assert balance == finals[user]
    for ws in [*watchers.values(), public]:
        ws.close()
