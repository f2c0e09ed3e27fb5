"""The HTTP API through real sockets against the real `python app.py` (CONTRACT.md sections 1, 3 and 6).

Only what needs a socket or the process is here: chunked bodies, declared lengths, keep-alive, malformed
request lines, concurrency through the server's threads, the process's log lines. Validation, error
shapes, idempotency and authorization run in-process in test_app.py. Every test uses its own user ids.
"""

import json
import re
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import wait_for

TIMEOUT = 10  # seconds; a hung server fails the test instead of hanging it
MAX_BODY = 64 * 1024

DEPOSIT = "/api/wallet/deposit"
WITHDRAW = "/api/wallet/withdraw"
OUTCOMES = "/api/games/outcomes"
POST_ROUTES = [DEPOSIT, WITHDRAW, OUTCOMES]


# -- helpers -------------------------------------------------------------------------------------------


def new_id(prefix="u"):
    return prefix + uuid.uuid4().hex[:16]


def post(base, path, body=None, *, raw=None, headers=None, session=None):
    """POST a JSON body (or raw bytes/str) and return the response."""
    sender = session or requests
    if raw is None:
        return sender.post(base + path, json=body, headers=headers, timeout=TIMEOUT)
    return sender.post(base + path, data=raw, headers=headers, timeout=TIMEOUT)


def get(base, path, **kwargs):
    return requests.get(base + path, timeout=TIMEOUT, **kwargs)


