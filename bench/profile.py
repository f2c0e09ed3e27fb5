"""Profile the running service under one benchmark load with py-spy; print the top functions by own and total time.

py-spy is not a dependency of the service: install it anywhere (`pip install py-spy`) and pass its path.

    .venv/bin/python bench/profile.py deposit --py-spy /tmp/spy/bin/py-spy          # HTTP deposits, in memory
    .venv/bin/python bench/profile.py deposit --redis --py-spy ...                   # the same on a private Redis
    .venv/bin/python bench/profile.py healthz --py-spy ...
    .venv/bin/python bench/profile.py grpc [--auth] --py-spy ...                     # GetBalance, 16 concurrent

Samples are taken only while a thread holds the GIL (`--gil`), unless --all-threads: on this threaded server
that is where CPU time goes; waiting threads would otherwise dominate.
"""

import argparse
import collections
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from client import HOST  # noqa: E402
from common import BENCH_KEY, app_server, deposit_requests  # noqa: E402


def summarize(path, top):
    """(total samples, [(share, own frame)], [(share, function)]) from py-spy's raw (collapsed stack) output."""
    own, total_by_fn, total = collections.Counter(), collections.Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            # One count per function per stack (recursion aside), without line numbers.
            for name in {fr.rsplit(":", 1)[0] + ")" if fr.endswith(")") else fr for fr in frames}:
                total_by_fn[name] += n
    share = lambda c: [(v / total if total else 0.0, k) for k, v in c.most_common(top)]  # noqa: E731
    return total, share(own), share(total_by_fn)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("load", choices=("deposit", "healthz", "grpc"))
    parser.add_argument("--redis", action="store_true", help="run the service on a private redis-server")
    parser.add_argument("--no-persistence", action="store_true",
                        help="Redis without the append-only file (default: appendfsync always, as docker-compose.yml)")
    parser.add_argument("--auth", action="store_true", help="API_KEYS set (the gRPC client sends the key)")
    parser.add_argument("--py-spy", default="py-spy", help="path of the py-spy binary")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--all-threads", action="store_true", help="sample every thread, not only the GIL holder")
    args = parser.parse_args(argv)

    from httpload import build_request, run_load

    redis_proc, extra, env = None, [], {}
    if args.redis:
        from redisproc import RedisProcess

        redis_proc = RedisProcess("profile-redis", persistent=not args.no_persistence)
        extra = ["--redis-url", redis_proc.url]
    if args.auth:
        env["API_KEYS"] = BENCH_KEY
    app = app_server("profile-app", *extra, env=env)
    out = tempfile.NamedTemporaryFile(suffix=".txt", delete=False).name
    try:
        cmd = [args.py_spy, "record", "-p", str(app.pid), "-d", str(int(args.seconds)), "-r", "250", "-f", "raw",
               "-o", out, "--nonblocking"] + ([] if args.all_threads else ["--gil"])
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if args.load == "grpc":
            from grpcload import run_load as grpc_load

            result = grpc_load(f"{HOST}:{app.grpc_port}", "bench1", duration=args.seconds + 1,
                               token=BENCH_KEY if args.auth else None)
        else:
            reqs = (deposit_requests(16, "prof") if args.load == "deposit"
                    else [build_request("GET", "/healthz", HOST)] * 16)
            result = run_load(HOST, app.http_port, reqs, duration=args.seconds + 1)
        spy.wait(timeout=60)
        if spy.returncode:
            sys.exit(f"py-spy failed: {spy.stderr.read().decode(errors='replace')[-500:]}")
        total, own, inclusive = summarize(out, args.top)
        print(f"{args.load}{' on Redis' if args.redis else ''}{' with auth' if args.auth else ''}:"
              f" {result['rps']:,.0f}/s during the profile; {total} samples"
              f" ({total / (250 * args.seconds):.0%} of the time a thread held the GIL)")
        print("own time:")
        for s, name in own:
            print(f"  {s:6.1%}  {name[:140]}")
        print("total time (function and what it calls):")
        for s, name in inclusive:
            print(f"  {s:6.1%}  {name[:140]}")
    finally:
        app.stop()
        if redis_proc is not None:
            redis_proc.stop()
        os.unlink(out)


if __name__ == "__main__":
    main()
