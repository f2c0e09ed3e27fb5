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


def _event_workload(store, rounds, users=1000, seed=11):
    """A production-like mix: per round one deposit and one settle (bet, sometimes a win, outcome, top 10)."""
    rng = random.Random(seed)
    for i in range(rounds):
        uid = f"player{i % users}"
        store.deposit(uid, 1000)
        bet = rng.randint(1, 1000)
        store.settle(uid, "slots", bet, rng.choice((0, 0, bet * 2, rng.randint(0, 5000))))


class _FrameCachingSubscriber:
    """Stands in for a WebSocket: encodes each event's frame once (ws.event_frame keeps it on the event)."""

    def __init__(self):
        import ws  # imported before tracing starts: Flask's own memory is not the history's

        self.encode = ws.event_frame

    def deliver(self, event):
        self.encode(event)
        return True

    def cancel(self, reason):
        pass


def history(retained, rounds, subscriber=False):
    """Traced bytes of a store and hub after `rounds` rounds, with the hub retaining `retained` events.

    run.py calls this for the real history size and for a history of 1: the difference is the memory
    the history costs, since everything else (store, ledgers, leaderboard) is the same in both.
    """
    import tracemalloc

    from events import EventHub, MemoryEventLog
    from wallet_store import MemoryStore

    sub = _FrameCachingSubscriber() if subscriber else None
    gc.collect()
    tracemalloc.start()
    hub = EventHub(history=retained).start()
    if sub is not None:
        hub.subscribe(sub, ("game_outcomes", "leaderboard"))
    store = MemoryStore(MemoryEventLog(hub))
    _event_workload(store, rounds)
    assert hub.flush(30)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    events = hub.seq
    hub.stop()
    return {"retained": retained, "rounds": rounds, "events": events, "traced_bytes": traced}


def idempotency(records, keyed=True):
    """Traced bytes of a MemoryStore after `records` deposits on distinct users, with or without Idempotency-Keys.

    Keys (a UUID, as clients usually send) and fingerprints are made inside the measured window, as a request
    makes them: the store keeps those very objects. The difference keyed - unkeyed is the records' cost.
    """
    import tracemalloc
    import uuid

    from routes import fingerprint
    from wallet_store import Idempotency, MemoryStore

    gc.collect()
    tracemalloc.start()
    store = MemoryStore()
    for i in range(records):
        uid = f"user{i}"
        idem = None
        if keyed:
            idem = Idempotency(str(uuid.uuid4()), fingerprint("POST", "/api/wallet/deposit",
                                                              {"user_id": uid, "amount": 100}))
        store.deposit(uid, 100, idem)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert store.idempotency_size() == (records if keyed else 0)
    return {"records": records, "keyed": keyed, "traced_bytes": traced}


def redis_cost(url, writes=500):
    """Redis commands and client round trips per write (deposit, settle), from INFO commandstats and a counter
    on the client's connections; one RedisStore on its own key prefix, no event reader."""
    import uuid

    import redis

    from redis_store import RedisStore, connect

    class Counting(redis.Connection):
        round_trips = 0

        def read_response(self, *args, **kwargs):
            Counting.round_trips += 1
            return super().read_response(*args, **kwargs)

    base = connect(url)
    client = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=Counting,
                                                              **base.connection_pool.connection_kwargs))
    admin = connect(url)
    store = RedisStore(client, f"cost{uuid.uuid4().hex[:8]}:")
    store.deposit("warm", 1)  # loads the script (NOSCRIPT, then EVAL) outside the counted window
    out = {}
    for op in ("deposit", "settle"):
        admin.config_resetstat()
        Counting.round_trips = 0
        for i in range(writes):
            if op == "deposit":
                store.deposit(f"u{i % 50}", 100)
            else:
                store.settle(f"u{i % 50}", "slots", 10, 20 if i % 2 else 0)
        trips = Counting.round_trips
        stats = admin.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()
                 if k.removeprefix("cmdstat_") not in ("info", "config|resetstat", "config")}
        out[op] = {"round_trips_per_write": trips / writes,
                   "commands_per_write": sum(calls.values()) / writes,
                   "by_command": {k: round(v / writes, 2) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}}
    client.close()
    admin.close()
    base.close()
    return out
