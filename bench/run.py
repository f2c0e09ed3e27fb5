"""`make bench`: start the real server, measure, print a table, write bench/results.json and BENCHMARKS.md.

Every figure is the median of several runs; every throughput is a ratio against a baseline measured
in the same run on the same machine. Load generators run in their own processes. See BENCHMARKS.md.

    .venv/bin/python bench/run.py               # everything (about 8 minutes on 2 cores)
    .venv/bin/python bench/run.py --rows 1,4    # some rows only (results.json/BENCHMARKS.md untouched)
    .venv/bin/python bench/run.py --quick       # short smoke run of everything (not recorded either)
"""

import argparse
import json
import multiprocessing
import os
import sys
import time
from datetime import UTC, datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import rows_more  # noqa: E402
from client import HOST, RawHTTP, fanout_once  # noqa: E402
from common import (  # noqa: E402
    BENCH,
    ROOT,
    ServerProcess,
    app_server,
    deposit_requests,
    free_port,
    log,
    median,
    median_of,
    ms,
    rounded,
    yes_no,
)

RESULTS = BENCH / "results.json"
DOC = ROOT / "BENCHMARKS.md"

# Fan-out baseline quoted in the issue: a naive thread-per-connection broadcast at 1,000 subscribers.
ISSUE_BASELINE = "naive broadcast, 1,000 subs: p99 179 ms (gunicorn) / 348 ms (werkzeug), ~190 MB RSS"




def _outcome_stream(port, rate, stop, out):
    """Post game outcomes at a fixed rate, rotating 20 players so that the top 10 keeps changing."""
    import random

    rng = random.Random(5)
    client = RawHTTP(port)
    sent, statuses = 0, {}
    interval = 1.0 / rate
    next_at = time.monotonic()
    while not stop.is_set():
        status, _ = client.post("/api/games/outcomes", {"user_id": f"lb{sent % 20}", "game": "slots", "bet": 0,
                                                         "payout": rng.randint(1, 1000)})
        statuses[status] = statuses.get(status, 0) + 1
        sent += 1
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            stop.wait(delay)
    client.close()
    out.put({"sent": sent, "statuses": statuses})


class OutcomeStream:
    def __init__(self, port, rate):
        ctx = multiprocessing.get_context("spawn")
        self.stop_event = ctx.Event()
        self.out = ctx.Queue()
        self.proc = ctx.Process(target=_outcome_stream, args=(port, rate, self.stop_event, self.out), daemon=True)
        self.proc.start()

    def stop(self):
        self.stop_event.set()
        result = self.out.get(timeout=30)
        self.proc.join(timeout=10)
        return result


def tcp_queues(client_port, server_port):
    """Kernel queues of one loopback connection: (client Recv-Q, server Send-Q) in bytes, from /proc/net/tcp."""
    recv_q = send_q = None
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            local, remote, queues = parts[1], parts[2], parts[4]
            lport, rport = int(local.split(":")[1], 16), int(remote.split(":")[1], 16)
            tx, rx = (int(x, 16) for x in queues.split(":"))
            if lport == client_port and rport == server_port:
                recv_q = rx
            elif lport == server_port and rport == client_port:
                send_q = tx
    return recv_q, send_q


# -- rows ----------------------------------------------------------------------






