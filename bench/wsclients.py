"""Many WebSocket subscribers in one process: raw sockets, a hand-made handshake, minimal frame parsing.

One selector loop serves every connection (simple_websocket would start two threads per client).
The process is driven over a multiprocessing Pipe by `SubscriberPool` in the parent:

    ("connect", n, query, opts) -> opens n more connections and waits until each got `subscribed`
    ("wait", marker, timeout)   -> receipt times (monotonic ns) of the game_outcome for user `marker`
    ("stats",)                  -> counters
    ("close_stalled",)          -> closes the connections that stopped reading
    ("stop",)                   -> closes everything and exits

Frames are timestamped right after recv() returns, before any parsing. Server pings are answered,
so connections outlive the server's 25 s ping interval.
"""

import base64
import json
import multiprocessing
import os
import selectors
import socket
import struct
import time

from common import raise_nofile

MAX_HANDSHAKES_IN_FLIGHT = 64


class _WS:
    __slots__ = ("sock", "state", "buf", "stalled", "port")

    def __init__(self, sock, stalled):
        self.sock = sock
        self.state = "handshake"  # -> "open" (101 seen) -> "live" (subscribed) -> "closed"
        self.buf = b""
        self.stalled = stalled
        self.port = sock.getsockname()[1]


def _masked(opcode, payload):
    mask = os.urandom(4)
    n = len(payload)
    head = struct.pack("!BB", 0x80 | opcode, 0x80 | n) if n < 126 else struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


