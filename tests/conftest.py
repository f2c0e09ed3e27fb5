"""Test fixtures in two tiers.

- In-process (`app`, `client`, `store`, `hub`): the Flask app over a fresh MemoryStore and a started
  EventHub, driven through Flask's test client, as in Flask's tutorial. Fast: validation, error shapes,
  idempotency, authorization and everything else that needs no socket.
- Process (`server`, `start_server`): the real `python app.py` on free ports, talked to over sockets:
  framing, keep-alive, WebSocket delivery, shutdown, flags.

Both stores: every test that uses `server` (or `store_args`) runs twice, as `[memory]` (the in-process
store) and `[redis]` (`--redis-url` on a redis-server this session starts, tests/redis_server.py), so the
two cannot drift from the contract. A test about the in-process store itself, or one too heavy to double,
says so with `@pytest.mark.memory_only("why")` and runs as `[memory]` only. Without the redis-server
binary the `[redis]` variants skip with the harness's reason (and fail with CI=true). A test that starts
a server of its own puts it on the test's store with `start_server(*store_args)`; a bare `start_server()`
(flags, shutdown, floods) is on the in-process store.
"""

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

import events
from app import create_app
from events import EventHub
from redis_server import own_redis_server, redis_server, service_args  # noqa: F401 (fixtures for every test file)
from wallet_store import MemoryStore

ROOT = Path(__file__).resolve().parent.parent
_LISTEN = re.compile(r"listening on http://[^:]+:(\d+)|gRPC listening on \S+:(\d+)")
STORES = ("memory", "redis")
_BOTH_STORE_FIXTURES = ("server", "store_args")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "memory_only(reason): run against the in-process store only (the `server` and `store_args` "
                   "fixtures are otherwise parametrized [memory] and [redis])")


def pytest_generate_tests(metafunc):
    """`[memory]` and `[redis]` for every test that uses `server` or `store_args`, unless marked memory_only."""
    stores = ["memory"] if metafunc.definition.get_closest_marker("memory_only") else list(STORES)
    for name in _BOTH_STORE_FIXTURES:
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, stores, indirect=True)


def peer_closes(sock, timeout: float) -> bool:
    """Whether the server ends the connection (EOF or reset) within `timeout` seconds, ignoring data."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


def wait_for(condition, timeout=10.0, interval=0.01, message="condition"):
    """Poll until condition() is truthy; the deadline is what makes a hung server fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class Server:
    """A running `python app.py` started on port 0; the ports are read from its start-up log."""

    def __init__(self, log_dir, args=(), env=None, port_flags=True):
        self.store = "redis" if "--redis-url" in args or (env or {}).get("REDIS_URL") else "memory"
        self.log_path = Path(log_dir) / f"server-{uuid.uuid4().hex[:8]}.log"
        self.log_file = open(self.log_path, "w+b")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        flags = ["--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0"] if port_flags else []
        cmd = [sys.executable, str(ROOT / "app.py"), *flags, *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self.log_file, stderr=subprocess.STDOUT)
        ports = wait_for(self._ports, timeout=20, message=f"server start-up (log: {self.log_path})")
        self.http_port, self.grpc_port = ports
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.ws_url = f"ws://127.0.0.1:{self.http_port}/ws"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        wait_for(self._healthy, timeout=10, message="/healthz")

    def _ports(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        http = grpc = None
        for m in _LISTEN.finditer(self.log()):
            http = http or m.group(1)
            grpc = grpc or m.group(2)
        return (int(http), int(grpc)) if http and grpc else None

    def _healthy(self):
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def log(self):
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


def _store_args(request) -> tuple[str, ...]:
    """app.py flags for the store this test runs against; a Redis store gets a key prefix of its own."""
    store = getattr(request, "param", "memory")
    if store == "memory":
        return ()
    return service_args(request.getfixturevalue("redis_server"))  # skips (fails with CI=true) without the binary


@pytest.fixture(scope="session")
def server(request, tmp_path_factory):
    """One `python app.py` per store, shared by the session: tests tell their data apart by user id."""
    srv = Server(tmp_path_factory.mktemp(f"server-{getattr(request, 'param', 'memory')}"), _store_args(request))
    yield srv
    code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log()[-5000:]}"
    assert "Traceback" not in srv.log(), srv.log()[-5000:]


@pytest.fixture
def store_args(request) -> tuple[str, ...]:
    """Flags for `start_server(*store_args)`: a server of this test alone on the parametrized store, empty."""
    return _store_args(request)


@pytest.fixture
def start_server(tmp_path):
    started = []

    def start(*args, env=None, port_flags=True):
        srv = Server(tmp_path, args, env, port_flags)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def event_sink(hub: EventHub):
    """The in-process EventSink of a hub: events.MemoryEventLog (numbers events) where it exists."""
    log_class = getattr(events, "MemoryEventLog", None)
    return log_class(hub) if log_class is not None else hub


@pytest.fixture
def hub():
    hub = EventHub().start()
    yield hub
    hub.stop()


@pytest.fixture
def store(hub):
    return MemoryStore(event_sink(hub))


@pytest.fixture
def app(store, hub):
    """The app with authentication left out and no allowed cross-origin pages."""
    return create_app(store, hub)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def uid():
    """A user id no other test uses."""
    return "u" + uuid.uuid4().hex[:16]


@pytest.fixture
def http():
    with requests.Session() as session:
        yield session