def row_http(cfg):
    """Row 1: deposit requests/s and p99 at 16 and 64 keep-alive connections vs a constant Flask route."""
    from httpload import run_load

    app = app_server("row1-app")
    port = free_port()
    base = ServerProcess("row1-baseline", ["bench/baseline_http.py", "--port", str(port)], [port])
    out = {}
    try:
        runs = {(c, kind): [] for c in cfg.conns for kind in ("app", "baseline")}
        for i in range(cfg.runs):
            for conns in cfg.conns:
                reqs = deposit_requests(conns)
                for kind, p, rq in (("baseline", port, reqs), ("app", app.http_port, reqs)):
                    r = run_load(HOST, p, rq, duration=cfg.duration, processes=cfg.loadgen_procs)
                    runs[(conns, kind)].append(r)
                    log(f"  row 1 run {i + 1}: {kind:8} {conns:3} conns: {r['rps']:7.0f} req/s"
                        f"  p99 {r['p99_ms']:6.1f} ms  statuses {r['statuses']} errors {r['errors']}")
        for conns in cfg.conns:
            a, b = runs[(conns, "app")], runs[(conns, "baseline")]
            out[str(conns)] = {
                "rps": median_of(a, "rps"), "p99_ms": median_of(a, "p99_ms"), "p50_ms": median_of(a, "p50_ms"),
                "baseline_rps": median_of(b, "rps"), "baseline_p99_ms": median_of(b, "p99_ms"),
                "ratio": median_of(a, "rps") / median_of(b, "rps"),
                "run_ratios": [x["rps"] / y["rps"] for x, y in zip(a, b, strict=True)],
                "non_200": sum(v for r in a for k, v in r["statuses"].items() if k != "200"),
                "errors": sum(r["errors"] for r in a + b),
                "runs": {"app": [rounded(r) for r in a], "baseline": [rounded(r) for r in b]},
            }
    finally:
        out["app_exit"] = app.stop()[0]
        base.stop()
    return out






def row_grpc(cfg):
    """Row 2: GetBalance calls/s and p99, 16 concurrent calls: the service vs a constant servicer."""
    from grpcload import run_load

    servers = []
    try:
        targets = []
        port = free_port()
        servers.append(ServerProcess("row2-constant", ["bench/baseline_grpc.py", "--port", str(port),
                                                       "--mode", "constant"], [port]))
        targets.append(("constant", f"{HOST}:{port}", None))
        app = app_server("row2-app")
        servers.append(app)
        RawHTTP(app.http_port).post("/api/wallet/deposit", {"user_id": "bench1", "amount": 100})
        targets.append(("app", f"{HOST}:{app.grpc_port}", None))
        runs = {kind: [] for kind, _, _ in targets}
        for i in range(cfg.runs):
            for kind, target, token in targets:
                r = run_load(target, "bench1", concurrency=16, duration=cfg.duration, token=token)
                runs[kind].append(r)
                log(f"  row 2 run {i + 1}: {kind:8} {r['rps']:7.0f} calls/s  p99 {r['p99_ms']:6.1f} ms  {r['codes']}")
        a, b = runs["app"], runs["constant"]
        out = {
            "rps": median_of(a, "rps"), "p99_ms": median_of(a, "p99_ms"), "p50_ms": median_of(a, "p50_ms"),
            "baseline_rps": median_of(b, "rps"), "baseline_p99_ms": median_of(b, "p99_ms"),
            "ratio": median_of(a, "rps") / median_of(b, "rps"),
            "run_ratios": [x["rps"] / y["rps"] for x, y in zip(a, b, strict=True)],
            "non_ok": sum(v for r in a for k, v in r["codes"].items() if k != "OK"),
            "runs": {kind: [rounded(r) for r in rs] for kind, rs in runs.items()},
        }
        return out
    finally:
        for srv in servers:
            srv.stop()