class Subscribers:
    def __init__(self, host, port, pipe):
        self.host, self.port, self.pipe = host, port, pipe
        self.sel = selectors.DefaultSelector()
        self.sel.register(pipe.fileno(), selectors.EVENT_READ, None)
        self.conns = []
        self.receipts = {}  # marker (user_id of the outcome) -> [monotonic ns, ...]
        self.counters = {"frames": 0, "game_outcome": 0, "leaderboard": 0, "other": 0, "pings": 0,
                         "closed_by_server": 0, "handshake_failed": 0, "close_codes": {}}
        self.pending = []  # (deadline, reply function) waiting on receipts

    # -- connections ---------------------------------------------------------

    def _open(self, query, stalled, rcvbuf):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect((self.host, self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /ws?{query} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                     .encode())
        sock.setblocking(False)
        ws = _WS(sock, stalled)
        self.sel.register(sock, selectors.EVENT_READ, ws)
        self.conns.append(ws)
        return ws

    def connect(self, n, query, opts):
        stalled, rcvbuf = opts.get("stalled", False), opts.get("rcvbuf")
        timeout = opts.get("timeout", 120)
        started = time.monotonic()
        first = len(self.conns)
        todo, waiting = n, []
        while todo or waiting:
            while todo and len(waiting) < MAX_HANDSHAKES_IN_FLIGHT:
                try:
                    waiting.append(self._open(query, stalled, rcvbuf))
                except OSError as exc:
                    self.counters["handshake_failed"] += 1
                    self.counters.setdefault("connect_errors", []).append(str(exc))
                todo -= 1
            self._poll(0.05, commands=False)
            waiting = [w for w in waiting if w.state in ("handshake", "open")]
            if time.monotonic() - started > timeout:
                break
        live = [w for w in self.conns[first:] if w.state == "live"]  # of the connections opened now
        for ws in live:
            if ws.stalled and ws.sock is not None:  # stop reading: the kernel buffers fill, then the server's
                try:
                    self.sel.unregister(ws.sock)
                except (KeyError, ValueError):
                    pass
        return {"live": sum(1 for w in live if not w.stalled), "stalled": sum(1 for w in live if w.stalled),
                "seconds": time.monotonic() - started, "failed": self.counters["handshake_failed"],
                "stalled_ports": [w.port for w in live if w.stalled]}

    def _close(self, ws):
        if ws.state == "closed":
            return
        ws.state = "closed"
        try:
            self.sel.unregister(ws.sock)
        except (KeyError, ValueError):
            pass
        ws.sock.close()

    # -- reading -------------------------------------------------------------

    def _on_readable(self, ws, now_ns):
        try:
            data = ws.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if ws.state != "closed":
                self.counters["closed_by_server"] += 1
                if ws.state == "handshake":
                    self.counters["handshake_failed"] += 1
            self._close(ws)
            return
        buf = ws.buf + data if ws.buf else data
        if ws.state == "handshake":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                ws.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.counters["handshake_failed"] += 1
                self._close(ws)
                return
            ws.state = "open"
            buf = buf[end + 4:]
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, hl = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, hl = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, hl = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            if n - pos < hl + length:
                break
            payload = buf[pos + hl:pos + hl + length]
            pos += hl + length
            self._on_frame(ws, b0 & 0x0F, payload, now_ns)
            if ws.state == "closed":
                return
        ws.buf = buf[pos:]

    def _on_frame(self, ws, opcode, payload, now_ns):
        c = self.counters
        c["frames"] += 1
        if opcode == 0x1:
            # Cheap classification first: only outcomes need their marker parsed out.
            if payload.startswith(b'{"type":"game_outcome"'):
                c["game_outcome"] += 1
                data = json.loads(payload)["data"]
                self.receipts.setdefault(data["user_id"], []).append(now_ns)
            elif payload.startswith(b'{"type":"leaderboard"'):
                c["leaderboard"] += 1
            elif payload.startswith(b'{"type":"subscribed"'):
                ws.state = "live"
            else:
                c["other"] += 1
        elif opcode == 0x9:
            c["pings"] += 1
            try:
                ws.sock.send(_masked(0xA, payload))
            except OSError:
                pass
        elif opcode == 0x8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            c["close_codes"][code] = c["close_codes"].get(code, 0) + 1
            c["closed_by_server"] += 1
            try:
                ws.sock.send(_masked(0x8, payload[:2]))
            except OSError:
                pass
            self._close(ws)

    # -- loop ----------------------------------------------------------------

    def _poll(self, timeout, commands=True):
        for key, _ in self.sel.select(timeout):
            if key.data is None:
                if commands:
                    self._command(self.pipe.recv())
                continue
            self._on_readable(key.data, time.monotonic_ns())

    def _command(self, msg):
        kind = msg[0]
        if kind == "connect":
            self.pipe.send(self.connect(msg[1], msg[2], msg[3]))
        elif kind == "wait":
            marker, timeout = msg[1], msg[2]
            self.pending.append((time.monotonic() + timeout, marker))
        elif kind == "stats":
            live = sum(1 for w in self.conns if w.state == "live" and not w.stalled)
            self.pipe.send({**self.counters, "live": live})
        elif kind == "close_stalled":
            stalled = [w for w in self.conns if w.stalled and w.state == "live"]
            for ws in stalled:
                self._close(ws)
            self.pipe.send(len(stalled))
        elif kind == "stop":
            for ws in self.conns:
                self._close(ws)
            self.pipe.send("stopped")
            raise SystemExit(0)

    def _answer_waits(self):
        if not self.pending:
            return
        live = sum(1 for w in self.conns if w.state == "live" and not w.stalled)
        keep = []
        now = time.monotonic()
        for deadline, marker in self.pending:
            got = self.receipts.get(marker, [])
            if len(got) >= live or now > deadline:
                self.pipe.send({"marker": marker, "times": self.receipts.pop(marker, []), "expected": live})
            else:
                keep.append((deadline, marker))
        self.pending = keep

    def run(self):
        while True:
            self._poll(0.05 if self.pending else 1.0)
            self._answer_waits()


def _main(host, port, pipe):
    raise_nofile()
    Subscribers(host, port, pipe).run()


class SubscriberPool:
    """Subscriber processes spread over `processes`; connections are added evenly."""

    def __init__(self, host, port, processes=4):
        ctx = multiprocessing.get_context("spawn")
        self.pipes, self.procs = [], []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_main, args=(host, port, child), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)
        self.count = 0

    def _all(self, msg, timeout=180):
        for pipe in self.pipes:
            pipe.send(msg)
        out = []
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise TimeoutError(f"subscriber process did not answer {msg[0]!r} within {timeout}s")
            out.append(pipe.recv())
        return out

    def connect(self, n, query, **opts):
        """Open n more connections in total (split over the processes) and wait until they are live."""
        k = len(self.pipes)
        shares = [n // k + (1 if i < n % k else 0) for i in range(k)]
        for pipe, share in zip(self.pipes, shares, strict=True):
            pipe.send(("connect", share, query, opts))
        results = [pipe.recv() if pipe.poll(opts.get("timeout", 120) + 30) else {"live": 0, "stalled": 0,
                   "failed": -1, "seconds": None, "stalled_ports": []} for pipe in self.pipes]
        self.count += sum(r["live"] for r in results)
        return {"live": sum(r["live"] for r in results), "stalled": sum(r["stalled"] for r in results),
                "failed": sum(r["failed"] for r in results),
                "stalled_ports": [p for r in results for p in r["stalled_ports"]]}

    def connect_one(self, query, **opts):
        """One connection, in the first process (used for the client that stops reading)."""
        self.pipes[0].send(("connect", 1, query, opts))
        return self.pipes[0].recv()

    def close_stalled(self):
        """Close the connections that stopped reading (the server then sees them go away)."""
        return sum(self._all(("close_stalled",)))

    def receipts(self, marker, timeout=15.0):
        """Receipt times (monotonic ns) of one outcome on every live connection, and how many were expected."""
        out = self._all(("wait", marker, timeout), timeout=timeout + 15)
        return [t for r in out for t in r["times"]], sum(r["expected"] for r in out)

    def stats(self):
        out = self._all(("stats",))
        total = {}
        for r in out:
            for k, v in r.items():
                if isinstance(v, int):
                    total[k] = total.get(k, 0) + v
                elif isinstance(v, dict):
                    d = total.setdefault(k, {})
                    for kk, vv in v.items():
                        d[kk] = d.get(kk, 0) + vv
        return total

    def stop(self):
        for pipe in self.pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
