"""Connection limits of CONTRACT.md section 1 against the real `python app.py`, over raw loopback sockets.

The cap (HTTP and WebSocket connections together; one more is answered 503 at once), the 10 s request-head
timeout (slow-loris), and recovery after a flood: /healthz answers within 1 s again within 10 s.
"""

import base64
import json
import os
import resource
import socket
import time

import pytest
import simple_websocket

import http_server
from conftest import peer_closes, wait_for

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(autouse=True)
def enough_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def read_reply(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in a body")
        body += chunk
    return int(head.split()[1]), body



def served_connection(port: int) -> socket.socket | None:
    """A keep-alive connection that got 200 for /healthz (so its server thread runs), or None if shed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(HEALTHZ)
    status, _ = read_reply(sock)
    if status == 200:
        return sock
    sock.close()
    return None


def healthz_seconds(port: int, timeout: float = 1.0) -> float | None:
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(HEALTHZ)
            status, _ = read_reply(s)
    except OSError:
        return None
    return time.monotonic() - start if status == 200 else None


def upgrade_request() -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")


def test_one_connection_past_the_cap_is_answered_503_at_once(start_server):
    srv = start_server("--max-connections", "20")
    websockets, held = [], []
    try:
        for _ in range(10):
            websockets.append(simple_websocket.Client.connect(srv.ws_url))
        for _ in range(10):
            # A connection still counted from start-up would make one of ours the shed one: retry until served.
            held.append(wait_for(lambda: served_connection(srv.http_port), timeout=10, message="a served connection"))
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", srv.http_port), timeout=5) as extra:
            extra.sendall(HEALTHZ)
            status, body = read_reply(extra)
            assert peer_closes(extra, 2)
        assert time.monotonic() - start < 1
        assert status == 503 and json.loads(body)["error"] == "unavailable"
        for sock in held:  # the 20 are unaffected
            sock.sendall(HEALTHZ)
            assert read_reply(sock)[0] == 200
        websockets.pop().close()
        # A freed place is given to the next connection as soon as its thread has ended.
        held.append(wait_for(lambda: served_connection(srv.http_port), timeout=10, message="the freed place"))
    finally:
        for ws in websockets:
            ws.close()
        for sock in held:
            sock.close()
    assert "Traceback" not in srv.log()


@pytest.mark.memory_only("the head timeout is http_server's, before any store is touched")
def test_a_request_head_must_arrive_within_10_seconds(server):
    """Slow-loris: a byte every 2 s does not extend the deadline; nor does idling after a response."""
    start = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", server.http_port), timeout=5)
    slow = socket.create_connection(("127.0.0.1", server.http_port), timeout=5)
    kept = served_connection(server.http_port)
    answered = time.monotonic()
    assert kept is not None
    with silent, slow, kept:
        slow_closed_at = None
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                slow_closed_at = time.monotonic()
                break
            if peer_closes(slow, 2):  # the two seconds between bytes, watching for the close
                slow_closed_at = time.monotonic()
                break
        assert slow_closed_at is not None and 9 < slow_closed_at - start < 14
        assert peer_closes(silent, 5) and 9 < time.monotonic() - start < 14
        assert peer_closes(kept, 5) and 9 < time.monotonic() - answered < 14


@pytest.mark.heavy
def test_a_flood_of_twice_the_cap_with_websocket_upgrades_dropped_at_once_leaves_healthz_fast(start_server):
    """Issue 14 finding 3: twice the default cap at once, half of them WebSocket upgrade requests."""
    cap = http_server.DEFAULT_MAX_CONNECTIONS
    srv = start_server()
    resting = _threads(srv)
    flood = []
    for i in range(cap * 2):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", srv.http_port))
        except BlockingIOError:
            pass
        flood.append((s, i % 2 == 0))
    for s, websocket in flood:
        wait_for(lambda s=s: _connected(s), timeout=10, message="the flood's connections")
        if websocket:
            s.sendall(upgrade_request())
    # Past the cap, connections are refused with 503 at once rather than queued.
    shed = wait_for(lambda: sum(_got_503(s) for s, _ in flood) >= cap * 9 // 10 or None, timeout=10,
                    message="503s for the connections past the cap")
    assert shed
    dropped = time.monotonic()
    for s, _ in flood:
        s.close()
    wait_for(lambda: healthz_seconds(srv.http_port, 1.0), timeout=10, interval=0.05,
             message="/healthz within 1 s after the flood")
    # ... and it stays fast: the threads of the closed connections have ended.
    wait_for(lambda: _threads(srv) <= resting + 5, timeout=max(0.5, dropped + 10 - time.monotonic()),
             message="the flood's threads to end")
    latencies = [healthz_seconds(srv.http_port, 1.0) for _ in range(20)]
    assert all(t is not None and t < 1 for t in latencies), latencies
    assert srv.proc.poll() is None and "Traceback" not in srv.log()


def _threads(srv) -> int:
    with open(f"/proc/{srv.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def _connected(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and _peer(sock)


def _peer(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
        return True
    except OSError:
        return False


def _got_503(sock: socket.socket) -> bool:
    try:
        return sock.recv(16, socket.MSG_PEEK | socket.MSG_DONTWAIT).startswith(b"HTTP/1.1 503")
    except OSError:
        return False


def test_sigterm_with_a_thousand_keep_alive_connections_closes_them_and_exits_promptly(start_server):
    srv = start_server()
    kept = [served_connection(srv.http_port) for _ in range(1000)]
    assert all(kept)
    silent = [socket.create_connection(("127.0.0.1", srv.http_port), timeout=5) for _ in range(200)]
    start = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - start < 5
    # Every connection ends: none is left waiting for an answer.
    assert all(peer_closes(s, 1) for s in kept + silent)
    for s in kept + silent:
        s.close()
