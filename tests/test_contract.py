"""CONTRACT.md walked point by point against the real `python app.py` (and, where cheaper, in-process).

Each test here closes a point that the other test files checked only in-process, only partly, or not at
all (the checklist is /tmp/team/H10_checklist.md): the JSON content type of every answer the server makes
itself, exact success shapes over sockets, idempotency through the real HTTP layer, the upper bound of net
winnings, the WebSocket ping interval, and the reply `id` on every WebSocket reply type. Tests on the
`server` fixture run with the state in the process and in Redis (conftest), as section 7 asks.
"""

import json
import signal
import socket
import time
import uuid

import grpc
import pytest
import requests
import simple_websocket

import wallet_pb2
import wallet_pb2_grpc
from conftest import wait_for

TIMEOUT = 10  # seconds; only a broken server gets near it
INT64_MAX = 2**63 - 1
DEPOSIT = "/api/wallet/deposit"
WITHDRAW = "/api/wallet/withdraw"
OUTCOMES = "/api/games/outcomes"
WS_KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
UPGRADE = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"


def new_id(prefix: str = "c") -> str:
    return prefix + uuid.uuid4().hex[:16]


def exchange(port: int, data: bytes) -> tuple[int, dict, bytes]:
    """Send raw bytes, read one answer (until its Content-Length or the close): (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        reply = b""
        while True:
            head, sep, body = reply.partition(b"\r\n\r\n")
            if sep:
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
                length = int(headers.get("content-length", "-1"))
                if 0 <= length <= len(body):
                    return int(lines[0].split()[1]), headers, body[:length]
            chunk = sock.recv(65536)
            if not chunk:
                assert sep, f"connection closed without an answer: {reply[:300]!r}"
                return int(lines[0].split()[1]), headers, body
            reply += chunk


def is_json(headers: dict) -> bool:
    return headers.get("content-type", "").split(";")[0].strip() == "application/json"


def ok(response: requests.Response, status: int = 200) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert is_json({k.lower(): v for k, v in response.headers.items()}), response.headers
    assert response.headers.get("X-Request-ID"), response.headers
    return response.json()


def refused(response: requests.Response, status: int, code: str) -> dict:
    body = ok(response, status)
    assert body["error"] == code and isinstance(body["message"], str) and body["message"], body
    return body


# -- section 3: "Every response body is JSON with Content-Type: application/json, errors and unknown routes
# included" -- also the answers the HTTP server and the WebSocket endpoint make before any route runs.

def _host(port: int) -> bytes:
    return b"Host: 127.0.0.1:%d\r\n" % port


SERVER_MADE = {
    # name: (request bytes with {host}, status, code)
    "header without colon": (b"GET /healthz HTTP/1.1\r\n{host}X-Junk\r\n\r\n", 400, "invalid_request"),
    "space before colon": (b"GET /healthz HTTP/1.1\r\n{host}X-Junk : 1\r\n\r\n", 400, "invalid_request"),
    "NUL in head": (b"GET /healthz HTTP/1.1\r\n{host}X-Junk: a\x00b\r\n\r\n", 400, "invalid_request"),
    "missing Host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400, "invalid_request"),
    "repeated Host": (b"GET /healthz HTTP/1.1\r\n{host}Host: y\r\n\r\n", 400, "invalid_request"),
    "malformed request line": (b"GARBAGE\r\n\r\n", 400, "invalid_request"),
    "TE and CL": (b"POST /api/wallet/deposit HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n"
                  b"Content-Length: 5\r\n\r\n0\r\n\r\n", 400, "invalid_request"),
    "TE not chunked": (b"POST /api/wallet/deposit HTTP/1.1\r\n{host}Transfer-Encoding: gzip\r\n\r\n",
                       400, "invalid_request"),
    "declared body over 64 KiB": (b"POST /api/wallet/deposit HTTP/1.1\r\n{host}Content-Length: 65537\r\n\r\n",
                                  413, "payload_too_large"),
    "chunked body over 64 KiB": (b"POST /api/wallet/deposit HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n"
                                 b"10001\r\n" + b"a" * 0x10001 + b"\r\n0\r\n\r\n", 413, "payload_too_large"),
    "unknown route": (b"GET /no/such/route HTTP/1.1\r\n{host}\r\n", 404, "not_found"),
    "unknown route under /api": (b"GET /api/nothing HTTP/1.1\r\n{host}\r\n", 404, "not_found"),
    "wrong method": (b"DELETE /api/leaderboard HTTP/1.1\r\n{host}\r\n", 405, "method_not_allowed"),
    "OPTIONS": (b"OPTIONS /api/wallet/deposit HTTP/1.1\r\n{host}\r\n", 405, "method_not_allowed"),
    "POST /ws": (b"POST /ws HTTP/1.1\r\n{host}Content-Length: 0\r\n\r\n", 405, "method_not_allowed"),
    "plain GET /ws": (b"GET /ws HTTP/1.1\r\n{host}\r\n", 400, "invalid_request"),
    "plain GET /ws/": (b"GET /ws/ HTTP/1.1\r\n{host}\r\n", 400, "invalid_request"),
    "upgrade without a key": (b"GET /ws HTTP/1.1\r\n{host}" + UPGRADE + b"Sec-WebSocket-Version: 13\r\n\r\n",
                              400, "invalid_request"),
    "cross-origin WebSocket": (b"GET /ws HTTP/1.1\r\n{host}Origin: http://evil.example\r\n" + UPGRADE + WS_KEY
                               + b"\r\n", 403, "forbidden"),
    "Origin null WebSocket": (b"GET /ws HTTP/1.1\r\n{host}Origin: null\r\n" + UPGRADE + WS_KEY + b"\r\n",
                              403, "forbidden"),
    "cross-origin write": (b"POST /api/wallet/deposit HTTP/1.1\r\n{host}Origin: http://evil.example\r\n"
                           b"Content-Length: 2\r\n\r\n{}", 403, "forbidden"),
    "bad user id in the path": (b"GET /api/wallet/balance/a%20b HTTP/1.1\r\n{host}\r\n", 400, "invalid_request"),
    "bad limit": (b"GET /api/wallet/transactions/abc?limit=1001 HTTP/1.1\r\n{host}\r\n", 400, "invalid_request"),
    "body not JSON": (b"POST /api/wallet/deposit HTTP/1.1\r\n{host}Content-Length: 4\r\n\r\n{bad", 400,
                      "invalid_request"),
}


@pytest.mark.memory_only("the HTTP layer answers these before any store is asked")
@pytest.mark.parametrize("name", list(SERVER_MADE))
def test_every_error_the_server_makes_is_a_json_envelope(server, name):
    data, status, code = SERVER_MADE[name]
    got, headers, body = exchange(server.http_port, data.replace(b"{host}", _host(server.http_port)))
    assert got == status, (got, body[:300])
    assert is_json(headers), headers
    envelope = json.loads(body)
    assert set(envelope) == {"error", "message"}, envelope
    assert envelope["error"] == code and isinstance(envelope["message"], str) and envelope["message"]


# -- section 3 table: exact success shapes over the real process ------------------------------------------


def test_success_rows_have_exactly_the_contract_fields(server, http):
    user = new_id()
    base = server.url
    body = ok(http.post(base + DEPOSIT, json={"user_id": user, "amount": 500}, timeout=TIMEOUT))
    assert set(body) == {"user_id", "balance", "transaction_id"} and body["user_id"] == user
    assert body["balance"] == 500
    body = ok(http.post(base + WITHDRAW, json={"user_id": user, "amount": 200}, timeout=TIMEOUT))
    assert set(body) == {"user_id", "balance", "transaction_id"} and body["balance"] == 300
    body = ok(http.post(base + OUTCOMES, json={"user_id": user, "game": "g-1", "bet": 100, "payout": 250},
                        timeout=TIMEOUT))
    assert set(body) == {"outcome_id", "user_id", "game", "bet", "payout", "net", "balance"}
    assert (body["user_id"], body["game"], body["bet"], body["payout"], body["net"], body["balance"]) == (
        user, "g-1", 100, 250, 150, 450)
    assert ok(http.get(f"{base}/api/wallet/balance/{user}", timeout=TIMEOUT)) == {"user_id": user, "balance": 450}
    txs = ok(http.get(f"{base}/api/wallet/transactions/{user}", timeout=TIMEOUT))
    assert set(txs) == {"user_id", "transactions"} and txs["user_id"] == user
    assert [(t["type"], t["amount"], t["balance"]) for t in txs["transactions"]] == [
        ("win", 250, 450), ("bet", 100, 200), ("withdraw", 200, 300), ("deposit", 500, 500)]
    for t in txs["transactions"]:
        assert set(t) == {"transaction_id", "type", "amount", "balance", "created_at"}
        assert t["created_at"].endswith("Z") or t["created_at"].endswith("+00:00")
    board = ok(http.get(base + "/api/leaderboard", timeout=TIMEOUT))
    assert set(board) == {"leaderboard"}
    for row in board["leaderboard"]:
        assert set(row) == {"rank", "user_id", "net_winnings"}
    assert ok(http.get(base + "/healthz", timeout=TIMEOUT)) == {"status": "ok"}
    assert ok(http.get(base + "/openapi.json", timeout=TIMEOUT))["openapi"].startswith("3.1")
    page = http.get(base + "/", timeout=TIMEOUT)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")


def test_integer_user_ids_and_64_bit_amount_edges_over_the_process(server, http):
    number = int(uuid.uuid4().int % 10**15) + 1  # a positive integer no other test uses
    body = ok(http.post(server.url + DEPOSIT, json={"user_id": number, "amount": INT64_MAX}, timeout=TIMEOUT))
    assert body["user_id"] == str(number) and body["balance"] == INT64_MAX
    assert ok(http.get(f"{server.url}/api/wallet/balance/{number}", timeout=TIMEOUT))["balance"] == INT64_MAX
    refused(http.post(server.url + DEPOSIT, json={"user_id": str(number), "amount": 1}, timeout=TIMEOUT),
            409, "balance_limit_exceeded")
    too_big = refused(http.post(server.url + DEPOSIT, json={"user_id": new_id(), "amount": 2**63}, timeout=TIMEOUT),
                      400, "invalid_request")
    assert "amount" in too_big["message"]
    poor = new_id()
    body = refused(http.post(server.url + WITHDRAW, json={"user_id": poor, "amount": 1}, timeout=TIMEOUT),
                   409, "insufficient_funds")
    assert body == {"error": "insufficient_funds", "message": "not enough money", "balance": 0}


# -- section 3, idempotency, through the real HTTP layer ------------------------------------------------


def test_idempotency_rules_through_the_process(server, http):
    user, key = new_id(), new_id("key-")
    url = server.url + DEPOSIT
    first = http.post(url, data=json.dumps({"user_id": user, "amount": 7}), headers={"Idempotency-Key": key},
                      timeout=TIMEOUT)
    assert ok(first)["balance"] == 7 and "Idempotent-Replayed" not in first.headers
    # The same JSON value with other spacing and key order, sent without a Content-Type.
    again = http.post(url, data=f'{{ "amount" : 7 ,\n "user_id" : "{user}" }}', headers={"Idempotency-Key": key},
                      timeout=TIMEOUT)
    assert ok(again) == ok(first) and again.headers.get("Idempotent-Replayed") == "true"
    # Another body, and the same body on another path: 422.
    refused(http.post(url, json={"user_id": user, "amount": 8}, headers={"Idempotency-Key": key}, timeout=TIMEOUT),
            422, "idempotency_key_reused")
    refused(http.post(server.url + WITHDRAW, json={"user_id": user, "amount": 7}, headers={"Idempotency-Key": key},
                      timeout=TIMEOUT), 422, "idempotency_key_reused")
    # Empty and over-long keys are invalid; 255 printable characters are fine.
    for bad in ("", "k" * 256):
        refused(http.post(url, json={"user_id": user, "amount": 1}, headers={"Idempotency-Key": bad},
                          timeout=TIMEOUT), 400, "invalid_request")
    long_key = new_id("L").ljust(255, "~")
    assert ok(http.post(url, json={"user_id": user, "amount": 1}, headers={"Idempotency-Key": long_key},
                        timeout=TIMEOUT))["balance"] == 8
    assert ok(http.get(f"{server.url}/api/wallet/balance/{user}", timeout=TIMEOUT))["balance"] == 8


def test_a_400_is_not_remembered_and_a_409_is_replayed_with_its_header(server, http):
    user, key, key409 = new_id(), new_id("k400-"), new_id("k409-")
    url = server.url + DEPOSIT
    refused(http.post(url, json={"user_id": user, "amount": 1.0}, headers={"Idempotency-Key": key},
                      timeout=TIMEOUT), 400, "invalid_request")
    first = http.post(url, json={"user_id": user, "amount": 5}, headers={"Idempotency-Key": key}, timeout=TIMEOUT)
    assert ok(first)["balance"] == 5 and "Idempotent-Replayed" not in first.headers
    wd = server.url + WITHDRAW
    refusal = http.post(wd, json={"user_id": user, "amount": 6}, headers={"Idempotency-Key": key409}, timeout=TIMEOUT)
    assert refused(refusal, 409, "insufficient_funds")["balance"] == 5
    assert "Idempotent-Replayed" not in refusal.headers
    ok(http.post(url, json={"user_id": user, "amount": 100}, timeout=TIMEOUT))
    # Now the withdrawal would succeed, but the key gives back the first answer and applies nothing.
    replay = http.post(wd, json={"user_id": user, "amount": 6}, headers={"Idempotency-Key": key409}, timeout=TIMEOUT)
    assert replay.status_code == 409 and replay.json() == refusal.json()
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert ok(http.get(f"{server.url}/api/wallet/balance/{user}", timeout=TIMEOUT))["balance"] == 105


# -- section 3: "Net winnings are exact and fit a signed 64-bit integer" (the upper bound) ---------------


def test_net_winnings_above_int64_max_are_409_and_change_nothing(client, uid):
    def post(path, body):
        return client.post(path, json=body)

    won = post(OUTCOMES, {"user_id": uid, "game": "g", "bet": 0, "payout": INT64_MAX})
    assert won.status_code == 200 and won.json["net"] == INT64_MAX
    assert post(WITHDRAW, {"user_id": uid, "amount": INT64_MAX}).status_code == 200  # balance 0, net at the max
    before = (client.get(f"/api/wallet/balance/{uid}").json, client.get(f"/api/wallet/transactions/{uid}").json,
              client.get("/api/leaderboard").json)
    for bet, payout in ((0, 1), (0, INT64_MAX)):
        r = post(OUTCOMES, {"user_id": uid, "game": "g", "bet": bet, "payout": payout})
        assert r.status_code == 409 and r.json["error"] == "balance_limit_exceeded", r.json
    assert post(DEPOSIT, {"user_id": uid, "amount": 5}).status_code == 200
    r = post(OUTCOMES, {"user_id": uid, "game": "g", "bet": 1, "payout": 2})  # net +1: still beyond
    assert r.status_code == 409 and r.json["error"] == "balance_limit_exceeded"
    r = post(OUTCOMES, {"user_id": uid, "game": "g", "bet": 2, "payout": 2})  # net +0: fine
    assert r.status_code == 200
    after_balance = client.get(f"/api/wallet/balance/{uid}").json
    assert after_balance["balance"] == before[0]["balance"] + 5
    assert client.get("/api/leaderboard").json == before[2]


def test_net_winnings_bounds_over_the_process(start_server, store_args, http):
    """Both ends of the signed 64-bit range of net winnings, exactly, whatever the store (a server of its own:
    a player at the maximum would top the shared server's leaderboard)."""
    server = start_server(*store_args)
    def play(user, bet, payout):
        return http.post(server.url + OUTCOMES, json={"user_id": user, "game": "g", "bet": bet, "payout": payout},
                         timeout=TIMEOUT)

    def row(user):
        board = ok(http.get(server.url + "/api/leaderboard", timeout=TIMEOUT))["leaderboard"]
        return [r["net_winnings"] for r in board if r["user_id"] == user]

    lucky, unlucky = new_id("lucky"), new_id("unlucky")
    assert ok(play(lucky, 0, INT64_MAX))["net"] == INT64_MAX
    ok(http.post(server.url + WITHDRAW, json={"user_id": lucky, "amount": INT64_MAX}, timeout=TIMEOUT))
    ok(http.post(server.url + DEPOSIT, json={"user_id": lucky, "amount": 10}, timeout=TIMEOUT))
    refused(play(lucky, 0, 1), 409, "balance_limit_exceeded")
    refused(play(lucky, 1, 2), 409, "balance_limit_exceeded")
    assert ok(play(lucky, 3, 3))["balance"] == 10
    assert ok(http.get(f"{server.url}/api/wallet/balance/{lucky}", timeout=TIMEOUT))["balance"] == 10
    assert row(lucky) == [INT64_MAX]
    ok(http.post(server.url + DEPOSIT, json={"user_id": unlucky, "amount": INT64_MAX}, timeout=TIMEOUT))
    assert ok(play(unlucky, INT64_MAX, 0))["net"] == -INT64_MAX
    ok(http.post(server.url + DEPOSIT, json={"user_id": unlucky, "amount": 10}, timeout=TIMEOUT))
    assert ok(play(unlucky, 1, 0))["balance"] == 9  # net winnings now exactly -2**63
    refused(play(unlucky, 1, 0), 409, "balance_limit_exceeded")
    refused(play(unlucky, 3, 1), 409, "balance_limit_exceeded")
    txs = ok(http.get(f"{server.url}/api/wallet/transactions/{unlucky}", timeout=TIMEOUT))["transactions"]
    assert [(t["type"], t["amount"]) for t in txs] == [("bet", 1), ("deposit", 10), ("bet", INT64_MAX),
                                                        ("deposit", INT64_MAX)]


# -- section 4: "The server sends WebSocket pings at least every 30 seconds" -------------------------------


def test_websocket_pings_are_sent_at_least_every_30_seconds(app):
    interval = app.config["SOCK_SERVER_OPTIONS"]["ping_interval"]
    assert interval and 0 < interval <= 30


# -- section 4: replies carry the client's id, whatever their type --------------------------------------


def test_every_reply_type_echoes_the_id_and_an_error_changes_nothing(server):
    client = simple_websocket.Client.connect(server.ws_url + "?events=leaderboard")
    try:
        def recv(events: bool = False) -> dict:
            """The next message; live leaderboard events (other tests' writes on this shared server) are
            skipped unless asked for."""
            while True:
                raw = client.receive(timeout=TIMEOUT)
                assert raw is not None, "no message"
                msg = json.loads(raw)
                if events or msg["type"] != "leaderboard":
                    return msg
                assert msg["seq"] > first["seq"], msg  # a live event, never a second snapshot

        # The nudge ping of the server makes the client process what came with the handshake.
        first = recv(events=True)
        assert first["type"] == "subscribed" and "recovered" not in first and "id" not in first
        assert isinstance(first["seq"], int) and isinstance(first["epoch"], str) and first["epoch"]
        snapshot = recv(events=True)
        assert snapshot["type"] == "leaderboard" and snapshot["seq"] == first["seq"]
        user = new_id()
        requests_ = [
            ({"action": "ping", "id": 1}, {"type": "pong", "id": 1}),
            ({"action": "ping", "id": "a"}, {"type": "pong", "id": "a"}),
            ({"action": "subscribe", "events": ["balance"], "id": 2}, "error"),
            ({"action": "subscribe", "events": ["nope"], "id": 3}, "error"),
            ({"action": "subscribe", "events": ["game_outcomes"], "user_id": "a b", "id": 4}, "error"),
            ({"action": "dance", "id": 5}, "error"),
            ({"action": "subscribe", "events": ["game_outcomes"], "since": 1, "id": 6}, "error"),
            ({"action": "subscribe", "events": [], "id": 7}, "subscribed"),
            ({"action": "subscribe", "events": ["balance"], "user_id": user, "id": 8}, "subscribed"),
            ({"action": "unsubscribe", "events": ["balance"], "id": 9}, "unsubscribed"),
        ]
        for message, expected in requests_:
            client.send(json.dumps(message))
            reply = recv()
            if isinstance(expected, dict):
                assert reply == expected
                continue
            assert reply["type"] == expected and reply["id"] == message["id"], (message, reply)
            if expected == "error":
                assert reply["error"] == "invalid_message" and reply["message"], reply
            elif expected == "subscribed":
                assert {"events", "user_id", "seq", "epoch"} <= set(reply) and "recovered" not in reply
            else:
                assert reply == {"type": "unsubscribed", "events": ["leaderboard"], "id": 9}
        client.send(b"\x00binary")
        reply = recv()
        assert reply["type"] == "error" and reply["error"] == "invalid_message"
        client.send(json.dumps({"action": "subscribe", "events": [], "id": "state"}))
        state = recv()
        assert (state["events"], state["user_id"], state["id"]) == (["leaderboard"], user, "state")
    finally:
        client.close()


# -- section 1: "On start it logs one line per listener with the address it actually bound" ----------------


@pytest.mark.memory_only("start-up lines do not depend on the store")
def test_each_listener_line_names_the_bound_port(server):
    log = wait_for(server.log, timeout=5)
    lines = [line for line in log.splitlines() if "listening on" in line]
    assert len(lines) == 2
    assert any(f":{server.http_port}" in line for line in lines)
    assert any(f":{server.grpc_port}" in line and "gRPC" in line for line in lines)


def test_listener_lines_and_the_auth_warning_are_logged_whatever_the_log_level(start_server):
    # Start-up waits for both listener lines (conftest reads the ports from them): at ERROR they must be there.
    srv = start_server("--log-level", "ERROR")
    lines = srv.log().splitlines()
    assert any(f"127.0.0.1:{srv.http_port}" in line and "listening on" in line for line in lines)
    assert any(f"127.0.0.1:{srv.grpc_port}" in line and "gRPC listening on" in line for line in lines)
    assert any("WARNING" in line and "authentication is OFF" in line for line in lines)
    # The level is still honoured: the other start-up INFO line (written before the listener lines) is not there.
    assert not any("state: in this process" in line for line in lines), lines


# -- section 6: "one line ... per WebSocket connect, subscription change and disconnect"; client text escaped --


@pytest.mark.memory_only("log lines do not depend on the store")
def test_websocket_connect_subscription_changes_and_disconnect_are_logged_one_line_each(server):
    user = new_id()
    client = simple_websocket.Client.connect(server.ws_url + "?events=leaderboard")
    peer = f"127.0.0.1:{client.sock.getsockname()[1]}"
    try:
        for message in ({"action": "subscribe", "events": ["balance"], "user_id": user, "id": 1},
                        {"action": "unsubscribe", "events": ["leaderboard"], "id": 2},
                        {"action": "subscribe", "events": ["bad\nname\x1b[31m\x00"], "id": 3},
                        {"action": "ping", "id": 4}):
            client.send(json.dumps(message))
        while True:  # every reply up to the pong: the messages before it were handled
            raw = client.receive(timeout=TIMEOUT)
            assert raw is not None, "no pong"
            if json.loads(raw).get("id") == 4:
                break
    finally:
        client.close()

    def mine() -> list[str]:
        return [line for line in server.log().splitlines() if peer in line]

    lines = wait_for(lambda: (lambda ls: ls if any("disconnected" in ln for ln in ls) else None)(mine()),
                     timeout=TIMEOUT, message=f"the disconnect line of {peer}")
    assert any("connected" in ln and "leaderboard" in ln for ln in lines), lines
    assert any("subscribed" in ln and "balance" in ln and user in ln for ln in lines), lines
    assert any("unsubscribed" in ln for ln in lines), lines
    assert sum("disconnected" in ln for ln in lines) == 1, lines
    refusal = [ln for ln in lines if "bad" in ln]
    assert refusal, lines
    for line in refusal:
        assert "\x1b" not in line and "\x00" not in line
    assert "\x1b" not in server.log() and "\x00" not in server.log()


# -- section 7: "Redis lost while running: ... 503 ... within 3 seconds (never a hang ...)": a Redis that stops
# answering (paused, or a network that drops packets) rather than one that refuses connections ---------------


@pytest.mark.memory_only("the test brings its own Redis")
def test_a_redis_that_hangs_gives_503_and_unavailable_within_3_seconds_then_resumes(own_redis_server, start_server,
                                                                                    uid):
    srv = start_server("--redis-url", own_redis_server.url, "--redis-prefix", "hang:")
    assert ok(requests.post(srv.url + DEPOSIT, json={"user_id": uid, "amount": 5}, timeout=TIMEOUT))["balance"] == 5
    client = simple_websocket.Client.connect(f"{srv.ws_url}?events=balance&user_id={uid}")
    assert json.loads(client.receive(timeout=TIMEOUT))["type"] == "subscribed"
    channel = grpc.insecure_channel(srv.grpc_target)
    stub = wallet_pb2_grpc.WalletServiceStub(channel)
    assert stub.GetBalance(wallet_pb2.GetBalanceRequest(user_id=uid), timeout=TIMEOUT).balance == 5
    own_redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        for method, path, body in (("POST", DEPOSIT, {"user_id": uid, "amount": 1}),
                                   ("GET", f"/api/wallet/balance/{uid}", None),
                                   ("GET", f"/api/wallet/transactions/{uid}", None),
                                   ("GET", "/api/leaderboard", None)):
            started = time.monotonic()
            response = requests.request(method, srv.url + path, json=body, timeout=TIMEOUT)
            assert time.monotonic() - started < 3.0, (path, time.monotonic() - started)
            refused(response, 503, "unavailable")
        started = time.monotonic()
        health = requests.get(srv.url + "/healthz", timeout=TIMEOUT)
        assert time.monotonic() - started < 3.0
        assert health.status_code == 503 and health.json() == {"status": "unavailable"}
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.GetBalance(wallet_pb2.GetBalanceRequest(user_id=uid), timeout=TIMEOUT)
        assert time.monotonic() - started < 3.0 and info.value.code() == grpc.StatusCode.UNAVAILABLE
        client.send(json.dumps({"action": "ping", "id": "alive"}))  # the WebSocket stays open meanwhile
        assert json.loads(client.receive(timeout=TIMEOUT)) == {"type": "pong", "id": "alive"}
    finally:
        own_redis_server.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: requests.get(srv.url + "/healthz", timeout=TIMEOUT).status_code == 200, timeout=15,
             message="/healthz 200 once Redis answers again")
    after = ok(requests.post(srv.url + DEPOSIT, json={"user_id": uid, "amount": 10}, timeout=TIMEOUT))["balance"]
    assert after in (15, 16)  # 16 only if the refused deposit reached Redis before its connection was dropped
    assert stub.GetBalance(wallet_pb2.GetBalanceRequest(user_id=uid), timeout=TIMEOUT).balance == after
    # Redis kept its data: the subscriber stays and gets the event of the write made after the outage.
    while True:
        event = json.loads(client.receive(timeout=TIMEOUT) or "null")
        assert event is not None and event["type"] == "balance", event
        if event["data"]["balance"] == after:
            break
    client.close()
    channel.close()
    assert "Traceback" not in srv.log()


