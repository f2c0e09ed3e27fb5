"""Rows 7-10 of `make bench`: the event history, the state in Redis, the hardening limits, the per-call layers.

Each row function takes the run's config and returns a dict of figures that run.py stores in results.json;
`table_lines(rows)` renders them for BENCHMARKS.md.
"""

import json
import subprocess
import sys
import tempfile
import time

from client import HOST, RawHTTP, fanout_once
from common import (
    BENCH_KEY,
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
    split_cpus,
    yes_no,
)

# Fan-out at 1,000 subscribers before the event history existed (commit 39fd923, the last recorded run
# before issue 11): the reference for "fan-out latency unchanged within noise".
PRE_HISTORY_FANOUT = {"commit": "39fd923", "p50_ms": 22.0, "p99_ms": 38.0}








# -- row 7: the event history ----------------------------------------------------------------------


def row_history(cfg):
    """Row 7: memory of the retained event history (tracemalloc), bytes per retained event."""
    from inproc import in_fresh_process

    from events import HISTORY

    out = {"retained": HISTORY}
    for label, subscriber in (("no_subscriber", False), ("frames_cached", True)):
        full = in_fresh_process("history", retained=HISTORY, rounds=cfg.history_rounds, subscriber=subscriber)
        one = in_fresh_process("history", retained=1, rounds=cfg.history_rounds, subscriber=subscriber)
        cost = full["traced_bytes"] - one["traced_bytes"]
        out[label] = {"history_bytes": cost, "bytes_per_event": cost / (HISTORY - 1),
                      "events_published": full["events"], "traced_full": full["traced_bytes"],
                      "traced_one": one["traced_bytes"]}
        log(f"  row 7: {label}: {HISTORY:,} retained events cost {cost / 2**20:.2f} MiB,"
            f" {cost / (HISTORY - 1):.0f} B per event ({full['events']:,} events published)")
    return out


# -- row 8: Redis ------------------------------------------------------------------------------------


def fanout_at(app, size, outcomes, cfg, label):
    """Connect `size` subscribers to game_outcomes, post `outcomes` outcomes one at a time, time each arrival."""
    from wsclients import SubscriberPool

    pool = SubscriberPool(HOST, app.http_port, processes=cfg.ws_procs)
    client = RawHTTP(app.http_port)
    try:
        connected = 0
        t = time.monotonic()
        while connected < size:
            step = min(500, size - connected)
            r = pool.connect(step, "events=game_outcomes", timeout=60)
            connected += r["live"]
            if r["live"] < step:
                log(f"  {label}: only {r['live']} of {step} connections went live (failed {r['failed']})")
                break
        connect_s = time.monotonic() - t
        time.sleep(1.0)
        results = []
        for k in range(outcomes):
            o = fanout_once(client, pool, f"{label}x{k}", connected)
            results.append(o)
            log(f"  {label}: {connected} subs, outcome {k + 1}: received {o['received']}/{o['expected']}"
                f"  p50 {o['p50_ms']:.1f}  p99 {o['p99_ms']:.1f}  max {o['max_ms']:.1f} ms")
            time.sleep(cfg.fanout_pause)
        res = {"connected": connected, "connect_seconds": round(connect_s, 1), "outcomes": results,
               "all_delivered": all(o["received"] == o["expected"] == connected for o in results)}
        for key in ("p50_ms", "p99_ms", "max_ms"):
            res[key] = median([o[key] for o in results if o[key] is not None])
        return res
    finally:
        client.close()
        pool.stop()




