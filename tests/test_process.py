"""The process as an operator sees it: flags and variables, start-up errors, logs, graceful shutdown."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import simple_websocket

from conftest import ROOT, wait_for

_SETTINGS_VARIABLES = ("HOST", "HTTP_PORT", "GRPC_PORT", "LOG_LEVEL", "LOG_FORMAT", "MAX_CONNECTIONS",
                       "ALLOWED_ORIGINS", "REDIS_URL", "REDIS_PREFIX", "API_KEYS", "PLAYER_TOKEN_SECRET")


def run_app(*args, env=None, timeout=15):
    """Run app.py expecting it to exit by itself (bad settings): returns (code, stdout, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if k not in _SETTINGS_VARIABLES}
    proc = subprocess.run([sys.executable, str(ROOT / "app.py"), *args], cwd=ROOT, env={**full_env, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def test_help_lists_every_flag_and_variable():
    code, out, _ = run_app("--help")
    assert code == 0
    for name in ("--host", "--http-port", "--grpc-port", "--log-level", "--log-format", "--max-connections",
                 "--allowed-origins", "--redis-url", "--redis-prefix", *_SETTINGS_VARIABLES):
        assert name in out


# Every flag and variable is checked in-process (test_app.py); these run the real process end to end.
@pytest.mark.parametrize("args, env, names", [
    (["--http-port", "abc"], {}, "--http-port"),
    ([], {"MAX_CONNECTIONS": "0"}, "MAX_CONNECTIONS"),
    (["--no-such-flag"], {}, "--no-such-flag"),
    (["--host", "not a host!"], {}, "not a host!"),
    ([], {"API_KEYS": "short"}, "API_KEYS"),
    ([], {"API_KEYS": "k" * 40, "PLAYER_TOKEN_SECRET": "short"}, "PLAYER_TOKEN_SECRET"),
])
def test_bad_setting_exits_with_a_short_clear_message(args, env, names):
    code, _, err = run_app(*args, env=env)
    assert code != 0
    assert names in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2, err


def test_bad_api_keys_exit_2_without_showing_a_key():
    code, out, err = run_app(env={"API_KEYS": "a-valid-operator-key-0123456789abcdef,has space but long enough 123"})
    assert code == 2 and "API_KEYS" in err
    assert "valid-operator-key" not in err + out and "has space" not in err + out
    assert len(err.strip().splitlines()) == 1, err


def test_unreachable_redis_exits_1_naming_host_and_port_not_the_password():
    sock, port = _taken_port()  # listening but never answering: a connect that cannot complete a PING
    sock.close()  # now nothing listens there: connection refused
    code, out, err = run_app("--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
                             env={"REDIS_URL": f"redis://:hunter2-secret@127.0.0.1:{port}/0"})
    assert code == 1, (out, err)
    assert f"127.0.0.1:{port}" in err and "hunter2" not in err + out
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def _taken_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port"])
def test_taken_port_is_named(flag):
    sock, port = _taken_port()
    try:
        other = "--grpc-port" if flag == "--http-port" else "--http-port"
        code, _, err = run_app("--host", "127.0.0.1", flag, str(port), other, "0")
    finally:
        sock.close()
    assert code != 0
    assert str(port) in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2, err


def test_flag_beats_variable_and_ports_come_from_the_environment(start_server):
    # A bad HTTP_PORT is never looked at when the flag is given.
    srv = start_server(env={"HTTP_PORT": "not-a-port"})
    assert requests.get(srv.url + "/healthz", timeout=5).json() == {"status": "ok"}
    srv2 = start_server("--host", "127.0.0.1", env={"HTTP_PORT": "0", "GRPC_PORT": "0"}, port_flags=False)
    assert requests.get(srv2.url + "/healthz", timeout=5).status_code == 200


def test_max_connections_flag_caps_connections(start_server):
    srv = start_server("--max-connections", "2")
    # A place is held only by a connection the server answered: until the server has seen the start-up
    # probe's connection close, that one still holds a place and a new one may be shed instead.
    held = []
    try:
        for _ in range(2):
            held.append(wait_for(lambda: _kept_alive(srv), timeout=5, message="a connection holding a place"))
        wait_for(lambda: _status_of_one_more(srv) == 503, timeout=5, message="a third connection to be shed")
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: _status_of_one_more(srv) == 200, timeout=5, message="the cap to free up")


def _status_of_one_more(srv, keep_alive=False):
    """Status of GET /healthz on a new connection; with keep_alive, (status, the open socket) instead."""
    sock = socket.create_connection(("127.0.0.1", srv.http_port), timeout=5)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + (b"" if keep_alive else b"Connection: close\r\n") + b"\r\n")
    reply = b""
    try:
        while b"\r\n\r\n" not in reply and (chunk := sock.recv(65536)):
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                       if line.startswith(b"content-length:")), 0)
        while len(body) < length and (chunk := sock.recv(65536)):
            body += chunk
    except ConnectionResetError:  # a shed connection may be reset after its 503 (the request came after it)
        head = reply.partition(b"\r\n\r\n")[0]
    status = int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None
    if keep_alive:
        return status, sock
    sock.close()
    return status


