"""A private redis-server for the benchmark, on a free port in a temporary folder (as tests/redis_server.py does).

Persistence as docker-compose.yml runs it (append-only file, fsync on every write) unless `persistent=False`,
so the Redis rows measure the deployment the README recommends.
"""

import os
import shutil
import subprocess
import tempfile
import time

import redis
from common import LOGS, free_port


def redis_binary():
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)), None)


class RedisProcess:
    def __init__(self, name="redis", persistent=True, timeout=10.0, cpus=None):
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server not found: apt-get install redis-server")
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.port = free_port()
        persistence = (["--appendonly", "yes", "--appendfsync", "always", "--save", ""] if persistent
                       else ["--appendonly", "no", "--save", ""])
        LOGS.mkdir(exist_ok=True)
        self.log_path = LOGS / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                                      "--daemonize", "no", "--protected-mode", "no", *persistence],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.pid = self.proc.pid
        self.persistent = persistent
        deadline = time.monotonic() + timeout
        client = self.client()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}; log {self.log_path}")
                try:
                    if client.ping():
                        break
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer PING")
                time.sleep(0.02)
        finally:
            client.close()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