def row_redis(cfg):
    """Row 8: deposits on Redis vs in memory, two processes vs one, fan-out, cost per write."""
    from httpload import run_load, run_load_many
    from inproc import in_fresh_process
    from redisproc import RedisProcess

    rp = RedisProcess("row8-redis")
    servers = []
    out = {"redis_persistence": "appendonly yes, appendfsync always" if rp.persistent else "none"}
    try:
        mem = app_server("row8-memory")
        servers.append(mem)
        redis_args = ("--redis-url", rp.url, "--redis-prefix", "bench:")
        red = app_server("row8-redis-1", *redis_args)
        servers.append(red)
        n = cfg.conns[0]
        deposits = deposit_requests(n, prefix="r")
        kinds = (("memory", mem, deposits), ("redis", red, deposits))
        runs = {kind: [] for kind, _, _ in kinds}
        for i in range(cfg.runs):
            for kind, srv, reqs in kinds:
                r = run_load(HOST, srv.http_port, reqs, duration=cfg.redis_duration, processes=cfg.loadgen_procs)
                runs[kind].append(r)
                log(f"  row 8 run {i + 1}: {kind:15} {n} conns: {r['rps']:7.0f} req/s  p99 {r['p99_ms']:6.1f} ms"
                    f"  statuses {r['statuses']}")
        for kind, _, _ in kinds:
            out[kind] = {"rps": median_of(runs[kind], "rps"), "p99_ms": median_of(runs[kind], "p99_ms"),
                         "p50_ms": median_of(runs[kind], "p50_ms"), "runs": [rounded(r) for r in runs[kind]],
                         "non_200": sum(v for r in runs[kind] for k, v in r["statuses"].items() if k != "200")}
        out["redis_vs_memory"] = out["redis"]["rps"] / out["memory"]["rps"]

        # Two service processes on one Redis against one; the load comes from two generator processes in both
        # cases (half the connections each), so only the number of service processes differs.
        red2 = app_server("row8-redis-2", *redis_args)
        servers.append(red2)
        half = n // 2
        one, two = [], []
        for i in range(cfg.runs):
            r1 = run_load_many([(HOST, red.http_port, deposits[:half]), (HOST, red.http_port, deposits[half:])],
                               duration=cfg.redis_duration)
            r2 = run_load_many([(HOST, red.http_port, deposits[:half]), (HOST, red2.http_port, deposits[half:])],
                               duration=cfg.redis_duration)
            one.append(r1)
            two.append(r2)
            log(f"  row 8 run {i + 1}: one process {r1['rps']:7.0f} req/s (p99 {r1['p99_ms']:.1f} ms),"
                f" two processes {r2['rps']:7.0f} req/s (p99 {r2['p99_ms']:.1f} ms)")
        out["one_process"] = {"rps": median_of(one, "rps"), "p99_ms": median_of(one, "p99_ms"),
                              "runs": [rounded(r) for r in one]}
        out["two_processes"] = {"rps": median_of(two, "rps"), "p99_ms": median_of(two, "p99_ms"),
                                "runs": [rounded(r) for r in two]}
        out["two_vs_one"] = out["two_processes"]["rps"] / out["one_process"]["rps"]
        out["redis_server_cpu_seconds"] = _cpu_seconds(rp.pid)
        red2.stop()

        out["cost"] = in_fresh_process("redis_cost", url=rp.url, writes=cfg.redis_cost_writes)
        d = out["cost"]["deposit"]
        log(f"  row 8: one deposit = {d['commands_per_write']:.1f} Redis commands in"
            f" {d['round_trips_per_write']:.1f} round trip(s)")

        out["fanout_memory"] = fanout_at(mem, 1000, cfg.fanout_outcomes, cfg, "row8-fan-memory")
        out["fanout_redis"] = fanout_at(red, 1000, cfg.fanout_outcomes, cfg, "row8-fan-redis")
        fm, fr = out["fanout_memory"], out["fanout_redis"]
        out["fanout_ratio"] = fr["p99_ms"] / fm["p99_ms"] if fm["p99_ms"] and fr["p99_ms"] else None
    finally:
        for srv in servers:
            srv.stop()
        rp.stop()
    return out


