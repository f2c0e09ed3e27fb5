"""Wallet service: HTTP JSON API and WebSocket events (Flask) plus gRPC, in one process.

`create_app` assembles the Flask app (configure, register, return); `main` runs the process.
"""

import contextlib
import logging
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

from flask import Flask

import grpc_server
import http_server
import logs
import routes
import settings
import ws
from auth import Auth, AuthConfigError
from events import EventHub, MemoryEventLog
from origins import normalize_origin
from redis_store import RedisEventReader, RedisStartupError, open_redis
from wallet_store import MemoryStore, Store

log = logging.getLogger("wallet.http")
# The start-up lines the contract requires (bound listeners, the WARNING that authentication is off)
# are how operators and scripts learn the ports and the risk: printed whatever --log-level says.
startup = logging.getLogger("wallet.startup")
startup.setLevel(logging.INFO)


def create_app(store: Store, hub: EventHub, auth: Auth | None = None, allowed_origins: Iterable[str] = ()) -> Flask:
    """The Flask app: the HTTP routes and the /ws endpoint over one store, one event hub and one auth."""
    app = Flask(__name__, static_folder=None)
    # Every answer is the contract's JSON: no automatic OPTIONS replies, no HTML slash redirects.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.config["ALLOWED_ORIGINS"] = frozenset(normalize_origin(o) for o in allowed_origins)
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False
    app.extensions.update({"wallet.store": store, "wallet.hub": hub, "wallet.auth": auth})
    app.register_blueprint(routes.bp)
    ws.register(app)  # GET /ws; its connection registry is app.extensions["wallet.ws"]
    return app


def open_store(cfg: settings.Settings, hub: EventHub) -> tuple[Store, RedisEventReader | None]:
    """The in-process store, or with --redis-url the Redis store and its event reader (RedisStartupError)."""
    if cfg.redis_url is None:
        return MemoryStore(MemoryEventLog(hub)), None
    return open_redis(cfg.redis_url, cfg.redis_prefix, hub)


def _exit(code: int, message: str) -> int:
    sys.stderr.write(f"{settings.PROG}: error: {message}\n")
    return code


def _raise_open_file_limit() -> None:
    # Every connection holds a descriptor (a WebSocket two); a soft limit of 1024 would stop us early.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    log.info("open-file limit %s", soft)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    cfg = settings.parse_settings(sys.argv[1:] if argv is None else argv, environ)
    try:
        auth = Auth.from_env(environ)
    except AuthConfigError as exc:
        return _exit(2, str(exc))
    logs.setup(cfg.log_level, cfg.log_format)
    # Everything that can fail comes first, so a failed start prints its one error line and nothing else.
    try:
        http_sock = http_server.bind(cfg.host, cfg.http_port)
        if cfg.grpc_port:
            # Probe first: gRPC itself would print its own internal error line before failing.
            http_server.bind(cfg.host, cfg.grpc_port, "gRPC").close()
    except OSError as exc:
        return _exit(1, str(exc))
    hub = EventHub().start()
    try:
        store, reader = open_store(cfg, hub)
        grpc_service = grpc_server.serve(store, cfg.host, cfg.grpc_port, auth=auth)
    except (RedisStartupError, OSError) as exc:
        http_sock.close()
        return _exit(1, str(exc).splitlines()[0])
    auth.log_startup(startup)  # a WARNING when authentication is off
    log.info("state: %s", "in this process" if reader is None else
             f"Redis at {settings.redact_url(cfg.redis_url or '')}, key prefix {cfg.redis_prefix}")
    _raise_open_file_limit()
    threading.stack_size(512 * 1024)  # two threads per WebSocket: keep their reserved stacks small
    app = create_app(store, hub, auth, cfg.allowed_origins)
    server = http_server.Server(http_sock, app, max_connections=cfg.max_connections)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="http-accept",
                     daemon=True).start()
    http_at = settings.address(*server.server_address[:2])
    startup.info("HTTP and WebSocket listening on http://%s (ws://%s/ws), at most %d connections",
                 http_at, http_at, cfg.max_connections)
    startup.info("gRPC listening on %s", settings.address(cfg.host, grpc_service.port))
    while not stop.wait(1.0):
        pass
    shutdown(server, grpc_service, app.extensions["wallet.ws"], reader, store)
    return 0


def shutdown(server, grpc_service, connections, reader, store, budget: float = 4.0) -> None:
    """Close WebSockets with 1001, stop taking work, let requests in flight finish, stop gRPC and the
    store: every step bounded, so the process exits within 5 s whatever its clients do."""
    deadline = time.monotonic() + budget
    log.info("shutting down")
    # WebSockets first: close_all also stops their input, which quiets ping floods that would otherwise
    # starve the steps below of the GIL for seconds (one accepted meanwhile is closed as it registers).
    closed = connections.close_all(1001)
    grpc_stopped = threading.Thread(target=grpc_service.stop, kwargs={"grace": 1.0}, daemon=True)
    grpc_stopped.start()  # flips health to NOT_SERVING first, then drains gRPC calls
    server.draining = True
    server.shutdown()  # stop accepting; the listening socket closes below
    server.server_close()
    drained = server.drain(timeout=max(0.1, deadline - time.monotonic() - 1.0))
    # Give clients a moment to read their close frames and answer them.
    settle = time.monotonic() + min(0.5, max(0.0, deadline - time.monotonic() - 0.5))
    while connections.count() and time.monotonic() < settle:
        time.sleep(0.05)
    grpc_stopped.join(timeout=max(0.1, deadline - time.monotonic()))
    if reader is not None:
        reader.stop(timeout=max(0.1, deadline - time.monotonic()))
    store.close()
    log.info("stopped: %d WebSockets sent 1001, requests drained=%s, %d WebSockets still closing",
             closed, drained, connections.count())


if __name__ == "__main__":
    code = main()
    logs.stop()  # writes out every queued log line
    sys.stderr.flush()
    # Library reader threads are not daemons: end the process without waiting for them. Every request
    # in flight has been answered and every WebSocket told 1001; the kernel closes the rest.
    os._exit(code)
