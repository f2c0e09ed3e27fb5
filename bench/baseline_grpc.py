"""Baselines for the gRPC row, on the service's own grpc.server setup (pool size and options from grpc_server).

    --mode constant   a servicer returning a constant (what gRPC itself costs)
    --mode bare       the service's own WalletServicer over a MemoryStore, without the interceptor
                      (authentication, stream limits, per-call log line): what the interceptor costs

Neither has health, reflection or logging; the ratio of the service against `bare` is issue 15's goal.
"""

import argparse
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402

import grpc_server  # noqa: E402
import wallet_pb2  # noqa: E402
import wallet_pb2_grpc  # noqa: E402
from wallet_store import MemoryStore  # noqa: E402

WORKERS = grpc_server.UNARY_WORKERS
CONSTANT = wallet_pb2.GetBalanceResponse(user_id="bench", balance=0)


class ConstantServicer(wallet_pb2_grpc.WalletServiceServicer):
    def GetBalance(self, request, context):
        return CONSTANT


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=("constant", "bare"), default="constant")
    args = parser.parse_args()
    executor = ThreadPoolExecutor(WORKERS, thread_name_prefix="grpc")
    # The same options and call bound as grpc_server.serve, so only the servicer and interceptor differ.
    server = grpc.server(
        executor,
        maximum_concurrent_rpcs=grpc_server.MAX_STREAMS + WORKERS + grpc_server.MAX_QUEUED_CALLS,
        options=[("grpc.so_reuseport", 0),
                 ("grpc.max_concurrent_streams",
                  max(grpc_server.MAX_HTTP2_STREAMS, grpc_server.MAX_STREAMS_PER_CONNECTION + WORKERS))])
    if args.mode == "bare":
        store = MemoryStore()
        store.deposit("bench1", 100)
        servicer = grpc_server.WalletServicer(store)
    else:
        servicer = ConstantServicer()
    wallet_pb2_grpc.add_WalletServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"baseline gRPC ({args.mode}) listening on {args.host}:{args.port} with {WORKERS} workers", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(1.0).wait()
    os._exit(0)


if __name__ == "__main__":
    main()
