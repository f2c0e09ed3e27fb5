"""Shared helpers for the benchmarks: processes, ports, limits, statistics, /proc readings."""

import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOGS = BENCH / "logs"

# The soft limit the benchmark was started with, before raise_nofile(): servers are started with it, so the
# run shows how the service behaves with the limit a user would have (see the EMFILE note in BENCHMARKS.md).
ORIGINAL_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_nofile():
    """Raise this process's open-file soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_cpus():
    """(server CPUs, load-generator CPUs) for measurements that pin each side, or (None, None) on one CPU.

    On this 2-core VM the scheduler moving the load generator onto the server's core and back made
    gRPC figures swing by 20 % between quarter-second slices; pinned, runs agree within 2 %.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


def median(values):
    return statistics.median(values) if values else None


def percentile(values, q):
    """Nearest-rank percentile of a list (q in 0..100); None for an empty list."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def proc_status(pid):
    """VmRSS (KiB) and Threads of a process, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    return out


def rss_kib(pid=None):
    return proc_status(pid or os.getpid())["VmRSS"]


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) // 1024
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "memory_mib": mem,
        "nofile_soft_at_start": ORIGINAL_NOFILE[0],
        "nofile_hard": ORIGINAL_NOFILE[1],
    }


def _restore_nofile():
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, ORIGINAL_NOFILE)
    except (ValueError, OSError):
        pass


def wait_port(host, port, proc, log_path, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log: {log_path}\n{tail(log_path)}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {host}:{port} within {timeout}s; log: {log_path}")


def tail(path, lines=30):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ServerProcess:
    """A server subprocess with its output in a log file, stopped with SIGTERM."""

    def __init__(self, name, argv, ports, host="127.0.0.1", env=None, cpus=None):
        LOGS.mkdir(exist_ok=True)
        self.name = name
        self.host = host
        self.log_path = LOGS / f"{name}.log"
        self._log = open(self.log_path, "wb")
        # A value of None removes the variable (the service must not pick up the caller's API_KEYS by chance).
        env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}.items() if v is not None}
        def prepare():
            _restore_nofile()
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, preexec_fn=prepare)
        self.pid = self.proc.pid
        for port in ports:
            wait_port(host, port, self.proc, self.log_path)

    def status(self):
        return proc_status(self.pid)

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=10.0):
        """SIGTERM and wait; returns (exit code, seconds it took)."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode, time.monotonic() - start

    def log_text(self):
        return self.log_path.read_text(errors="replace")


def app_server(name="app", *args, env=None, cpus=None):
    """`python app.py` on free ports; extra flags in `args` (e.g. --redis-url URL), extra environment in `env`,
    `cpus` the CPUs it may run on (all when None)."""
    http_port, grpc_port = free_port(), free_port()
    srv = ServerProcess(name, ["app.py", "--host", "127.0.0.1", "--http-port", str(http_port),
                               "--grpc-port", str(grpc_port), *args], [http_port, grpc_port],
                        env={"API_KEYS": None, "PLAYER_TOKEN_SECRET": None, "REDIS_URL": None, **(env or {})},
                        cpus=cpus)
    srv.http_port, srv.grpc_port = http_port, grpc_port
    return srv


def cpu_snapshot():
    """(seconds the whole machine was busy, seconds of CPU used by this process and its reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields[i] for i in (0, 1, 2, 5, 6, 7) if i < len(fields)) / tick
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def background_cpu(before, after, seconds):
    """CPU used by processes other than the benchmark's own between two snapshots, as cores (0..nproc)."""
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, other) / seconds if seconds > 0 else 0.0


def code_state():
    """The commit measured and the files that differed from it (read-only git; None outside a checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        status = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                                cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head or None, "modified": sorted(line[3:] for line in status.splitlines() if line.strip())}


# -- shared by the rows of run.py and rows_more.py ------------------------------------------------------

BENCH_KEY = "bench-operator-key-0123456789abcdefghijklmnop"  # 40 characters: a valid API_KEYS entry


def log(*args):
    print(*args, flush=True)


def median_of(runs, key):
    return median([r[key] for r in runs])


def rounded(r):
    """A run's figures for results.json: floats to 2 places."""
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}


def deposit_requests(n, prefix="bench"):
    """One 1-cent deposit request per connection, each to its own user."""
    from client import HOST
    from httpload import build_request

    return [build_request("POST", "/api/wallet/deposit", HOST, {"user_id": f"{prefix}{i}", "amount": 1})
            for i in range(n)]


def yes_no(flag):
    """The table's "met" column."""
    return "yes" if flag else "**no**"


def ms(value):
    return "–" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"
