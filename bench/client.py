"""The controller's own small clients: a blocking keep-alive HTTP client and one timed fan-out."""

import json
import re
import socket
import time

from common import percentile

HOST = "127.0.0.1"


class RawHTTP:
    """A blocking keep-alive HTTP/1.1 client that reconnects when the server closes."""

    def __init__(self, port):
        self.port = port
        self.sock = None

    def _connect(self):
        self.sock = socket.create_connection((HOST, self.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, method, path, body=None):
        payload = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
        data = (f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
        for attempt in range(2):
            if self.sock is None:
                self._connect()
            try:
                self.sock.sendall(data)
                return self._read()
            except OSError:
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _read(self):
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("server closed the connection")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        length = int(m.group(1)) if m else 0
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("server closed the connection")
            rest += chunk
        if re.search(rb"(?i)\r\nconnection:\s*close", head):
            self.close()
        return int(head[9:12]), rest[:length]

    def post(self, path, body):
        return self.request("POST", path, body)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def fanout_once(client, pool, marker, expected):
    t0 = time.monotonic_ns()
    status, _ = client.post("/api/games/outcomes", {"user_id": marker, "game": "slots", "bet": 0, "payout": 100})
    times, live = pool.receipts(marker)
    lat = sorted((t - t0) / 1e6 for t in times)
    return {"status": status, "received": len(lat), "expected": live,
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "max_ms": lat[-1] if lat else None}