def ok_json(response, status=200):
    """Assert status and JSON content type, return the decoded body."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers.get("Content-Type", "").split(";")[0].strip() == "application/json", response.headers
    return response.json()


def error_json(response, status, code):
    body = ok_json(response, status)
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"].strip(), body
    return body


def balance_of(base, user):
    return ok_json(get(base, f"/api/wallet/balance/{user}"))["balance"]


def transactions_of(base, user, limit=1000):
    return ok_json(get(base, f"/api/wallet/transactions/{user}?limit={limit}"))["transactions"]


def state(base, user):
    """Everything a refused request must leave as it was: the balance and the whole ledger."""
    return balance_of(base, user), transactions_of(base, user)


def deposit(base, user, amount, session=None):
    return ok_json(post(base, DEPOSIT, {"user_id": user, "amount": amount}, session=session))


def read_response(reader):
    """Read one HTTP/1.1 response from a socket file: (status, headers dict (lower-case), body bytes)."""
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1."), status_line
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = reader.readline()
        assert line, "connection closed inside the response head"
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", 0)))
    return status, headers, body


def raw_connection(srv):
    sock = socket.create_connection(("127.0.0.1", srv.http_port), timeout=TIMEOUT)
    return sock, sock.makefile("rb")


def raw_request(srv, data):
    sock, reader = raw_connection(srv)
    with sock, reader:
        sock.sendall(data)
        return read_response(reader)


def _padded(uid, size, amount=1):
    text = json.dumps({"user_id": uid, "amount": amount})
    return (text + " " * (size - len(text))).encode()


def _chunks(data, size=7000):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_chunked_body_of_exactly_64_kib_is_accepted(server, uid):
    data = _padded(uid, MAX_BODY, 77)
    response = post(server.url, DEPOSIT, raw=_chunks(data))
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert ok_json(response)["balance"] == 77


@pytest.mark.parametrize("path", POST_ROUTES)
def test_chunked_body_over_64_kib_is_413(server, uid, path):
    deposit(server.url, uid, 1000)
    before = state(server.url, uid)
    response = post(server.url, path, raw=_chunks(_padded(uid, MAX_BODY + 1)))
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    body = error_json(response, 413, "payload_too_large")
    assert set(body) == {"error", "message"}
    assert state(server.url, uid) == before


def test_declared_huge_body_is_413_without_sending_it(server):
    head = (f"POST {DEPOSIT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000000\r\n\r\n")
    status, headers, body = raw_request(server, head.encode())
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"] == "payload_too_large"


def idem(key):
    return {"Idempotency-Key": key}


def test_concurrent_requests_with_one_key_apply_once(server, uid):
    deposit(server.url, uid, 1000)
    key = new_id("k")
    payload = {"user_id": uid, "amount": 300}
    start = threading.Barrier(20)

    def send(_):
        with requests.Session() as session:
            session.get(server.url + "/healthz", timeout=TIMEOUT)  # connect first, so the posts race
            start.wait(timeout=TIMEOUT)
            return post(server.url, WITHDRAW, payload, headers=idem(key), session=session)

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(send, range(20)))
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses]
    bodies = [r.json() for r in responses]
    assert all(body == bodies[0] for body in bodies), bodies
    assert bodies[0]["balance"] == 700
    assert sum("Idempotent-Replayed" not in r.headers for r in responses) == 1
    assert all(r.headers.get("Idempotent-Replayed") == "true" for r in responses if "Idempotent-Replayed" in r.headers)
    assert balance_of(server.url, uid) == 700
    txs = transactions_of(server.url, uid)
    assert [t["type"] for t in txs] == ["withdraw", "deposit"]
    assert txs[0]["transaction_id"] == bodies[0]["transaction_id"]


# -- request ids and log lines of the process --------------------------------------------------------------


def _lines_with(server, text):
    wait_for(lambda: text in server.log(), timeout=5, message=f"log line with {text}")
    return [line for line in server.log().splitlines() if text in line]


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", DEPOSIT, '{"user_id": "log-user", "amount": 5}', 200),
    ("DELETE", "/healthz", None, 405),
])
def test_request_id_is_echoed_and_logged_once(server, method, path, body, status):
    rid = "rid-" + uuid.uuid4().hex
    response = requests.request(method, server.url + path, data=body, headers={"X-Request-ID": rid}, timeout=TIMEOUT)
    assert response.status_code == status
    assert response.headers["X-Request-ID"] == rid
    lines = _lines_with(server, rid)
    assert len(lines) == 1, lines
    assert re.search(rf"\b{method} {re.escape(path)} {status}\b", lines[0]), lines[0]
    assert re.search(r"\d+(\.\d+)? ?ms\b", lines[0]), lines[0]


def test_control_characters_from_the_client_are_escaped_in_the_log(server):
    """Decoded path and query bytes (CR, LF, ESC, NUL) and a bad X-Request-ID give one escaped line."""
    marker = uuid.uuid4().hex
    status, headers, _ = raw_request(server, (
        f"GET /api/wallet/balance/{marker}%0D%0A2026-01-01%20INFO%20forged%1B[2J%00?q=%0A%01 HTTP/1.1\r\n"
        "Host: x\r\nX-Request-ID: bad\xe9id\r\nConnection: close\r\n\r\n").encode("latin-1"))
    assert status in (400, 404), status
    lines = _lines_with(server, marker)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.isprintable(), repr(line)
    assert "\\r\\n2026-01-01 INFO forged\\x1b[2J\\x00" in line, line
    assert "bad\xe9id" not in line and headers["x-request-id"] != "bad\xe9id"


# -- raw HTTP framing ----------------------------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(server, uid):
    sock, reader = raw_connection(server)
    with sock, reader:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(reader)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert headers.get("connection", "").lower() != "close"
        payload = json.dumps({"user_id": uid, "amount": 9}).encode()
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (DEPOSIT.encode(), len(payload), payload))
        status, headers, body = read_response(reader)
        assert status == 200 and json.loads(body)["balance"] == 9
        sock.sendall(f"GET /api/wallet/balance/{uid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, body = read_response(reader)
        assert (status, json.loads(body)) == (200, {"user_id": uid, "balance": 9})


def test_keep_alive_survives_an_error_response(server):
    sock, reader = raw_connection(server)
    with sock, reader:
        sock.sendall(b"POST /api/wallet/deposit HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n{")
        status, _, body = read_response(reader)
        assert status == 400 and json.loads(body)["error"] == "invalid_request"
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(reader)
        assert (status, json.loads(body)) == (200, {"status": "ok"})


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /healthz HTTP/1.1 extra\r\n\r\n",
    b"\x00\x01\x02\xff\r\n\r\n",
    b"GET /healthz HTTP/x.y\r\nHost: x\r\n\r\n",
], ids=["garbage", "no path", "extra word", "binary", "bad version"])
def test_malformed_request_line_gets_json_400(server, request_bytes):
    status, headers, body = raw_request(server, request_bytes)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    decoded = json.loads(body)
    assert decoded["error"] == "invalid_request" and decoded["message"]
    assert b"<html" not in body.lower()


# -- no stack traces -----------------------------------------------------------------------------------


def test_no_stack_trace_in_the_log_after_bad_input(server):
    """Runs last in this file: by now the server has seen the bad input above, and a bit more here."""
    uid = new_id()
    for raw in ["{", "[]", "", "NaN", "[" * 30000 + "]" * 30000, '{"user_id": "x", "amount": %s}' % ("9" * 5000)]:
        error_json(post(server.url, DEPOSIT, raw=raw), 400, "invalid_request")
    error_json(post(server.url, DEPOSIT, raw=b'{"user_id": "\xff"}'), 400, "invalid_request")
    raw_request(server, b"GARBAGE\r\n\r\n")
    deposit(server.url, uid, 1)
    rid = "last-" + uuid.uuid4().hex
    get(server.url, "/healthz", headers={"X-Request-ID": rid})
    wait_for(lambda: rid in server.log(), timeout=5, message="the last log line")
    log = server.log()
    assert "Traceback" not in log, log[-5000:]
    assert "internal_error" not in log and "unhandled error" not in log, log[-5000:]
