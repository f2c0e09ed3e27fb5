"""Keep-alive HTTP/1.1 load generator on raw sockets.

Each worker process drives N connections with `selectors`, one request in flight per connection,
for a fixed time, and parses responses by Content-Length. Far cheaper per request than requests or
http.client, so that on a small machine the server, not the client, is what is measured.
"""

import json
import multiprocessing
import os
import selectors
import socket
import time

from common import percentile, raise_nofile


def build_request(method, path, host, body=None, headers=()):
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    payload = b""
    if body is not None:
        payload = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


class _Conn:
    __slots__ = ("sock", "requests", "buf", "sent_at", "kind")

    def __init__(self, sock, requests):
        self.sock = sock
        self.requests = requests  # one request per kind (one kind unless alternating)
        self.buf = b""
        self.sent_at = 0
        self.kind = 0  # the kind of the request in flight


def _connect(host, port):
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def worker(host, port, requests, start_at, warmup, duration, out, alternate=None, slot=0.25, cpus=None):
    """Drive one connection per entry of `requests` (bytes) from start_at (monotonic) on.

    Requests completed during the first `warmup` seconds are not counted; the run lasts
    warmup + duration seconds. Puts a summary dict on `out`. With `alternate` (a second list, one request
    per connection), the connections send `requests` and `alternate` in turns of `slot` seconds, and the
    summary has one entry per kind in "kinds": two loads measured in the same seconds, so a machine
    that drifts slows both alike.
    """
    raise_nofile()
    if cpus:
        os.sched_setaffinity(0, cpus)
    sel = selectors.DefaultSelector()
    conns = []
    sets = [requests] if alternate is None else [requests, alternate]
    for reqs in zip(*sets, strict=True):
        conn = _Conn(_connect(host, port), reqs)
        conns.append(conn)
        sel.register(conn.sock, selectors.EVENT_READ, conn)
    kinds = [{"statuses": {}, "latencies": []} for _ in sets]
    reconnects = errors = 0
    now = time.monotonic()
    if start_at > now:
        time.sleep(start_at - now)
    t0 = time.monotonic()
    count_from = t0 + warmup
    end = count_from + duration
    perf = time.perf_counter
    turns = len(sets)

    def send(conn, now_m):
        conn.kind = int((now_m - t0) / slot) % turns if turns > 1 else 0
        conn.sent_at = perf()
        conn.sock.send(conn.requests[conn.kind])

    for conn in conns:
        send(conn, t0)
    active = len(conns)
    while active:
        events = sel.select(0.5)
        now_m = time.monotonic()
        for key, _ in events:
            conn = key.data
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                errors += 1
                sel.unregister(conn.sock)
                conn.sock.close()
                if now_m < end:  # the server closed on us: open a new connection and go on
                    reconnects += 1
                    conn.sock = _connect(host, port)
                    conn.buf = b""
                    sel.register(conn.sock, selectors.EVENT_READ, conn)
                    send(conn, now_m)
                else:
                    active -= 1
                continue
            buf = conn.buf + data if conn.buf else data
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                conn.buf = buf
                continue
            head = buf[:head_end]
            lower = head.lower()
            i = lower.find(b"\r\ncontent-length:")
            length = 0
            if i >= 0:
                j = head.find(b"\r\n", i + 17)
                length = int(head[i + 17:j if j >= 0 else len(head)])
            total = head_end + 4 + length
            if len(buf) < total:
                conn.buf = buf
                continue
            # One request in flight, so anything beyond `total` would be a server bug: drop it.
            conn.buf = b""
            done = perf()
            if now_m >= count_from and now_m < end:
                status = head[9:12].decode()
                stats = kinds[conn.kind]
                stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
                stats["latencies"].append(done - conn.sent_at)
            closing = b"\r\nconnection: close" in lower
            if now_m >= end:
                sel.unregister(conn.sock)
                conn.sock.close()
                active -= 1
                continue
            if closing:
                reconnects += 1
                sel.unregister(conn.sock)
                conn.sock.close()
                conn.sock = _connect(host, port)
                sel.register(conn.sock, selectors.EVENT_READ, conn)
            send(conn, now_m)
        if time.monotonic() > end + 10:  # a request that never completes must not hang the benchmark
            errors += active
            break
    for conn in conns:
        try:
            conn.sock.close()
        except OSError:
            pass
    for stats in kinds:
        stats["latencies"].sort()
    first = kinds[0]
    out.put({"completed": len(first["latencies"]), "duration": duration, "statuses": first["statuses"],
             "errors": errors, "reconnects": reconnects, "latencies": first["latencies"], "kinds": kinds})


def run_alternating(host, port, first, second, duration=10.0, warmup=0.5, slot=0.25, cpus=None):
    """Two loads on one server in turns of `slot` seconds over the same connections: (first's, second's) figures.

    Each gets half of `duration`; rps is per second of its own turns.
    """
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.monotonic() + 0.8
    p = ctx.Process(target=worker, args=(host, port, first, start_at, warmup, duration, out, second, slot, cpus),
                    daemon=True)
    p.start()
    result = out.get(timeout=duration + warmup + 60)
    p.join(timeout=10)
    return tuple(_summary(k["latencies"], k["statuses"], duration / 2, result["errors"], result["reconnects"])
                 for k in result["kinds"])


def _summary(latencies, statuses, seconds, errors, reconnects):
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": (percentile(latencies, 50) or 0) * 1000,
        "p99_ms": (percentile(latencies, 99) or 0) * 1000,
        "max_ms": (latencies[-1] if latencies else 0) * 1000,
        "completed": len(latencies),
        "statuses": statuses,
        "errors": errors,
        "reconnects": reconnects,
    }


def run_load(host, port, requests, duration=5.0, warmup=0.5, processes=1):
    """Run `len(requests)` connections split over `processes` worker processes.

    Returns requests/s (2xx and others alike, counted only within the measured window), latency
    percentiles in milliseconds, the status counts, and errors (connections the server dropped).
    """
    chunks = [requests[i::processes] for i in range(processes)]
    return run_load_many([(host, port, chunk) for chunk in chunks if chunk], duration, warmup)


def run_load_many(targets, duration=5.0, warmup=0.5):
    """One worker process per (host, port, requests) target, all on the same clock; figures summed over all.

    For several servers at once (two service processes on one Redis): the aggregate rate, and latency
    percentiles over every request.
    """
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.monotonic() + 0.6 + 0.2 * len(targets)  # lets every worker connect before the clock starts
    procs = [ctx.Process(target=worker, args=(host, port, reqs, start_at, warmup, duration, out), daemon=True)
             for host, port, reqs in targets]
    for p in procs:
        p.start()
    results = [out.get(timeout=duration + warmup + 60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    latencies = sorted(x for r in results for x in r["latencies"])
    statuses = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return _summary(latencies, statuses, duration, sum(r["errors"] for r in results),
                    sum(r["reconnects"] for r in results))
