"""gRPC against the running `python app.py`: same store as HTTP, validation, reflection, health, concurrency."""

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import wallet_pb2
import wallet_pb2_grpc
from conftest import wait_for


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
