"""Test fixtures in two tiers.

- In-process (`app`, `client`, `store`, `hub`): the Flask app over a fresh MemoryStore and a started
  EventHub, driven through Flask's test client, as in Flask's tutorial. Fast: validation, error shapes,
  idempotency, authorization and everything else that needs no socket.
- Process (`server`, `start_server`): the real `python app.py` on free ports, talked to over sockets:
  framing, keep-alive, WebSocket delivery, shutdown, flags.
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
from wallet_store import MemoryStore

ROOT = Path(__file__).resolve().parent.parent
_LISTEN = re.compile(r"listening on http://[^:]+:(\d+)|gRPC listening on \S+:(\d+)")


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


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server"))
    yield srv
    code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log()[-5000:]}"
    assert "Traceback" not in srv.log(), srv.log()[-5000:]


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