def _kept_alive(srv):
    """A keep-alive connection the server answered 200 (so it holds a place), or None if it was shed."""
    status, sock = _status_of_one_more(srv, keep_alive=True)
    if status == 200:
        return sock
    sock.close()
    return None


def test_start_up_logs_one_line_per_listener_and_warns_that_auth_is_off(start_server):
    srv = start_server()
    log = srv.log()
    assert f"127.0.0.1:{srv.http_port}" in log and f"127.0.0.1:{srv.grpc_port}" in log
    assert sum("listening on" in line for line in log.splitlines()) == 2
    assert any("WARNING" in line and "authentication is OFF" in line for line in log.splitlines()), log


def test_authentication_and_allowed_origins_from_the_environment(start_server):
    key = "operator-key-for-the-process-test-0123456789"
    srv = start_server(env={"API_KEYS": key, "ALLOWED_ORIGINS": "https://casino.example"})
    assert "authentication is OFF" not in srv.log()
    body = {"user_id": "proc-auth", "amount": 5}
    r = requests.post(srv.url + "/api/wallet/deposit", json=body, timeout=5)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    auth = {"Authorization": f"Bearer {key}"}
    r = requests.post(srv.url + "/api/wallet/deposit", json=body, headers={**auth, "Origin": "https://evil.example"},
                      timeout=5)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = requests.post(srv.url + "/api/wallet/deposit", json=body,
                      headers={**auth, "Origin": "https://casino.example"}, timeout=5)
    assert r.status_code == 200 and r.json()["balance"] == 5
    assert key not in srv.log()


def test_json_logs_parse_and_carry_the_request_id(start_server):
    srv = start_server("--log-format", "json")
    requests.get(srv.url + "/healthz", headers={"X-Request-ID": "trace-123"}, timeout=5)
    line = wait_for(lambda: next((ln for ln in srv.log().splitlines() if "trace-123" in ln), None),
                    message="request log line")
    record = json.loads(line)
    assert record["request_id"] == "trace-123"
    assert record["status"] == 200 and record["path"] == "/healthz" and record["method"] == "GET"
    assert srv.stop() == 0
    for ln in srv.log().splitlines():
        json.loads(ln)  # every line is one JSON object


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_closes_websockets_with_1001_and_exits_0(start_server, store_args, sig):
    srv = start_server(*store_args)
    clients = [simple_websocket.Client.connect(srv.ws_url + "?events=game_outcomes") for _ in range(20)]
    for c in clients:
        assert json.loads(c.receive(15))["type"] == "subscribed"
    started = time.monotonic()
    srv.proc.send_signal(sig)
    codes = []
    for c in clients:
        try:
            while c.receive(5) is not None:
                pass
        except simple_websocket.ConnectionClosed as exc:
            codes.append(exc.reason)
    code = srv.proc.wait(10)
    assert time.monotonic() - started < 5
    assert code == 0, srv.log()
    assert codes == [1001] * len(clients)
    assert "Traceback" not in srv.log()


def test_sigterm_under_load_loses_nothing_acknowledged(start_server, store_args):
    srv = start_server(*store_args)
    acks = {i: [] for i in range(4)}
    stop = threading.Event()

    def post(i):
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.post(srv.url + "/api/wallet/deposit", json={"user_id": f"load{i}", "amount": 7}, timeout=5)
                except requests.RequestException:
                    return
                if r.status_code != 200:
                    return
                acks[i].append(r.json()["balance"])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: all(len(a) >= 20 for a in acks.values()), message="deposits flowing")
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(10)
    elapsed = time.monotonic() - started
    stop.set()
    for t in threads:
        t.join(10)
    assert code == 0, srv.log()
    assert elapsed < 5
    # Every acknowledged deposit was applied exactly once, in order: the k-th ack shows k deposits.
    for balances in acks.values():
        assert balances == [7 * (k + 1) for k in range(len(balances))]
    assert "Traceback" not in srv.log()
    if srv.store == "redis":  # the state outlives the process: the next one finds every acknowledged deposit
        again = start_server(*store_args)
        for i, balances in acks.items():
            got = requests.get(f"{again.url}/api/wallet/balance/load{i}", timeout=5).json()["balance"]
            # A deposit applied but cut off before its answer may be there too: at most one per writer.
            assert got in (balances[-1], balances[-1] + 7), (i, got, balances[-1])