def row_fanout(cfg):
    """Row 3: one outcome delivered to 100 / 1,000 / 5,000 subscribers; latency and server RSS per connection."""
    from wsclients import SubscriberPool

    # Each WebSocket holds one of the server's connections: the cap must be above the largest size measured.
    app = app_server("row3-app", "--max-connections", str(max(cfg.fanout_sizes) + 100))
    pool = SubscriberPool(HOST, app.http_port, processes=cfg.ws_procs)
    client = RawHTTP(app.http_port)
    out = {"sizes": {}}
    try:
        client.request("GET", "/healthz")
        time.sleep(0.5)
        st0 = app.status()
        out["rss0_kib"], out["threads0"] = st0["VmRSS"], st0["Threads"]
        connected = 0
        for size in cfg.fanout_sizes:
            t = time.monotonic()
            failed = 0
            while connected < size:  # in steps, so that progress shows and one stuck step is visible
                step = min(500, size - connected)
                r = pool.connect(step, "events=game_outcomes", timeout=60)
                connected += r["live"]
                failed += r["failed"]
                if r["live"] < step:
                    log(f"  row 3: only {r['live']} of {step} connections went live (failed {r['failed']})")
                    break
            connect_s = time.monotonic() - t
            time.sleep(1.0)
            st = app.status()
            res = {"connected": connected, "connect_seconds": round(connect_s, 1), "connect_failed": failed,
                   "rss_kib": st["VmRSS"], "threads": st["Threads"],
                   "rss_per_conn_kib": (st["VmRSS"] - out["rss0_kib"]) / max(connected, 1), "outcomes": []}
            log(f"  row 3: {connected} subscribers live in {connect_s:.1f} s; server RSS {st['VmRSS'] / 1024:.0f} MiB,"
                f" {st['Threads']} threads")
            for k in range(cfg.fanout_outcomes if size < 5000 else min(3, cfg.fanout_outcomes)):
                o = fanout_once(client, pool, f"fan{size}x{k}", connected)
                res["outcomes"].append(o)
                log(f"  row 3: {size} subs, outcome {k + 1}: received {o['received']}/{o['expected']}"
                    f"  p50 {o['p50_ms']:.1f}  p99 {o['p99_ms']:.1f}  max {o['max_ms']:.1f} ms")
                time.sleep(cfg.fanout_pause)
            for key in ("p50_ms", "p99_ms", "max_ms"):
                res[key] = median([o[key] for o in res["outcomes"] if o[key] is not None])
            res["all_delivered"] = all(o["received"] == o["expected"] == connected for o in res["outcomes"])
            out["sizes"][str(size)] = res
        out["client_stats"] = pool.stats()
        # Shutdown with every subscriber still connected (the README promises under 5 s).
        out["shutdown_with_connections"] = connected
        code, seconds = app.stop(timeout=cfg.shutdown_timeout)
        out["shutdown_seconds"], out["shutdown_exit"] = round(seconds, 1), code
        log(f"  row 3: SIGTERM with {connected} WebSockets open: exit {code} after {seconds:.1f} s")
        out["emfile_in_log"] = "Too many open files" in app.log_text()
    finally:
        client.close()
        pool.stop()
        app.stop()
    return out


def row_settle(cfg):
    """Row 4: time per settle with 1k / 100k / 1M players on the leaderboard (in-process)."""
    from inproc import in_fresh_process

    out = {}
    for n in cfg.settle_sizes:
        r = in_fresh_process("settle", players=n, settles=cfg.settles, runs=3)
        out[str(n)] = r
        log(f"  row 4: {n:>9} players: median {r['median_us']:.1f} us per settle (runs {r['run_medians_us']}),"
            f" p99 {r['p99_us']:.1f} us; board filled in {r['fill_seconds']} s")
    small, large = out[str(cfg.settle_sizes[0])], out[str(cfg.settle_sizes[-1])]
    out["ratio"] = large["median_us"] / small["median_us"]
    return out


