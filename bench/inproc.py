"""In-process measurements of the wallet store, each run in a fresh process by run.py.

settle: time per `MemoryStore.settle` with N players already on the leaderboard.
memory: RSS growth of a store holding N users with E ledger entries each.
"""

import gc
import linecache
import os
import random
import sys
import time

from common import ROOT, percentile, rss_kib

sys.path.insert(0, str(ROOT))


def settle(players, settles=20_000, runs=3, seed=7):
    """Median time of one settle on a random existing player, with `players` on the board.

    The board is filled through the store's own leaderboard, one player at a time in random score order,
    storing exactly what Leaderboard.record stores (its dict and its SortedList), without the top-10
    comparison record() makes for each call: much faster than settling a million rounds, and the
    same structure. The players the timed settles will hit get
    a deposit first, so each timed settle does the full work: bet entry, win entry, outcome event,
    leaderboard update (and the top-10 event when it changes).
    """
    from wallet_store import MemoryStore

    rng = random.Random(seed)
    store = MemoryStore()
    board = store._board
    ids = [f"player{i}" for i in range(players)]
    started = time.perf_counter()
    net, ranked = board._net, board._ranked
    for uid in ids:
        value = rng.randint(-50_000, 50_000)
        net[uid] = value
        ranked.add((-value, uid))
    fill_seconds = time.perf_counter() - started
    perf = time.perf_counter_ns
    per_run = []
    all_ns = []
    for _ in range(runs):
        targets = [ids[rng.randrange(players)] for _ in range(settles)]
        for uid in set(targets):
            store.deposit(uid, 10_000_000)
        gc.collect()
        times = []
        for uid in targets:
            bet = rng.randint(1, 1000)
            payout = rng.choice((0, 0, bet * 2, rng.randint(0, 5000)))
            t = perf()
            store.settle(uid, "slots", bet, payout)
            times.append(perf() - t)
        times.sort()
        per_run.append(times[len(times) // 2])
        all_ns.extend(times)
    per_run.sort()
    return {
        "players": players,
        "board_size": len(board),
        "fill_seconds": round(fill_seconds, 2),
        "median_us": per_run[len(per_run) // 2] / 1000,
        "run_medians_us": [x / 1000 for x in per_run],
        "p99_us": percentile(all_ns, 99) / 1000,
        "mean_us": sum(all_ns) / len(all_ns) / 1000,
    }


def memory(users, entries=10):
    """RSS growth for `users` users with `entries` deposits each, made through MemoryStore.deposit."""
    from wallet_store import MemoryStore

    names = [f"user{i}" for i in range(users)]  # ids are made before the first reading: a client sends them
    gc.collect()
    before = rss_kib()
    store = MemoryStore()
    started = time.perf_counter()
    for uid in names:
        for _ in range(entries):
            store.deposit(uid, 100)
    seconds = time.perf_counter() - started
    gc.collect()
    after = rss_kib()
    total, wallets = store.totals()
    assert wallets == users and total == users * entries * 100
    delta = (after - before) * 1024
    return {"users": users, "entries": entries, "rss_delta_bytes": delta, "bytes_per_user": delta / users,
            "deposits_per_s": users * entries / seconds, "seconds": round(seconds, 1)}


def breakdown(users=10_000, entries=10):
    """Where a user's bytes go (tracemalloc, on a small store): by allocation site, per user."""
    import tracemalloc

    from wallet_store import MemoryStore

    names = [f"user{i}" for i in range(users)]
    tracemalloc.start()
    store = MemoryStore()
    snap0 = tracemalloc.take_snapshot()
    for uid in names:
        for _ in range(entries):
            store.deposit(uid, 100)
    gc.collect()
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    stats = snap1.compare_to(snap0, "lineno")
    total = sum(s.size_diff for s in stats)
    top = []
    for s in stats[:8]:
        if s.size_diff > 0:
            frame = s.traceback[0]
            top.append({"where": f"{os.path.basename(frame.filename)}:{frame.lineno}",
                        "code": linecache.getline(frame.filename, frame.lineno).strip(),
                        "bytes_per_user": round(s.size_diff / users, 1)})
    return {"users": users, "traced_bytes_per_user": total / users, "top": top, "store_alive": bool(store)}


def _run(name, kwargs, out):
    out.put(globals()[name](**kwargs))


def in_fresh_process(name, **kwargs):
    """Run one of the functions above in a fresh spawned process (clean heap, exact RSS) and return its result."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_run, args=(name, kwargs, out), daemon=True)
    p.start()
    result = out.get(timeout=600)
    p.join(timeout=30)
    return result