def _cpu_seconds(pid):
    """User + system CPU seconds of a process so far, from /proc/PID/stat."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- row 9: hardening ------------------------------------------------------------------------------


def _flood(part, *args, timeout=240):
    """Run one part of bench/flood.py (H1's flood tool) in its own process; its JSON report."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "bench/flood.py", "--part", part, *args, "--out", f.name]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"flood.py --part {part} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return json.loads(open(f.name).read())


def row_hardening(cfg):
    """Row 9: /healthz with idle connections, recovery after a 2 x cap flood, idempotency memory, parser cost."""
    from inproc import in_fresh_process

    import http_server

    cap = http_server.DEFAULT_MAX_CONNECTIONS
    out = {"cap": cap}
    counts = sorted({0, 1000, 5000, cap})
    # The server's cap is set above the largest count so that every count is held (not shed), and the probes
    # still get in; "cap" idle connections is then the default cap's worth.
    idle = _flood("idle", "--counts", ",".join(map(str, counts)), "--max-connections", str(max(counts) + 20),
                  "--samples", str(cfg.flood_samples))
    out["idle"] = idle["idle"]
    for r in out["idle"]:
        log(f"  row 9: {r['idle']:5} idle connections: /healthz keep-alive p50 {r['keepalive_ms']['p50']} /"
            f" p99 {r['keepalive_ms']['p99']} ms, new connection p50 {r['fresh_connection_ms']['p50']} /"
            f" p99 {r['fresh_connection_ms']['p99']} ms ({r['server_threads']} threads)")
    rec = _flood("recovery", "--max-connections", str(cap))
    out["recovery"] = rec["recovery"]
    log(f"  row 9: flood of {rec['recovery']['flood']} (cap {cap}) dropped: /healthz under 100 ms after"
        f" {rec['recovery']['healthz_under_100ms_after_s']} s, threads back after"
        f" {rec['recovery']['threads_back_to_rest_s']} s")
    out["parser"] = _flood("parser")["parser"]
    log(f"  row 9: parse one request head: {out['parser']}")
    keyed = in_fresh_process("idempotency", records=cfg.idem_records, keyed=True)
    plain = in_fresh_process("idempotency", records=cfg.idem_records, keyed=False)
    out["idempotency"] = {"records": cfg.idem_records,
                          "bytes_per_record": (keyed["traced_bytes"] - plain["traced_bytes"]) / cfg.idem_records,
                          "bytes_per_user_without_key": plain["traced_bytes"] / cfg.idem_records}
    out["idempotency"]["cap_1m_mib"] = out["idempotency"]["bytes_per_record"] * 1_000_000 / 2**20
    log(f"  row 9: {out['idempotency']['bytes_per_record']:.0f} B per idempotency record"
        f" (1,000,000 keys ≈ {out['idempotency']['cap_1m_mib']:.0f} MiB)")
    return out


# -- row 10: the per-call layers (issue 15) --------------------------------------------------------------


def _paired(label, rounds, measure):
    """`rounds` runs of `measure()` -> (figures, baseline figures), each interleaving both loads.

    On this shared 2-core VM the same load measured a minute apart differs by up to 40 % (gRPC's bare
    servicer: 3,600 to 6,100 calls/s in one row), so ratios of separate runs moved between 0.63 and
    0.87 for the same code. Here each run alternates the two loads every quarter second over the
    same connections, so both see the same machine; the figure is the median of the runs' ratios.
    """
    a_runs, b_runs = [], []
    for i in range(rounds):
        a, b = measure()
        a_runs.append(a)
        b_runs.append(b)
        log(f"  row 10 {label} run {i + 1}: {a['rps']:7.0f} / {b['rps']:7.0f} = {a['rps'] / b['rps']:.3f}")
    ratios = [a["rps"] / b["rps"] for a, b in zip(a_runs, b_runs, strict=True)]
    return {"rps": median_of(a_runs, "rps"), "p99_ms": median_of(a_runs, "p99_ms"),
            "baseline_rps": median_of(b_runs, "rps"), "baseline_p99_ms": median_of(b_runs, "p99_ms"),
            "ratio": median(ratios), "run_ratios": [round(r, 3) for r in ratios],
            "runs": [rounded(r) for r in a_runs], "baseline_runs": [rounded(r) for r in b_runs]}


def row_layers(cfg):
    """Row 10 (issue 15): deposit vs /healthz in memory and on Redis, GetBalance vs a bare servicer, interleaved.

    Twice: with every process free to run on any CPU (as rows 1-9), then with the servers on one half of
    the CPUs and the load generator on the other (see split_cpus). Redis, which in production runs on
    a machine of its own, shares the load generator's half rather than the service's.
    """
    server_cpus, client_cpus = split_cpus()
    out = {"shared": _layers(cfg, "shared", None, None)}
    if server_cpus:
        out["pinned"] = _layers(cfg, "pinned", server_cpus, client_cpus)
        out["pinned"].update(server_cpus=sorted(server_cpus), client_cpus=sorted(client_cpus))
    return out


def _layers(cfg, label, server_cpus, client_cpus):
    from grpcload import run_alternating as grpc_alternating
    from httpload import build_request, run_alternating
    from redisproc import RedisProcess

    n = cfg.conns[0]
    deposits = deposit_requests(n, prefix="l")
    healthz = [build_request("GET", "/healthz", HOST)] * n
    out = {}
    rp = RedisProcess(f"row10-{label}-redis", cpus=client_cpus)
    servers = []
    try:
        mem = app_server(f"row10-{label}-memory", cpus=server_cpus)
        servers.append(mem)
        red = app_server(f"row10-{label}-redis", "--redis-url", rp.url, "--redis-prefix", "bench10:",
                         cpus=server_cpus)
        servers.append(red)
        for name, srv in (("memory", mem), ("redis", red)):
            out[f"deposit_vs_healthz_{name}"] = _paired(
                f"{label} deposit/healthz {name}", cfg.runs,
                lambda srv=srv: run_alternating(HOST, srv.http_port, deposits, healthz, duration=cfg.layers_duration,
                                                cpus=client_cpus))
        red.stop()
        rp.stop()

        port = free_port()
        servers.append(ServerProcess(f"row10-{label}-bare", ["bench/baseline_grpc.py", "--port", str(port),
                                                              "--mode", "bare"], [port], cpus=server_cpus))
        secured = app_server(f"row10-{label}-auth", env={"API_KEYS": BENCH_KEY}, cpus=server_cpus)
        servers.append(secured)
        RawHTTP(mem.http_port).post("/api/wallet/deposit", {"user_id": "bench1", "amount": 100})
        bare = (f"{HOST}:{port}", None)
        for name, srv, token in (("auth_off", mem, None), ("auth_on", secured, BENCH_KEY)):
            out[f"grpc_vs_bare_{name}"] = _paired(
                f"{label} GetBalance/bare {name}", cfg.runs,
                lambda srv=srv, token=token: grpc_alternating((f"{HOST}:{srv.grpc_port}", token), bare,
                                                              duration=cfg.layers_duration, cpus=client_cpus))
    finally:
        for srv in servers:
            srv.stop()
        rp.stop()
    return out


ROWS = {7: ("history", row_history), 8: ("redis", row_redis), 9: ("hardening", row_hardening),
        10: ("layers", row_layers)}


# -- report --------------------------------------------------------------------------------------------






def table_lines(rows):
    lines = []
    if "history" in rows:
        h = rows["history"]
        a, b = h["no_subscriber"], h["frames_cached"]
        lines.append(f"| 7 | event history, {h['retained']:,} retained events (tracemalloc)"
                     f" | {a['bytes_per_event']:.0f} B per event, {a['history_bytes'] / 2**20:.1f} MiB in all;"
                     f" {b['bytes_per_event']:.0f} B /"
                     f" {b['history_bytes'] / 2**20:.1f} MiB with a subscriber (frames kept on the events)"
                     f" | | | bounded, reported | yes |")
    fan = rows.get("fanout", {}).get("sizes", {}).get("1000")
    if fan and fan.get("p99_ms") is not None:
        ref = PRE_HISTORY_FANOUT
        ratio = fan["p99_ms"] / ref["p99_ms"]
        lines.append(f"| 7 | fan-out to 1,000 subscribers with the history (row 3) | p50 {ms(fan['p50_ms'])} /"
                     f" p99 {ms(fan['p99_ms'])} ms | p50 {ms(ref['p50_ms'])} / p99 {ms(ref['p99_ms'])} ms before it"
                     f" (commit {ref['commit']}, an earlier run) | {ratio:.2f} | unchanged within noise (≤ 1.3)"
                     f" | {yes_no(ratio <= 1.3)} |")
    if "redis" in rows:
        r = rows["redis"]
        m, d = r["memory"], r["redis"]
        lines.append(f"| 8 | deposit on Redis, one process, 16 connections | {d['rps']:,.0f} req/s, p99"
                     f" {ms(d['p99_ms'])} ms | {m['rps']:,.0f} req/s, p99 {ms(m['p99_ms'])} ms (in memory)"
                     f" | {r['redis_vs_memory']:.2f} | ≥ 0.7 | {yes_no(r['redis_vs_memory'] >= 0.7)} |")
        one, two = r["one_process"], r["two_processes"]
        lines.append(f"| 8 | deposit on Redis, two processes (8 + 8 connections) | {two['rps']:,.0f} req/s, p99"
                     f" {ms(two['p99_ms'])} ms | {one['rps']:,.0f} req/s, p99 {ms(one['p99_ms'])} ms (one process,"
                     f" 16 connections) | {r['two_vs_one']:.2f} | ≥ 1.3 | {yes_no(r['two_vs_one'] >= 1.3)} |")
        fm, fr = r["fanout_memory"], r["fanout_redis"]
        if r.get("fanout_ratio") is not None:
            met = r["fanout_ratio"] <= 1.5 and fr["all_delivered"] and fr["p99_ms"] <= 75
            lines.append(f"| 8 | fan-out to 1,000 subscribers on Redis | p50 {ms(fr['p50_ms'])} / p99"
                         f" {ms(fr['p99_ms'])} ms | p50 {ms(fm['p50_ms'])} / p99 {ms(fm['p99_ms'])} ms (in memory,"
                         f" same row) | {r['fanout_ratio']:.2f} | ≤ 1.5; p99 ≤ 75 ms | {yes_no(met)} |")
        c = r["cost"]
        lines.append(f"| 8 | Redis work per write | deposit: {c['deposit']['commands_per_write']:.0f} commands,"
                     f" {c['deposit']['round_trips_per_write']:.0f} round trip; settle:"
                     f" {c['settle']['commands_per_write']:.0f} commands, {c['settle']['round_trips_per_write']:.0f}"
                     f" round trip | | | reported | |")
    if "hardening" in rows:
        h = rows["hardening"]
        cap = h["cap"]
        for r in h["idle"]:
            n = r["idle"]
            name = f"{n:,}" + (" (the default cap)" if n == cap else "")
            k, f = r["keepalive_ms"], r["fresh_connection_ms"]
            lines.append(f"| 9 | /healthz with {name} idle connections | p50 {ms(k['p50'])} / p99 {ms(k['p99'])} ms"
                         f" (keep-alive); new connection p50 {ms(f['p50'])} / p99 {ms(f['p99'])} ms;"
                         f" {r['server_threads']:,} threads | | | p99 < 100 ms"
                         f" | {yes_no(k['p99'] < 100 and f['p99'] < 100)} |")
        rec = h["recovery"]
        after = rec["healthz_under_100ms_after_s"]
        lines.append(f"| 9 | recovery after a flood of {rec['flood']:,} connections (2 × cap, half WebSocket upgrades)"
                     f" | /healthz under 100 ms {after} s after the drop; threads back to rest after"
                     f" {rec['threads_back_to_rest_s']} s; {rec['shed_503_seen']:,} shed with 503 | | | ≤ 10 s"
                     f" | {yes_no(after is not None and after <= 10)} |")
        i = h["idempotency"]
        lines.append(f"| 9 | memory per idempotency record (in memory, tracemalloc) | {i['bytes_per_record']:.0f} B;"
                     f" the 1,000,000-key cap ≈ {i['cap_1m_mib']:.0f} MiB | 694 B (before the hardening issue)"
                     f" | {i['bytes_per_record'] / 694:.2f} | reported | |")
        p = h["parser"]
        lines.append(f"| 9 | parse one request head (9 fields) | strict parser {p['strict_us']:.1f} µs"
                     f" | h11 {p['h11_us']:.1f} µs; http.server {p['http.server_us']:.1f} µs"
                     f" | {p['strict_us'] / p['http.server_us']:.2f} (vs http.server) | reported | |")
    if "layers" in rows:
        for setup, where in (("shared", "every process on any CPU"), ("pinned", "service and load generator on CPUs"
                                                                                 " of their own")):
            r = rows["layers"].get(setup)
            if r is None:
                continue
            for key, what, base, target in (
                    ("deposit_vs_healthz_memory", "deposit vs /healthz, same server, 16 connections, in memory",
                     "/healthz", 0.9),
                    ("deposit_vs_healthz_redis", "deposit vs /healthz, same server, 16 connections, on Redis",
                     "/healthz", 0.9),
                    ("grpc_vs_bare_auth_off", "gRPC GetBalance, every interceptor, authentication off, 16 calls",
                     "bare WalletServicer, same server setup", 0.85),
                    ("grpc_vs_bare_auth_on", "gRPC GetBalance, every interceptor, authentication on, 16 calls",
                     "bare WalletServicer, same server setup", 0.85)):
                x = r[key]
                unit = "calls/s" if key.startswith("grpc") else "req/s"
                runs = x["run_ratios"]
                lines.append(f"| 10 | {what}; {where} | {x['rps']:,.0f} {unit}, p99 {ms(x['p99_ms'])} ms"
                             f" | {x['baseline_rps']:,.0f} {unit}, p99 {ms(x['baseline_p99_ms'])} ms ({base})"
                             f" | {x['ratio']:.2f} (median of {len(runs)} run{'s' if len(runs) != 1 else ''},"
                             f" {min(runs):.2f}–{max(runs):.2f})"
                             f" | ≥ {target} | {yes_no(x['ratio'] >= target)} |")
    return lines