# -- section 4: "The server sends WebSocket pings at least every 30 seconds", on the wire ---------------------


@pytest.mark.memory_only("pings do not depend on the store")
def test_an_idle_websocket_gets_a_ping_within_30_seconds(server):
    """A raw client that subscribes to nothing (so the server has no reason to write) still gets a ping frame."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=35) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\n" + _host(server.http_port) + UPGRADE + WS_KEY + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, "closed during the handshake"
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        connected = time.monotonic()
        while True:
            while len(data) < 2:
                chunk = sock.recv(4096)
                assert chunk, "closed before any ping"
                data += chunk
            opcode, length = data[0] & 0x0F, data[1] & 0x7F
            assert length < 126 and not data[1] & 0x80, data[:4]  # server frames: unmasked; ours are small
            while len(data) < 2 + length:
                data += sock.recv(4096)
            data = data[2 + length:]
            if opcode == 0x9:
                break
            assert opcode != 0x8, "closed instead of pinging"
        assert time.monotonic() - connected <= 30.5


# -- section 4: "A client that does not keep up (its outbound buffer of at least 1000 messages is full) is
# closed with 1013": a client 1,000 messages behind is NOT closed yet ---------------------------------------


def test_a_client_1000_messages_behind_is_not_cut_off(start_server):
    from test_ws import WS, RawWebSocket

    srv = start_server()
    n = 1000
    with requests.Session() as http:
        ok(http.post(srv.url + DEPOSIT, json={"user_id": "behind", "amount": 10 * n}, timeout=TIMEOUT))
        stalled = RawWebSocket(srv.ws_url + "?events=game_outcomes", rcvbuf=4096)
        reader = WS(srv.ws_url + "?events=game_outcomes")
        try:
            opcode, payload = stalled.frame()
            assert opcode == 1 and json.loads(payload)["type"] == "subscribed"
            reader.expect("subscribed")
            for i in range(n):  # the stalled client reads nothing meanwhile
                ok(http.post(srv.url + OUTCOMES, json={"user_id": "behind", "game": "g", "bet": 1, "payout": i % 2},
                             timeout=TIMEOUT))
            for _ in range(n):  # every event has been dispatched to both connections once the reader has it
                assert reader.recv()["type"] == "game_outcome"
            seqs = []
            while len(seqs) < n:
                opcode, payload = stalled.frame()
                assert opcode != 8, f"closed after {len(seqs)} messages: {payload[:2]!r}"
                if opcode == 1:
                    seqs.append(json.loads(payload)["seq"])
            assert seqs == sorted(set(seqs))
            # Still open: the next event arrives too.
            ok(http.post(srv.url + OUTCOMES, json={"user_id": "behind", "game": "g", "bet": 0, "payout": 0},
                         timeout=TIMEOUT))
            while True:
                opcode, payload = stalled.frame()
                assert opcode != 8, "closed"
                if opcode == 1:
                    assert json.loads(payload)["seq"] > seqs[-1]
                    break
        finally:
            stalled.close()
            reader.close()


def test_the_outbound_queue_holds_1000_messages_then_cuts_off():
    """The same rule at the unit level, where the kernel's socket buffers do not blur the count."""
    import ws
    from events import Event

    class BusySocket:  # the client reads nothing: every direct write attempt finds the socket busy
        def try_write(self, frame, queue):
            return None

        def wake(self):
            pass

    conn = ws.Connection(BusySocket(), hub=None, store=None, principal=None, peer="test")
    for seq in range(1, 1001):
        assert conn.deliver(Event(seq, "game_outcome", {"n": seq}, "u")) is True, seq
    assert not conn.cut_off and len(conn.queue) == 1000
    assert conn.deliver(Event(1001, "game_outcome", {"n": 1001}, "u")) is False
    assert conn.cut_off


# -- sections 3 and 4: the defaults the contract names, in both stores ----------------------------------------


def test_the_stores_default_to_the_contracts_numbers():
    import inspect

    import events
    import redis_store
    import wallet_store

    for store_class in (wallet_store.MemoryStore, redis_store.RedisStore):
        defaults = {name: p.default for name, p in inspect.signature(store_class).parameters.items()}
        assert defaults["idempotency_ttl"] == 24 * 3600, store_class  # "remembered for 24 hours"
        assert defaults["idempotency_cap"] == 1_000_000, store_class  # "default 1,000,000 keys"
        assert defaults["ledger_limit"] >= 1000, store_class  # "at least the newest 1000 per user are kept"
    assert events.HISTORY >= 10_000  # "at least the newest 10,000 events are retained"