def row_stalled(cfg):
    """Row 5: deposits/s with 1,000 subscribers (one not reading) vs with none, outcomes flowing in both."""
    from httpload import run_load
    from wsclients import SubscriberPool

    app = app_server("row5-app")
    client = RawHTTP(app.http_port)
    reqs = deposit_requests(cfg.stalled_conns, prefix="dep")
    out = {"outcome_rate": cfg.outcome_rate, "deposit_connections": cfg.stalled_conns}
    pool = stream = None
    try:
        stream = OutcomeStream(app.http_port, cfg.outcome_rate)
        time.sleep(1.0)
        quiet = []
        for i in range(cfg.runs):
            r = run_load(HOST, app.http_port, reqs, duration=cfg.duration, processes=cfg.loadgen_procs)
            quiet.append(r)
            log(f"  row 5 run {i + 1}: no WebSockets:       {r['rps']:7.0f} req/s  p99 {r['p99_ms']:6.1f} ms")
        pool = SubscriberPool(HOST, app.http_port, processes=cfg.ws_procs)
        # The client that stops reading: tiny receive buffer, subscribed, then never read again. Before the others
        # join, a burst of outcomes fills its socket buffers, so that it is stalled for the whole measurement.
        slow = pool.connect_one("events=game_outcomes,leaderboard", stalled=True, rcvbuf=4096)
        slow_port = slow["stalled_ports"][0]
        for k in range(cfg.stall_burst):  # payout 1: these players stay out of the top 10 the stream churns
            client.post("/api/games/outcomes", {"user_id": f"burst{k % 20}", "game": "slots", "bet": 0,
                                                "payout": 1})
        time.sleep(0.5)
        out["stalled_queues_before"] = dict(zip(("client_recv_q", "server_send_q"),
                                                tcp_queues(slow_port, app.http_port), strict=True))
        r = pool.connect(cfg.stalled_subscribers - 1, "events=game_outcomes,leaderboard", timeout=60)
        out["subscribers_live"] = r["live"]
        log(f"  row 5: {r['live']} subscribers reading + 1 stalled (its server Send-Q "
            f"{out['stalled_queues_before']['server_send_q']} bytes)")
        before = pool.stats()
        time.sleep(1.0)
        loaded = []
        for i in range(cfg.runs):
            r = run_load(HOST, app.http_port, reqs, duration=cfg.duration, processes=cfg.loadgen_procs)
            loaded.append(r)
            log(f"  row 5 run {i + 1}: 1,000 WS, 1 stalled: {r['rps']:7.0f} req/s  p99 {r['p99_ms']:6.1f} ms")
        time.sleep(1.0)
        after = pool.stats()
        out["stalled_queues_after"] = dict(zip(("client_recv_q", "server_send_q"),
                                               tcp_queues(slow_port, app.http_port), strict=True))
        out["cut_off_in_log"] = app.log_text().count("subscriber cut off")
        # The same 999 readers without the stalled client: separates the cost of fan-out from that of the stall.
        pool.close_stalled()
        time.sleep(1.0)
        reading = []
        for i in range(cfg.runs):
            r = run_load(HOST, app.http_port, reqs, duration=cfg.duration, processes=cfg.loadgen_procs)
            reading.append(r)
            log(f"  row 5 run {i + 1}: 999 WS, none stalled: {r['rps']:7.0f} req/s  p99 {r['p99_ms']:6.1f} ms")
        out["stream"] = stream.stop()
        stream = None
        out["events_received_during"] = {k: after.get(k, 0) - before.get(k, 0) for k in ("game_outcome", "leaderboard")}
        out["closed_by_server"] = after.get("closed_by_server", 0)
        out["no_stall"] = {"rps": median_of(reading, "rps"), "p99_ms": median_of(reading, "p99_ms"),
                           "ratio": median_of(reading, "rps") / median_of(quiet, "rps"),
                           "runs": [rounded(r) for r in reading]}
        out.update({
            "rps": median_of(loaded, "rps"), "p99_ms": median_of(loaded, "p99_ms"),
            "baseline_rps": median_of(quiet, "rps"), "baseline_p99_ms": median_of(quiet, "p99_ms"),
            "ratio": median_of(loaded, "rps") / median_of(quiet, "rps"),
            "errors": sum(r["errors"] for r in quiet + loaded),
            "non_200": sum(v for r in quiet + loaded for k, v in r["statuses"].items() if k != "200"),
            "runs": {"with_ws": [rounded(r) for r in loaded], "no_ws": [rounded(r) for r in quiet]},
        })
    finally:
        if stream is not None:
            stream.stop()
        client.close()
        if pool is not None:
            pool.stop()
        app.stop(timeout=cfg.shutdown_timeout)
    return out


