"""A private redis-server for tests: started on a free port in a temporary folder, never touching the disk
unless asked (`--save '' --appendonly no`).

Without the `redis-server` binary the Redis tests are skipped locally (the reason says how to install it);
with `CI=true` they fail instead, so CI can never pass by silently skipping them.
"""

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

INSTALL_HINT = "redis-server not found: install it with `apt-get install redis-server` (Debian's package)"


def redis_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)), None)


def require_redis_binary() -> str:
    binary = redis_binary()
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(INSTALL_HINT + " (CI=true: the Redis tests must run)", pytrace=False)
        pytest.skip(INSTALL_HINT)
    return binary


def free_port() -> int:
    # `redis-server --port 0` turns TCP off instead of choosing a port: pick one ourselves.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process; stop() and start() again reuse the same port and folder."""

    def __init__(self, directory: Path, *extra_args: str, persistent: bool = False) -> None:
        self.binary = require_redis_binary()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        persistence = (["--appendonly", "yes", "--appendfsync", "always", "--save", ""] if persistent
                       else ["--save", "", "--appendonly", "no"])
        self.args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                     "--daemonize", "no", "--protected-mode", "no", *persistence, *extra_args]
        self.proc: subprocess.Popen | None = None
        self.log_path = self.directory / f"redis-{self.port}.log"
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **options) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=2, **options)

    def start(self, timeout: float = 10.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        deadline = time.monotonic() + timeout
        probe = self.client()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n"
                                       + self.log_path.read_text(errors="replace")[-3000:])
                try:
                    if probe.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING within {timeout}s")
                time.sleep(0.02)
        finally:
            probe.close()

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}:"


def service_args(server: RedisServer, prefix: str | None = None) -> tuple[str, ...]:
    """Flags that put a `python app.py` on this Redis, under a key prefix of its own unless given one.

    For a fixture parametrized over both stores, e.g. in conftest:
    `args = () if request.param == "memory" else service_args(request.getfixturevalue("redis_server"))`.
    """
    return ("--redis-url", server.url, "--redis-prefix", prefix or unique_prefix())


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server shared by the session; tests stay independent through unique key prefixes."""
    require_redis_binary()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_redis_server(tmp_path):
    """A redis-server of this test alone (to stop, restart or flush it)."""
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()
