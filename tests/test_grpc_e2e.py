"""gRPC against the running `python app.py`: same store as HTTP, validation, reflection, health, concurrency,
authentication, held-open streams."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import jwt
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import wallet_pb2
import wallet_pb2_grpc
from conftest import Server, wait_for


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


@pytest.fixture
def stub(channel):
    return wallet_pb2_grpc.WalletServiceStub(channel)


def grpc_balance(stub, user_id):
    return stub.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user_id), timeout=10)


def test_grpc_balance_equals_http_balance(server, http, stub, uid):
    for path, amount in [("deposit", 1000), ("withdraw", 250), ("deposit", 5)]:
        assert http.post(f"{server.url}/api/wallet/{path}", json={"user_id": uid, "amount": amount}).status_code == 200
        reply = grpc_balance(stub, uid)
        assert reply.user_id == uid
        assert reply.balance == http.get(f"{server.url}/api/wallet/balance/{uid}").json()["balance"]
    assert grpc_balance(stub, uid).balance == 755


def test_integer_looking_id_is_the_same_wallet(server, http, stub, uid):
    number = str(int(uid[1:], 16))[:18]
    http.post(f"{server.url}/api/wallet/deposit", json={"user_id": int(number), "amount": 42})
    assert grpc_balance(stub, number).balance == 42


def test_unknown_user_has_balance_zero(stub, uid):
    reply = grpc_balance(stub, uid)
    assert (reply.user_id, reply.balance) == (uid, 0)


@pytest.mark.parametrize("bad", ["", "x" * 65, "bad id", "a/b", "é", "a\n"])
def test_invalid_user_id_is_invalid_argument(stub, bad):
    with pytest.raises(grpc.RpcError) as info:
        grpc_balance(stub, bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_id" in info.value.details()


def test_reflection_lists_both_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"wallet.v1.WalletService", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("service", ["", "wallet.v1.WalletService"])
def test_health_is_serving(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_500_concurrent_calls_from_16_threads_agree(server, http, stub, uid):
    http.post(f"{server.url}/api/wallet/deposit", json={"user_id": uid, "amount": 31337})
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: grpc_balance(stub, uid), range(500)))
    assert len(replies) == 500
    assert {(r.user_id, r.balance) for r in replies} == {(uid, 31337)}


def test_each_call_is_logged(server, stub, uid):
    grpc_balance(stub, uid)
    with pytest.raises(grpc.RpcError):
        grpc_balance(stub, "bad id")
    wait_for(lambda: "GetBalance OK" in server.log() and "GetBalance INVALID_ARGUMENT" in server.log(),
             message="gRPC call log lines")
    line = next(ln for ln in server.log().splitlines() if "GetBalance INVALID_ARGUMENT" in ln)
    assert "ms" in line and "peer=" in line


# --- authentication on: API_KEYS and PLAYER_TOKEN_SECRET in the environment ------------------------------

KEY = "e2e-grpc-operator-" + "k" * 30
SECRET = "e2e-grpc-player-secret-" + "s" * 20


def player_token(sub, exp_in=600, secret=SECRET):
    return jwt.encode({"sub": sub, "exp": int(time.time() + exp_in)}, secret, algorithm="HS256")


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("grpc-auth"), env={"API_KEYS": KEY, "PLAYER_TOKEN_SECRET": SECRET})
    yield srv
    code = srv.stop()
    assert code == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def secured_channel(secured):
    with grpc.insecure_channel(secured.grpc_target) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


def secured_balance(channel, user_id, credential=None, header=None):
    metadata = [("authorization", header or f"Bearer {credential}")] if (credential or header) else []
    try:
        reply = wallet_pb2_grpc.WalletServiceStub(channel).GetBalance(
            wallet_pb2.GetBalanceRequest(user_id=user_id), metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, reply.balance


def test_grpc_credentials_against_the_process(secured, secured_channel, uid):
    deposit = requests.post(f"{secured.url}/api/wallet/deposit", json={"user_id": uid, "amount": 321},
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert deposit.status_code == 200, deposit.text
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    expired = player_token(uid, exp_in=-5)
    other_secret = player_token(uid, secret="x" * 40)
    unsigned = jwt.encode({"sub": uid, "exp": int(time.time() + 600)}, None, algorithm="none")
    assert secured_balance(secured_channel, uid)[0] == unauthenticated
    assert secured_balance(secured_channel, uid, header=f"Basic {KEY}")[0] == unauthenticated
    assert secured_balance(secured_channel, uid, "unknown-" + "k" * 40)[0] == unauthenticated
    assert secured_balance(secured_channel, uid, expired)[0] == unauthenticated
    assert secured_balance(secured_channel, uid, other_secret)[0] == unauthenticated
    assert secured_balance(secured_channel, uid, unsigned)[0] == unauthenticated
    assert secured_balance(secured_channel, uid, player_token("someone_else"))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert secured_balance(secured_channel, uid, KEY) == (grpc.StatusCode.OK, 321)
    own = player_token(uid)
    assert secured_balance(secured_channel, uid, own) == (grpc.StatusCode.OK, 321)
    wait_for(lambda: f"caller=player:{uid}" in secured.log(), message="the player's call in the log")
    log = secured.log()
    for secret in (KEY, SECRET, own, expired, other_secret, unsigned):
        assert secret not in log


def test_health_and_reflection_stay_open_with_auth(secured_channel):
    reply = health_pb2_grpc.HealthStub(secured_channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(secured_channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=10)
    assert "wallet.v1.WalletService" in {s.name for r in responses for s in r.list_services_response.service}


def test_fifty_idle_streams_against_the_process(server, uid):
    release = threading.Event()

    def requests_then_wait():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        release.wait(30)

    local = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
    with grpc.insecure_channel(server.grpc_target, options=local) as holder, \
            grpc.insecure_channel(server.grpc_target, options=local) as other:
        reflect = reflection_pb2_grpc.ServerReflectionStub(holder)
        calls = [reflect.ServerReflectionInfo(requests_then_wait(), timeout=30) for _ in range(50)]
        try:
            for call in calls:
                next(call)  # answered: open, and idle from now on
            stub = wallet_pb2_grpc.WalletServiceStub(other)
            check = health_pb2_grpc.HealthStub(other).Check
            for _ in range(10):
                started = time.monotonic()
                assert stub.GetBalance(wallet_pb2.GetBalanceRequest(user_id=uid), timeout=1).balance == 0
                assert check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING
                assert time.monotonic() - started < 1
        finally:
            release.set()
            for call in calls:
                call.cancel()
