"""grpc_server in-process: a real server on a free port, real channels, a fake or a MemoryStore for a store."""

import logging
import socket
import subprocess
import sys
import threading
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import grpc_server
import wallet_pb2
import wallet_pb2_grpc
from auth import Auth
from wallet_store import MemoryStore, StoreUnavailable

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


class UnavailableStore:
    def balance(self, user_id):
        raise StoreUnavailable("the store cannot be reached")


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

    def start(store=None, **kwargs):
        svc = grpc_server.serve(store if store is not None else FakeStore({"alice": 1234, "big": 2**63 - 1}),
                                "127.0.0.1", 0, **kwargs)
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
    assert first.getMessage() == f"grpc {METHOD} OK {first.duration_ms:.1f}ms peer={first.peer} caller=-"
    assert records[1].getMessage().startswith(f"grpc {METHOD} INVALID_ARGUMENT ")


def test_store_bug_is_internal_with_no_detail(start, caplog):
    caplog.set_level(logging.INFO, logger="wallet.grpc")
    svc = start(FailingStore())
    with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch, pytest.raises(grpc.RpcError) as info:
        get_balance(wallet_pb2_grpc.WalletServiceStub(ch), "alice")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "store is down" not in info.value.details()
    records = [r for r in caplog.records if r.name == "wallet.grpc"]
    assert [r.levelname for r in records] == ["ERROR", "INFO"]  # the bug, then the call line
    assert records[1].grpc_code == "INTERNAL"


def test_store_unavailable_is_unavailable(start):
    svc = start(UnavailableStore())
    with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch, pytest.raises(grpc.RpcError) as info:
        get_balance(wallet_pb2_grpc.WalletServiceStub(ch), "alice")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "the store cannot be reached"


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


# --- authentication --------------------------------------------------------------------------------------

KEY = "grpc-operator-key-" + "k" * 32
SECRET = "grpc-player-secret-" + "s" * 32


def player_token(sub, exp_in=600, secret=SECRET):
    return jwt.encode({"sub": sub, "exp": int(time.time() + exp_in)}, secret, algorithm="HS256")


def unsigned_token(sub):
    return jwt.encode({"sub": sub, "exp": int(time.time() + 600)}, None, algorithm="none")


# (name, metadata, expected code); every call asks for alice's balance.
CREDENTIAL_CASES = [
    ("none", (), grpc.StatusCode.UNAUTHENTICATED),
    ("malformed", (("authorization", f"Basic {KEY}"),), grpc.StatusCode.UNAUTHENTICATED),
    ("empty bearer", (("authorization", "Bearer "),), grpc.StatusCode.UNAUTHENTICATED),
    ("unknown key", (("authorization", "Bearer unknown-" + "k" * 40),), grpc.StatusCode.UNAUTHENTICATED),
    ("expired token", (("authorization", "Bearer " + player_token("alice", exp_in=-5)),),
     grpc.StatusCode.UNAUTHENTICATED),
    ("other secret", (("authorization", "Bearer " + player_token("alice", secret="x" * 40)),),
     grpc.StatusCode.UNAUTHENTICATED),
    ("alg none", (("authorization", "Bearer " + unsigned_token("alice")),), grpc.StatusCode.UNAUTHENTICATED),
    ("two credentials", (("authorization", f"Bearer {KEY}"), ("authorization", f"Bearer {KEY}")),
     grpc.StatusCode.UNAUTHENTICATED),
    ("player for another user", (("authorization", "Bearer " + player_token("bob")),),
     grpc.StatusCode.PERMISSION_DENIED),
    ("operator", (("authorization", f"Bearer {KEY}"),), grpc.StatusCode.OK),
    ("own player", (("authorization", "Bearer " + player_token("alice")),), grpc.StatusCode.OK),
]


@pytest.fixture
def secured(start):
    store = MemoryStore()
    store.deposit("alice", 500)
    svc = start(store, auth=Auth([KEY], SECRET))
    with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
        yield ch


