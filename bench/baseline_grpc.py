"""Baseline for the gRPC row: a servicer that returns a constant, on the service's grpc.server setup.

Same executor size and options as `grpc_server.serve` (read from it, so they stay in step), without the
store, validation and per-call logging: the ratio against it shows what those cost.
"""

import argparse
import inspect
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

MAX_WORKERS = inspect.signature(grpc_server.serve).parameters["max_workers"].default
CONSTANT = wallet_pb2.GetBalanceResponse(user_id="bench", balance=0)


class ConstantServicer(wallet_pb2_grpc.WalletServiceServicer):
    def GetBalance(self, request, context):
        return CONSTANT


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    executor = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="grpc")
    server = grpc.server(executor, options=[("grpc.so_reuseport", 0)])
    wallet_pb2_grpc.add_WalletServiceServicer_to_server(ConstantServicer(), server)
    server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"baseline gRPC listening on {args.host}:{args.port} with {MAX_WORKERS} workers", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(1.0).wait()
    os._exit(0)


if __name__ == "__main__":
    main()