def row_memory(cfg):
    """Row 6: memory per user with 10 ledger entries; total for 1,000,000 users."""
    from inproc import in_fresh_process

    r = in_fresh_process("memory", users=cfg.memory_users, entries=10)
    b = in_fresh_process("breakdown", users=10_000, entries=10)
    r["total_1m_bytes"] = r["bytes_per_user"] * 1_000_000
    r["breakdown"] = b
    log(f"  row 6: {r['users']} users x 10 entries: {r['bytes_per_user']:.0f} B/user (RSS);"
        f" tracemalloc {b['traced_bytes_per_user']:.0f} B/user")
    return r


ROWS = {1: ("http", row_http), 2: ("grpc", row_grpc), 3: ("fanout", row_fanout), 4: ("settle", row_settle),
        5: ("stalled", row_stalled), 6: ("memory", row_memory), **rows_more.ROWS}


# -- report --------------------------------------------------------------------




def report(results):
    busy = results["background_cores"]["all"]
    return (table(results["rows"]) + f"\n\nOther processes on the machine used {busy:.2f} of"
            f" {results['machine']['nproc']} cores on average while it measured"
            f"{' (figures are noisier than on an idle machine)' if busy > 0.1 else ''}.")




def table(rows):
    lines = ["| # | measurement | result | baseline (same run) | ratio | target | met |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    if "http" in rows:
        for conns, r in rows["http"].items():
            if not conns.isdigit():
                continue
            lines.append(f"| 1 | deposit, {conns} keep-alive connections"
                         f" | {r['rps']:,.0f} req/s, p99 {r['p99_ms']:.1f} ms"
                         f" | {r['baseline_rps']:,.0f} req/s, p99 {r['baseline_p99_ms']:.1f} ms (constant Flask route)"
                         f" | {r['ratio']:.2f} | ≥ 0.9 | {yes_no(r['ratio'] >= 0.9)} |")
    if "grpc" in rows:
        r = rows["grpc"]
        lines.append(f"| 2 | gRPC GetBalance, 16 concurrent calls | {r['rps']:,.0f} calls/s, p99 {r['p99_ms']:.1f} ms"
                     f" | {r['baseline_rps']:,.0f} calls/s, p99 {r['baseline_p99_ms']:.1f} ms (constant servicer)"
                     f" | {r['ratio']:.2f} | ≥ 0.9 | {yes_no(r['ratio'] >= 0.9)} |")
    if "fanout" in rows:
        f = rows["fanout"]
        for size, r in f["sizes"].items():
            n = int(size)
            if r["p50_ms"] is None:
                lines.append(f"| 3 | WebSocket fan-out, {n:,} subscribers | {r['connected']:,} connected, no delivery"
                             f" | | | | **no** |")
                continue
            res = (f"p50 {ms(r['p50_ms'])} / p99 {ms(r['p99_ms'])} / max {ms(r['max_ms'])} ms;"
                   f" RSS {r['rss_per_conn_kib']:.0f} KiB per connection ({r['rss_kib'] / 1024:.0f} MiB total,"
                   f" {r['threads']:,} threads)")
            if not r["all_delivered"]:
                res += "; **not every subscriber received every outcome**"
            base, target, met = "", "", ""
            if n == 1000:
                base, target = ISSUE_BASELINE, "p99 ≤ 50 ms"
                met = yes_no(r["p99_ms"] <= 50 and r["all_delivered"])
            elif n == 5000:
                target = "5,000 held"
                met = yes_no(r["connected"] >= 5000 and r["all_delivered"])
            lines.append(f"| 3 | WebSocket fan-out, {n:,} subscribers | {res} | {base} | | {target} | {met} |")
        if "shutdown_seconds" in f:
            n = f["shutdown_with_connections"]
            met = yes_no(f["shutdown_exit"] == 0 and f["shutdown_seconds"] <= 5)
            lines.append(f"| 3 | SIGTERM with {n:,} WebSockets open | exit {f['shutdown_exit']} after"
                         f" {f['shutdown_seconds']:.1f} s | | | README: ≤ 5 s | {met} |")
    if "settle" in rows:
        s = rows["settle"]
        sizes = [k for k in s if k.isdigit()]
        res = "; ".join(f"{int(k):,} players: {s[k]['median_us']:.1f} µs" for k in sizes)
        lines.append(f"| 4 | settle one outcome (median per call) | {res} | {int(sizes[0]):,}-player board"
                     f" | {s['ratio']:.2f} ({int(sizes[-1]):,} / {int(sizes[0]):,}) | ≤ 1.3"
                     f" | {yes_no(s['ratio'] <= 1.3)} |")
    if "stalled" in rows:
        r = rows["stalled"]
        lines.append(f"| 5 | deposit, {r['deposit_connections']} connections, 1,000 WebSockets (1 not reading),"
                     f" {r['outcome_rate']:g} outcomes/s | {r['rps']:,.0f} req/s, p99 {r['p99_ms']:.1f} ms"
                     f" | {r['baseline_rps']:,.0f} req/s, p99 {r['baseline_p99_ms']:.1f} ms (no WebSockets,"
                     f" same outcomes) | {r['ratio']:.2f} | ≥ 0.8 | {yes_no(r['ratio'] >= 0.8)} |")
        if "no_stall" in r:
            n = r["no_stall"]
            lines.append(f"| 5 | the same after the stalled client left (999 reading) | {n['rps']:,.0f} req/s,"
                         f" p99 {n['p99_ms']:.1f} ms | as above | {n['ratio']:.2f} | (diagnostic) | |")
    if "memory" in rows:
        m = rows["memory"]
        lines.append(f"| 6 | memory per user, 10 ledger entries | {m['bytes_per_user']:,.0f} B/user; 1,000,000 users ≈"
                     f" {m['total_1m_bytes'] / 2**30:.2f} GiB (RSS growth, {m['users']:,} users measured) | | |"
                     f" reported | |")
    lines += rows_more.table_lines(rows)
    return "\n".join(lines)


def describe_code(code):
    if not code or not code["commit"]:
        return "not a git checkout"
    changes = f" plus local changes to {', '.join(code['modified'])}" if code["modified"] else ""
    return f"commit {code['commit']}{changes}"


def machine_line(info):
    return (f"{info['nproc']} CPUs ({info['cpu_model']}), {info['memory_mib']:,} MiB RAM, "
            f"{info['implementation']} {info['python']}, Linux {info['kernel']}, "
            f"open-file limit {info['nofile_soft_at_start']} (hard {info['nofile_hard']})")


def write_doc(results, text):
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    block = (f"{start}\n_Last run: {results['finished']}, {results['seconds']:.0f} s, {describe_code(results['code'])},"
             f" on {machine_line(results['machine'])}._\n\n{text}\n{end}")
    doc = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start in doc and end in doc:
        doc = doc[:doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc += "\n" + block + "\n"
    DOC.write_text(doc)


def config(args):
    quick = args.quick
    return argparse.Namespace(
        runs=args.runs or (1 if quick else 3),
        duration=2.0 if quick else 4.0,
        conns=(16, 64),
        loadgen_procs=1,
        ws_procs=4,
        fanout_sizes=(100, 1000) if quick else (100, 1000, 5000),
        fanout_outcomes=2 if quick else 5,
        fanout_pause=0.5,
        shutdown_timeout=15.0,
        settle_sizes=(1000, 100_000) if quick else (1000, 100_000, 1_000_000),
        settles=5000 if quick else 20_000,
        stalled_conns=16,
        stalled_subscribers=1000,
        outcome_rate=5.0,
        stall_burst=600,
        memory_users=20_000 if quick else 200_000,
        history_rounds=4000,
        redis_duration=2.0 if quick else 3.0,
        redis_cost_writes=200 if quick else 1000,
        flood_samples=50 if quick else 100,
        idem_records=20_000 if quick else 50_000,
        layers_duration=4.0 if quick else 10.0,
    )


def wait_idle(limit, window=3.0, threshold=0.15):
    """Wait until other processes use under `threshold` cores over `window` seconds, at most `limit` seconds."""
    deadline = time.monotonic() + limit
    while True:
        snap = common.cpu_snapshot()
        time.sleep(window)
        other = common.background_cpu(snap, common.cpu_snapshot(), window)
        if other < threshold:
            log(f"machine idle (other processes: {other:.2f} cores)")
            return True
        if time.monotonic() > deadline:
            log(f"machine still busy (other processes: {other:.2f} cores); measuring anyway")
            return False
        log(f"waiting for the machine to be idle (other processes: {other:.2f} cores)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", help="comma-separated row numbers (default: all)")
    parser.add_argument("--runs", type=int, help="runs per throughput figure (default 3)")
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--wait-idle", type=float, default=30, metavar="SECONDS",
                        help="before each row, wait up to this long for other processes to leave the CPUs alone"
                             " (default 30)")
    parser.add_argument("--render", action="store_true",
                        help="only rebuild the table in BENCHMARKS.md from bench/results.json")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(RESULTS.read_text())
        text = report(results)
        write_doc(results, text)
        log(text)
        return 0
    wanted = sorted(int(x) for x in args.rows.split(",")) if args.rows else sorted(ROWS)
    record = not args.rows and not args.quick and not args.runs
    cfg = config(args)
    common.raise_nofile()
    info = common.machine()
    log(f"machine: {machine_line(info)}")
    results = {"machine": info, "started": datetime.now(UTC).isoformat(timespec="seconds"), "config": vars(cfg),
               "code": common.code_state(), "rows": {}}
    log(f"code: {describe_code(results['code'])}")
    started = time.monotonic()
    other_core_seconds = row_seconds = 0.0
    results["background_cores"] = {}
    for n in wanted:
        name, fn = ROWS[n]
        if args.wait_idle:  # before each row: other work on a 2-core machine is the main source of noise
            wait_idle(args.wait_idle)
        log(f"row {n}: {fn.__doc__.splitlines()[0]}")
        t, snap = time.monotonic(), common.cpu_snapshot()
        try:
            results["rows"][name] = fn(cfg)
        except Exception as exc:  # one broken row must not lose the others
            import traceback

            traceback.print_exc()
            results["rows"][name + "_error"] = repr(exc)
        took = time.monotonic() - t
        other = common.background_cpu(snap, common.cpu_snapshot(), took)
        results["background_cores"][name] = round(other, 2)
        other_core_seconds += other * took
        row_seconds += took
        log(f"row {n} took {time.monotonic() - t:.0f} s (other processes on the machine used {other:.2f} cores)")
    results["seconds"] = time.monotonic() - started
    results["measuring_seconds"] = row_seconds
    results["background_cores"]["all"] = round(other_core_seconds / row_seconds, 2) if row_seconds else 0.0
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["code_at_end"] = common.code_state()
    if results["code_at_end"] != results["code"]:
        log(f"note: the code changed during the run (now {describe_code(results['code_at_end'])})")
    text = report(results)
    log("")
    log(text)
    log(f"\n{len(wanted)} rows in {results['seconds']:.0f} s; server logs in {common.LOGS.relative_to(ROOT)}/")
    if record:
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
        tmp.replace(RESULTS)
        write_doc(results, text)
        log(f"wrote {RESULTS.relative_to(ROOT)} and {DOC.relative_to(ROOT)}")
    else:
        log("partial or quick run: bench/results.json and BENCHMARKS.md left as they were")
    return 1 if any(k.endswith("_error") for k in results["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