def call_code(channel, user_id, metadata):
    try:
        reply = wallet_pb2_grpc.WalletServiceStub(channel).GetBalance(
            wallet_pb2.GetBalanceRequest(user_id=user_id), metadata=metadata, timeout=5)
    except grpc.RpcError as err:
        return err.code(), err.details(), None
    return grpc.StatusCode.OK, "", reply


@pytest.mark.parametrize("name,metadata,expected", CREDENTIAL_CASES, ids=[c[0] for c in CREDENTIAL_CASES])
def test_get_balance_per_credential(secured, caplog, name, metadata, expected):
    caplog.set_level(logging.INFO, logger="wallet.grpc")
    code, details, reply = call_code(secured, "alice", metadata)
    assert code == expected, details
    if expected == grpc.StatusCode.OK:
        assert (reply.user_id, reply.balance) == ("alice", 500)
    credentials = [value.split()[-1] for _, value in metadata if value.split()[1:]]
    for credential in credentials:
        assert credential not in details
        assert credential not in caplog.text  # neither a key nor a token reaches the log
    (record,) = [r for r in caplog.records if r.name == "wallet.grpc"]
    assert record.grpc_code == expected.name


def test_log_names_the_caller(secured, caplog):
    caplog.set_level(logging.INFO, logger="wallet.grpc")
    call_code(secured, "alice", (("authorization", f"Bearer {KEY}"),))
    call_code(secured, "alice", (("authorization", "Bearer " + player_token("alice")),))
    callers = [r.caller for r in caplog.records if r.name == "wallet.grpc"]
    assert callers[0].startswith("key:") and len(callers[0]) == 12
    assert callers[1] == "player:alice"


def test_authentication_comes_before_validation(secured):
    assert call_code(secured, "bad id!", ())[0] == grpc.StatusCode.UNAUTHENTICATED
    assert call_code(secured, "bad id!", (("authorization", "Bearer " + player_token("alice")),))[0] == \
        grpc.StatusCode.PERMISSION_DENIED
    assert call_code(secured, "bad id!", (("authorization", f"Bearer {KEY}"),))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:  # undecodable bytes without a credential
        secured.unary_unary(METHOD)(b"\x0a\x02\xff\xfe", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_authentication_off_ignores_credentials(start):
    svc = start()
    with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
        for metadata in [(), (("authorization", "Basic nonsense"),), (("authorization", "Bearer whatever"),)]:
            code, _, reply = call_code(ch, "alice", metadata)
            assert (code, reply.balance) == (grpc.StatusCode.OK, 1234)


def test_health_and_reflection_stay_open(secured):
    check = health_pb2_grpc.HealthStub(secured).Check
    assert check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == SERVING
    watch = health_pb2_grpc.HealthStub(secured).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert next(watch).status == SERVING
    watch.cancel()
    reflect = reflection_pb2_grpc.ServerReflectionStub(secured)
    replies = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=5))
    assert "wallet.v1.WalletService" in {s.name for s in replies[0].list_services_response.service}


# --- held-open streams never starve unary calls ----------------------------------------------------------

def connect(port):
    # A local subchannel pool gives each channel its own TCP connection (grpc shares them by default).
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
    grpc.channel_ready_future(ch).result(timeout=5)
    return ch


class IdleStreams:
    """Reflection and health Watch streams held open by one client, each answered once and then left idle."""

    def __init__(self, channel):
        self.channel = channel
        self.release = threading.Event()
        self.calls = []

    def _requests(self):
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        self.release.wait(60)  # the stream stays open, and its server thread waits for the next request

    def reflection(self, timeout=30):
        call = reflection_pb2_grpc.ServerReflectionStub(self.channel).ServerReflectionInfo(self._requests(),
                                                                                           timeout=timeout)
        self.calls.append(call)
        next(call)
        return call

    def watch(self, timeout=30):
        call = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout)
        self.calls.append(call)
        next(call)
        return call

    def close(self):
        self.release.set()
        for call in self.calls:
            call.cancel()


