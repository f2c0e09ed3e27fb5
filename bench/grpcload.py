"""gRPC load: a grpc.aio client in its own process, N concurrent GetBalance calls in a loop for a fixed time."""

import asyncio
import multiprocessing
import os
import sys
import time

from common import ROOT, percentile


async def _drive(target, user_id, concurrency, warmup, duration, token=None):
    import grpc

    import wallet_pb2
    import wallet_pb2_grpc

    latencies, codes = [], {}
    async with grpc.aio.insecure_channel(target) as channel:
        # The request is serialized once and responses are checked only for arriving: the client does as
        # little per call as it can, so that it takes as little of the machine as possible from the server.
        check = wallet_pb2_grpc.WalletServiceStub(channel)
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        reply = await check.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user_id), timeout=10, metadata=metadata)
        assert reply.user_id in (user_id, "bench"), reply
        call = channel.unary_unary("/wallet.v1.WalletService/GetBalance", request_serializer=None,
                                   response_deserializer=None, _registered_method=True)
        request = wallet_pb2.GetBalanceRequest(user_id=user_id).SerializeToString()
        loop = asyncio.get_running_loop()
        count_from = loop.time() + warmup
        end = count_from + duration

        async def one():
            perf = time.perf_counter
            while True:
                now = loop.time()
                if now >= end:
                    return
                t = perf()
                try:
                    await call(request, timeout=10, metadata=metadata)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                if now >= count_from:
                    latencies.append(perf() - t)
                    codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return latencies, codes


def _worker(target, user_id, concurrency, warmup, duration, token, out):
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    latencies, codes = asyncio.run(_drive(target, user_id, concurrency, warmup, duration, token))
    out.put((latencies, codes))


def run_load(target, user_id="bench1", concurrency=16, duration=5.0, warmup=0.5, token=None):
    """GetBalance in a loop; `token` is sent as `authorization: Bearer <token>` metadata on every call."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_worker, args=(target, user_id, concurrency, warmup, duration, token, out), daemon=True)
    p.start()
    latencies, codes = out.get(timeout=duration + warmup + 60)
    p.join(timeout=10)
    latencies.sort()
    return {
        "rps": len(latencies) / duration,
        "p50_ms": (percentile(latencies, 50) or 0) * 1000,
        "p99_ms": (percentile(latencies, 99) or 0) * 1000,
        "completed": len(latencies),
        "codes": codes,
    }
