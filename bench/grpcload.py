"""gRPC load: a grpc.aio client in its own process, N concurrent GetBalance calls in a loop for a fixed time."""

import asyncio
import multiprocessing
import os
import sys
import time

from common import ROOT, percentile


async def _drive(targets, user_id, concurrency, warmup, duration, slot=0.25):
    """Call GetBalance on each (target, token) of `targets` in turns of `slot` seconds; [(latencies, codes)]."""
    import grpc

    import wallet_pb2
    import wallet_pb2_grpc

    results = [([], {}) for _ in targets]
    channels = [grpc.aio.insecure_channel(target) for target, _ in targets]
    try:
        calls = []
        request = wallet_pb2.GetBalanceRequest(user_id=user_id).SerializeToString()
        for channel, (_, token) in zip(channels, targets, strict=True):
            # The request is serialized once and responses are checked only for arriving: the client does as
            # little per call as it can, so that it takes as little of the machine as possible from the server.
            check = wallet_pb2_grpc.WalletServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),) if token else None
            reply = await check.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user_id), timeout=10,
                                           metadata=metadata)
            assert reply.user_id in (user_id, "bench"), reply
            calls.append((channel.unary_unary("/wallet.v1.WalletService/GetBalance", request_serializer=None,
                                              response_deserializer=None, _registered_method=True), metadata))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        count_from = t0 + warmup
        end = count_from + duration
        turns = len(targets)

        async def one():
            perf = time.perf_counter
            while True:
                now = loop.time()
                if now >= end:
                    return
                kind = int((now - t0) / slot) % turns if turns > 1 else 0
                call, metadata = calls[kind]
                t = perf()
                try:
                    await call(request, timeout=10, metadata=metadata)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                if now >= count_from:
                    latencies, codes = results[kind]
                    latencies.append(perf() - t)
                    codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(one() for _ in range(concurrency)))
    finally:
        for channel in channels:
            await channel.close()
    return results


def _worker(targets, user_id, concurrency, warmup, duration, out, cpus=None):
    if cpus:
        os.sched_setaffinity(0, cpus)
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    out.put(asyncio.run(_drive(targets, user_id, concurrency, warmup, duration)))


def _summary(latencies, codes, seconds):
    latencies.sort()
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": (percentile(latencies, 50) or 0) * 1000,
        "p99_ms": (percentile(latencies, 99) or 0) * 1000,
        "completed": len(latencies),
        "codes": codes,
    }


def _run(targets, user_id, concurrency, duration, warmup, cpus=None):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_worker, args=(targets, user_id, concurrency, warmup, duration, out, cpus), daemon=True)
    p.start()
    results = out.get(timeout=duration + warmup + 60)
    p.join(timeout=10)
    return results


def run_load(target, user_id="bench1", concurrency=16, duration=5.0, warmup=0.5, token=None):
    """GetBalance in a loop; `token` is sent as `authorization: Bearer <token>` metadata on every call."""
    ((latencies, codes),) = _run([(target, token)], user_id, concurrency, duration, warmup)
    return _summary(latencies, codes, duration)


def run_alternating(first, second, user_id="bench1", concurrency=16, duration=10.0, warmup=0.5, cpus=None):
    """Two servers called in turns of a quarter second by the same tasks: (first's, second's) figures.

    `first` and `second` are (target, token); each gets half of `duration`, rps is per second of its turns.
    """
    results = _run([first, second], user_id, concurrency, duration, warmup, cpus)
    return tuple(_summary(latencies, codes, duration / 2) for latencies, codes in results)