@pytest.fixture
def idle_streams():
    opened = []

    def open_on(channel):
        streams = IdleStreams(channel)
        opened.append(streams)
        return streams

    yield open_on
    for streams in opened:
        streams.close()


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_fifty_idle_streams_do_not_starve_unary_calls(start, idle_streams):
    svc = start()
    with connect(svc.port) as holder, connect(svc.port) as other:
        streams = idle_streams(holder)
        for _ in range(40):
            streams.reflection()  # each holds a server thread while idle
        for _ in range(10):
            streams.watch()  # non-blocking: holds no thread, but counts as an open stream
        wait_until(lambda: svc.limits.open == 50)
        stub = wallet_pb2_grpc.WalletServiceStub(other)
        check = health_pb2_grpc.HealthStub(other).Check
        for _ in range(20):
            reply, took = timed(lambda: stub.GetBalance(wallet_pb2.GetBalanceRequest(user_id="alice"), timeout=1))
            assert reply.balance == 1234 and took < 1
            reply, took = timed(lambda: check(health_pb2.HealthCheckRequest(service=""), timeout=1))
            assert reply.status == SERVING and took < 1
        # The holder's own connection still gets unary calls through too.
        assert wallet_pb2_grpc.WalletServiceStub(holder).GetBalance(
            wallet_pb2.GetBalanceRequest(user_id="alice"), timeout=1).balance == 1234
        streams.close()
        wait_until(lambda: svc.limits.open == 0)


def test_streams_past_the_limits_are_refused_at_once(start, idle_streams):
    svc = start(max_streams_per_connection=3, max_streams=5)
    with connect(svc.port) as first, connect(svc.port) as second, connect(svc.port) as third:
        a = idle_streams(first)
        for _ in range(3):
            a.reflection()
        with pytest.raises(grpc.RpcError) as info:
            timed(lambda: a.watch(timeout=5))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "per connection" in info.value.details()
        b = idle_streams(second)
        b.reflection()
        b.watch()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:  # 5 open in all: a third connection is refused too
            idle_streams(third).reflection(timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 1
        assert wallet_pb2_grpc.WalletServiceStub(third).GetBalance(
            wallet_pb2.GetBalanceRequest(user_id="alice"), timeout=1).balance == 1234
        a.close()  # closed streams give their slots back
        wait_until(lambda: svc.limits.open == 2)
        idle_streams(third).reflection()


def test_calls_past_the_concurrency_limit_are_refused_at_once(start, idle_streams):
    store = BlockingStore()
    svc = start(store, unary_workers=1, max_streams=1, max_queued_calls=0)  # at most 2 calls at once
    with connect(svc.port) as ch:
        held = wallet_pb2_grpc.WalletServiceStub(ch).GetBalance.future(
            wallet_pb2.GetBalanceRequest(user_id="alice"), timeout=10)
        assert store.entered.wait(5)
        idle_streams(ch).reflection()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 1
        store.release.set()
        assert held.result(timeout=5).balance == 7


# --- log lines and handler reuse -------------------------------------------------------------------------

def test_client_chosen_method_name_is_one_escaped_line(channel, caplog):
    caplog.set_level(logging.INFO, logger="wallet.grpc")
    evil = "/wallet.v1.WalletService/Get\r\nBalance OK 0.1ms peer=forged\x1b[2J\x00"
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(evil)(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    (record,) = [r for r in caplog.records if r.name == "wallet.grpc"]
    line = record.getMessage()
    assert len(line.splitlines()) == 1
    assert not any(ch in line for ch in "\r\n\x1b\x00")
    assert "Get\\r\\nBalance" in line and "\\x1b[2J\\x00" in line


Details = namedtuple("Details", "method invocation_metadata")


def test_handlers_are_wrapped_once_per_method():
    looked_up = []
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: None)

    def continuation(details):
        looked_up.append(details.method)
        return handler if details.method == METHOD else None

    interceptor = grpc_server.Interceptor(Auth(), grpc_server.StreamLimits(1, 1))
    first = interceptor.intercept_service(continuation, Details(METHOD, ()))
    assert interceptor.intercept_service(continuation, Details(METHOD, ())) is first
    for i in range(3):  # unknown methods are never remembered: clients cannot grow the cache
        assert interceptor.intercept_service(continuation, Details(f"/x/{i}", ())) is None
    assert looked_up == [METHOD, "/x/0", "/x/1", "/x/2"]
