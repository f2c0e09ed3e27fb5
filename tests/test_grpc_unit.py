"""grpc_server in-process: a real server on a free port, a real channel, and a dict for a store."""

import logging
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import grpc_server
import wallet_pb2
import wallet_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("wallet_pb2.py", "wallet_pb2.pyi", "wallet_pb2_grpc.py")
METHOD = "/wallet.v1.WalletService/GetBalance"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FakeStore:
    def __init__(self, balances=None):
        self.balances = dict(balances or {})

    def balance(self, user_id):
        return self.balances.get(user_id, 0)


class FailingStore:
    def balance(self, user_id):
        raise RuntimeError("store is down")


class BlockingStore(FakeStore):
    """Holds every balance() call until `release` is set, to keep a call in flight."""

    def __init__(self):
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def balance(self, user_id):
        self.entered.set()
        assert self.release.wait(10)
        return 7


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def start():
    services = []

    def start(store=None):
        svc = grpc_server.serve(store if store is not None else FakeStore({"alice": 1234, "big": 2**63 - 1}),
                                "127.0.0.1", 0)
        services.append(svc)
        return svc

    yield start
    for svc in services:
        svc.stop(grace=0)


@pytest.fixture
def channel(start):
    svc = start()
    with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=5)
        yield ch


@pytest.fixture
def stub(channel):
    return wallet_pb2_grpc.WalletServiceStub(channel)


def get_balance(stub, user_id):
    return stub.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user_id), timeout=5)


def test_balance_is_returned(stub):
    assert get_balance(stub, "alice") == wallet_pb2.GetBalanceResponse(user_id="alice", balance=1234)
    assert get_balance(stub, "big").balance == 2**63 - 1


def test_unknown_user_has_zero_balance(stub):
    reply = get_balance(stub, "nobody")
    assert (reply.user_id, reply.balance) == ("nobody", 0)
    assert get_balance(stub, "a" * 64).balance == 0  # 64 characters is still a valid id


@pytest.mark.parametrize("user_id", ["", "a" * 65, "bad id!", "a\n"])
def test_invalid_user_id_is_invalid_argument(stub, user_id):
    with pytest.raises(grpc.RpcError) as info:
        get_balance(stub, user_id)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_id" in info.value.details()


def test_reflection_lists_the_services(channel):
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=5))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"wallet.v1.WalletService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_health_reports_serving(channel):
    check = health_pb2_grpc.HealthStub(channel).Check
    for service in ("", "wallet.v1.WalletService"):
        assert check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING
    with pytest.raises(grpc.RpcError) as info:
        check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_stop_turns_health_not_serving_and_drains_calls_in_flight(start):
    store = BlockingStore()
    svc = start(store)
    with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
        in_flight = wallet_pb2_grpc.WalletServiceStub(ch).GetBalance.future(
            wallet_pb2.GetBalanceRequest(user_id="alice"), timeout=10)
        assert store.entered.wait(5)
        stopping = threading.Thread(target=svc.stop, kwargs={"grace": 5.0})
        stopping.start()

        def status(service):
            return svc.health.Check(health_pb2.HealthCheckRequest(service=service), None).status

        wait_until(lambda: status("") == NOT_SERVING)
        assert status("wallet.v1.WalletService") == NOT_SERVING
        assert stopping.is_alive()  # still draining the blocked call
        store.release.set()
        assert in_flight.result(timeout=5).balance == 7
        stopping.join(5)
        assert not stopping.is_alive()


def test_one_log_line_per_call_with_its_code(stub, channel, caplog):
    caplog.set_level(logging.INFO, logger="wallet.grpc")
    get_balance(stub, "alice")
    with pytest.raises(grpc.RpcError):
        get_balance(stub, "bad id!")
    with pytest.raises(grpc.RpcError):
        channel.unary_unary("/wallet.v1.WalletService/NoSuchMethod")(b"", timeout=5)

    records = [r for r in caplog.records if r.name == "wallet.grpc"]
    assert [(r.grpc_method, r.grpc_code) for r in records] == [
        (METHOD, "OK"),
        (METHOD, "INVALID_ARGUMENT"),
        ("/wallet.v1.WalletService/NoSuchMethod", "UNIMPLEMENTED"),
    ]
    first = records[0]
    assert first.levelno == logging.INFO
    assert first.peer.startswith("ipv4:127.0.0.1:")
    assert isinstance(first.duration_ms, float) and first.duration_ms >= 0
    assert first.getMessage() == f"grpc {METHOD} OK {first.duration_ms:.1f}ms peer={first.peer}"
    assert records[1].getMessage().startswith(f"grpc {METHOD} INVALID_ARGUMENT ")


def test_store_failure_logs_unknown(start, caplog):
    caplog.set_level(logging.INFO, logger="wallet.grpc")
    svc = start(FailingStore())
    with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch, pytest.raises(grpc.RpcError) as info:
        get_balance(wallet_pb2_grpc.WalletServiceStub(ch), "alice")
    assert info.value.code() == grpc.StatusCode.UNKNOWN
    assert [r.grpc_code for r in caplog.records if r.name == "wallet.grpc"] == ["UNKNOWN"]


def test_streaming_calls_are_logged_and_still_work(channel, caplog):
    caplog.set_level(logging.INFO, logger="wallet.grpc")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert next(watch).status == SERVING  # Watch keeps its non-blocking send callback through the wrapper
    watch.cancel()
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))

    # Streams are logged when they terminate, which can be just after the client returns.
    def methods():
        return sorted(r.grpc_method for r in caplog.records if r.name == "wallet.grpc")

    wait_until(lambda: len(methods()) == 2)
    assert methods() == ["/grpc.health.v1.Health/Watch",
                         "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"]


def test_taken_port_raises_oserror_naming_it(start):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(OSError, match=f"gRPC port {port} on 127.0.0.1 is not available"):
            grpc_server.serve(FakeStore(), "127.0.0.1", port)
    # Another gRPC server is refused too: SO_REUSEPORT is off, so the port is not silently shared.
    svc = start()
    with pytest.raises(OSError, match=str(svc.port)):
        grpc_server.serve(FakeStore(), "127.0.0.1", svc.port)


def test_concurrent_calls_all_succeed_and_agree(start):
    balances = {f"user{i}": i * 1000 + 7 for i in range(50)}
    svc = start(FakeStore(balances))
    users = [f"user{i % 50}" for i in range(500)]
    with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
        stub = wallet_pb2_grpc.WalletServiceStub(ch)
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda uid: get_balance(stub, uid), users))
    assert [(r.user_id, r.balance) for r in replies] == [(u, balances[u]) for u in users]


def test_generated_code_matches_the_proto(tmp_path):
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={tmp_path}",
           f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(ROOT / "wallet.proto")]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in GENERATED:
        assert (tmp_path / name).read_bytes() == (ROOT / name).read_bytes(), f"{name} is stale: run `make proto`"
