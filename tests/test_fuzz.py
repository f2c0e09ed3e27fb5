"""Fuzzed HTTP bodies, paths and headers, and WebSocket messages, against the running server."""

import json
import socket

import requests
import simple_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
WRITE_PATHS = ["/api/wallet/deposit", "/api/wallet/withdraw", "/api/games/outcomes"]
ERROR_CODES = {"invalid_request", "not_found", "method_not_allowed", "insufficient_funds", "balance_limit_exceeded",
               "payload_too_large", "idempotency_key_reused"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=70),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
bodies = st.one_of(
    st.fixed_dictionaries({}, optional={"user_id": json_values, "amount": json_values, "game": json_values,
                                        "bet": json_values, "payout": json_values}),
    json_values,
)


def state(http, url, user):
    return (http.get(f"{url}/api/wallet/balance/{user}", timeout=5).json(),
            http.get(f"{url}/api/wallet/transactions/{user}", timeout=5).json())


def check_response(r):
    assert r.status_code != 500, r.text
    assert r.headers["Content-Type"] == "application/json"
    body = r.json()
    if r.status_code >= 400:
        assert body["error"] in ERROR_CODES and isinstance(body["message"], str)
    return body


@FUZZ
@given(path=st.sampled_from(WRITE_PATHS), body=bodies)
def test_fuzzed_json_bodies_never_500_and_refusals_change_nothing(server, http, path, body):
    before = state(http, server.url, "fuzzed")
    # Bodies without a user id are pointed at one wallet, so "changes nothing" has something to check.
    payload = {**body, "user_id": "fuzzed"} if isinstance(body, dict) and "user_id" not in body else body
    r = http.post(server.url + path, data=json.dumps(payload), timeout=5)
    check_response(r)
    if r.status_code != 200:
        assert state(http, server.url, "fuzzed") == before


@FUZZ
@given(raw=st.binary(max_size=300), content_type=st.sampled_from([None, "application/json", "text/plain", "x/y"]))
def test_fuzzed_raw_bodies(server, http, raw, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    check_response(http.post(server.url + "/api/wallet/deposit", data=raw, headers=headers, timeout=5))


@FUZZ
@given(segment=st.text(max_size=80), query=st.text(max_size=40))
def test_fuzzed_paths_and_queries(server, http, segment, query):
    for route in ("/api/wallet/balance/", "/api/wallet/transactions/", "/"):
        r = http.get(server.url + route + requests.utils.quote(segment, safe=""), params={"limit": query}, timeout=5)
        if route == "/" and not segment:
            continue  # the dashboard page
        check_response(r)


@FUZZ
@given(key=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300).map(str.strip),
       rid=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200).map(str.strip))
def test_fuzzed_headers(server, http, key, rid):
    r = http.post(server.url + "/api/wallet/deposit", json={"user_id": "fuzzhdr", "amount": 1},
                  headers={"Idempotency-Key": key, "X-Request-ID": rid}, timeout=5)
    check_response(r)
    assert r.headers["X-Request-ID"]
    if not key or len(key) > 255:
        assert r.status_code == 400


@settings(max_examples=40, deadline=None, derandomize=True)
@given(raw=st.one_of(st.binary(max_size=80), st.text(max_size=200), json_values.map(json.dumps)))
def test_fuzzed_raw_http_requests_get_json_or_close(server, raw):
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as s:
        data = raw if isinstance(raw, bytes) else raw.encode()
        s.sendall(data + b"\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    if reply:
        assert reply.startswith(b"HTTP/1.1 ")
        assert b"Content-Type: application/json" in reply or b" 200 " in reply


ws_messages = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=100),
    json_values.map(json.dumps),
    st.fixed_dictionaries({"action": st.sampled_from(["subscribe", "unsubscribe", "ping", "nope"])},
                          optional={"events": json_values | st.lists(st.sampled_from(
                              ["game_outcomes", "leaderboard", "balance", "x"]), max_size=4),
                                    "user_id": json_values, "id": json_values}).map(json.dumps),
)


def test_fuzzed_websocket_messages(server):
    """Every message gets a reply or the contract's close code, and the server keeps serving others."""

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(message=ws_messages)
    def run(message):
        ws = clients[0]
        ws.send(message)
        ws.send(json.dumps({"action": "ping", "id": "after"}))
        replies = []
        try:
            while True:
                raw = ws.receive(timeout=5)
                assert raw is not None, "no reply"
                reply = json.loads(raw)
                replies.append(reply)
                if reply.get("id") == "after" and reply["type"] == "pong":
                    break
        except simple_websocket.ConnectionClosed as exc:
            assert exc.reason in (1009,), exc.reason
            clients[0] = simple_websocket.Client.connect(server.ws_url)
            return
        for reply in replies[:-1]:
            assert reply["type"] in ("subscribed", "unsubscribed", "pong", "error", "leaderboard", "game_outcome",
                                     "balance")
            if reply["type"] == "error":
                assert reply["error"] == "invalid_message"

    clients = [simple_websocket.Client.connect(server.ws_url)]
    bystander = simple_websocket.Client.connect(server.ws_url)
    run()
    bystander.send(json.dumps({"action": "ping"}))
    assert json.loads(bystander.receive(5)) == {"type": "pong"}
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    assert "Traceback" not in server.log()
