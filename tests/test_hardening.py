"""Regression tests for client mistakes found in review: each gets a clear answer, never a traceback."""

import base64
import json
import os
import socket
import struct
import time

import grpc
import pytest
import simple_websocket

from conftest import wait_for


def raw_http(server, data, read_timeout=5):
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=read_timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def test_malformed_chunked_body_is_400(server):
    reply = raw_http(server, b"POST /api/wallet/deposit HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"zz\r\nabc\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b'"invalid_request"' in reply


@pytest.mark.parametrize("headers", [b"Content-Length: abc\r\n", b"Content-Length: -5\r\n",
                                     b"Content-Length: 1\r\nContent-Length: 30\r\n"])
def test_bad_content_length_is_400(server, headers):
    reply = raw_http(server, b"POST /api/wallet/deposit HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n{}")
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"Content-Length" in reply


def test_expect_100_continue_is_answered_once(server):
    body = b'{"user_id": "cont", "amount": 1}'
    reply = raw_http(server, b"POST /api/wallet/deposit HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert reply.count(b"100 Continue") == 1
    assert b"HTTP/1.1 200 OK" in reply


def test_trailing_slash_is_the_same_endpoint_for_idempotency(server, http, uid):
    headers = {"Idempotency-Key": f"slash-{uid}"}
    first = http.post(server.url + "/api/wallet/deposit", json={"user_id": uid, "amount": 3}, headers=headers)
    again = http.post(server.url + "/api/wallet/deposit/", json={"user_id": uid, "amount": 3}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert http.get(f"{server.url}/api/wallet/balance/{uid}").json()["balance"] == 3


def test_lone_surrogate_id_is_echoed_and_the_connection_lives(server):
    ws = simple_websocket.Client.connect(server.ws_url)
    ws.send('{"action": "ping", "id": "\\ud800"}')
    reply = json.loads(ws.receive(10))
    assert reply == {"type": "pong", "id": "\ud800"}
    ws.send('{"action": "ping"}')
    assert json.loads(ws.receive(10)) == {"type": "pong"}
    ws.close()


def test_undecodable_grpc_request_is_invalid_argument(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = channel.unary_unary("/wallet.v1.WalletService/GetBalance")
        for raw in (b"\x0a\x02\xff\xfe", b"\xff\xff\xff"):
            with pytest.raises(grpc.RpcError) as info:
                call(raw, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _masked_text(payload):
    mask = os.urandom(4)
    n = len(payload)
    head = struct.pack("!BB", 0x81, 0x80 | n) if n < 126 else struct.pack("!BBH", 0x81, 0xFE, n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_client_flooding_requests_without_reading_is_cut_off(start_server):
    srv = start_server()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", srv.http_port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    frame = _masked_text(json.dumps({"action": "ping", "id": "x" * 3000}).encode())
    s.settimeout(0.5)
    sent, ended = 0, False  # noqa: F841 (sent helps when debugging)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not ended:
        try:
            s.sendall(frame)  # never read the answers
            sent += 1
        except (ConnectionResetError, BrokenPipeError):
            ended = True
        except (TimeoutError, OSError):
            # Our own send buffer is full too; the server must have given up on us by now or soon.
            ended = wait_for(lambda: _peer_closed(s), timeout=20, message="the server to drop the flooder")
    assert ended or _peer_closed(s)
    s.close()
    assert "Traceback" not in srv.log()


def _peer_closed(sock):
    try:
        sock.setblocking(False)
        while sock.recv(1 << 20):
            pass
        return True  # end of stream
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)
