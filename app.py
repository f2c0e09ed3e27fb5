"""Wallet service: HTTP JSON API and WebSocket events (Flask) plus gRPC, in one process."""

import argparse
import hashlib
import json
import logging
import os
import re
import resource
import signal
import sys
import threading
import time
import uuid

from flask import Flask, Response, g, request
from flask_sock import Sock
from simple_websocket.errors import ConnectionError as WebSocketHandshakeError
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter
from wsproto.utilities import RemoteProtocolError

import grpc_server
import http_server
import logs
import ws
from events import EventHub
from validation import ValidationError, parse_json, validate_amount, validate_game, validate_limit, validate_user_id
from wallet_store import Idempotency, MemoryStore, WalletError

log = logging.getLogger("wallet.http")

MAX_BODY = 64 * 1024
_KEY = re.compile(r"[\x20-\x7e]{1,255}")
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_ERROR_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
HERE = os.path.dirname(os.path.abspath(__file__))
OPENAPI_PATH = os.path.join(HERE, "openapi.json")
DASHBOARD_PATH = os.path.join(HERE, "static", "dashboard.html")


class _AnyText(PathConverter):
    """Matches any text, newlines and slashes included, so the validator (not the router) answers bad ids."""

    regex = r"[^/][\s\S]*?"


class ApiError(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code = status, code


def _printable(text):
    # Paths are client-chosen: escape control characters so one request stays one log line.
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def fingerprint(method: str, route: str, canonical_body: str) -> bytes:
    """Identify a request for idempotency; the body is canonical JSON text (sorted keys, no spaces)."""
    return hashlib.sha256(f"{method}\n{route}\n{canonical_body}".encode()).digest()


def json_response(body, status=200, headers=None):
    return Response(json.dumps(body, separators=(",", ":")), status, headers, mimetype="application/json")


def read_json_object():
    """The request body as a JSON object, whatever the Content-Type; ApiError when it is not one."""
    if (request.content_length or 0) > MAX_BODY:
        raise ApiError(413, "payload_too_large", f"request body is larger than {MAX_BODY} bytes")
    # Reading one byte past the limit catches chunked bodies too, which carry no length.
    try:
        raw = request.stream.read(MAX_BODY + 1)
    except (OSError, ValueError):  # a malformed or cut-off chunked body
        request.environ["wallet.close_connection"] = True
        raise ApiError(400, "invalid_request", "request body is malformed (bad chunked encoding)") from None
    if len(raw) > MAX_BODY:
        raise ApiError(413, "payload_too_large", f"request body is larger than {MAX_BODY} bytes")
    try:
        body = parse_json(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_request", "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "request body must be a JSON object")
    return body


def field(body, name, validate, **kwargs):
    if name not in body:
        raise ValidationError(f"{name} is required")
    return validate(body[name], name, **kwargs)


def idempotency_key():
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _KEY.fullmatch(key):
        raise ValidationError("Idempotency-Key must be 1 to 255 printable ASCII characters")
    return key


def create_app(store, hub):
    """Build the Flask app around its collaborators: the wallet store and the event hub."""
    app = Flask(__name__, static_folder=None)
    # Every answer is the contract's JSON: no automatic OPTIONS replies, no HTML slash redirects.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False
    app.url_map.converters["segment"] = _AnyText
    sock = Sock(app)
    ws.register(app, sock, hub)

    @app.before_request
    def start():
        g.start = time.perf_counter()
        rid = request.headers.get("X-Request-ID", "")
        g.request_id = rid if _REQUEST_ID.fullmatch(rid) else uuid.uuid4().hex
        g.token = logs.request_id.set(g.request_id)

    @app.after_request
    def finish(response):
        response.headers["X-Request-ID"] = g.get("request_id", "")
        if not request.environ.get("wallet.websocket"):
            elapsed = round((time.perf_counter() - g.get("start", time.perf_counter())) * 1000, 2)
            path = _printable(request.path)
            # The request id is added to the line by the log formatter, as on every line of a request.
            log.info("%s %s %d %.1fms", request.method, path, response.status_code, elapsed,
                     extra={"method": request.method, "path": path, "status": response.status_code,
                            "duration_ms": elapsed})
        return response

    @app.teardown_request
    def forget_request_id(exc):
        token = g.pop("token", None)
        if token is not None:
            logs.request_id.reset(token)

    @app.errorhandler(ApiError)
    def api_error(exc):
        return json_response({"error": exc.code, "message": str(exc)}, exc.status)

    @app.errorhandler(ValidationError)
    def invalid(exc):
        return json_response({"error": "invalid_request", "message": str(exc)}, 400)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        code = _ERROR_CODES.get(exc.code, "invalid_request")
        if exc.code == 404:
            message = f"no route for {request.method} {request.path}"
        elif exc.code == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        elif request.path == "/ws" and exc.code == 400:
            message = "this endpoint only accepts WebSocket upgrades"
        else:
            message = exc.description
        response = json_response({"error": code, "message": message}, exc.code)
        if exc.code == 405:
            response.headers["Allow"] = ", ".join(exc.valid_methods or [])
        return response

    @app.errorhandler(RemoteProtocolError)
    @app.errorhandler(WebSocketHandshakeError)
    def bad_handshake(exc):
        return json_response({"error": "invalid_request", "message": "invalid WebSocket handshake"}, 400)

    @app.errorhandler(Exception)
    def internal(exc):
        log.exception("unhandled error")
        return json_response({"error": "internal_error", "message": "internal server error"}, 500)

    def write(body, operation, *args):
        """Run a money-moving operation with the Idempotency-Key rules of the contract."""
        key = idempotency_key()
        idem = None
        if key is not None:
            canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
            # The route, not the raw path: /deposit and /deposit/ are one endpoint.
            route = request.url_rule.rule if request.url_rule else request.path
            idem = Idempotency(key, fingerprint(request.method, route, canonical))
        try:
            result = operation(*args, idem)
        except WalletError as exc:
            return json_response(exc.body(), exc.http_status,
                                 {"Idempotent-Replayed": "true"} if exc.replayed else None)
        return json_response(result.body, 200, {"Idempotent-Replayed": "true"} if result.replayed else None)

    @app.post("/api/wallet/deposit")
    def deposit():
        body = read_json_object()
        user_id = field(body, "user_id", validate_user_id)
        amount = field(body, "amount", validate_amount)
        return write(body, store.deposit, user_id, amount)

    @app.post("/api/wallet/withdraw")
    def withdraw():
        body = read_json_object()
        user_id = field(body, "user_id", validate_user_id)
        amount = field(body, "amount", validate_amount)
        return write(body, store.withdraw, user_id, amount)

    @app.post("/api/games/outcomes")
    def outcome():
        body = read_json_object()
        user_id = field(body, "user_id", validate_user_id)
        game = field(body, "game", validate_game)
        bet = field(body, "bet", validate_amount, minimum=0)
        payout = field(body, "payout", validate_amount, minimum=0)
        return write(body, store.settle, user_id, game, bet, payout)

    @app.get("/api/wallet/balance/<segment:user_id>")
    @app.get("/api/wallet/balance/", defaults={"user_id": ""})
    def balance(user_id):
        user_id = validate_user_id(user_id, allow_int=False)
        return json_response({"user_id": user_id, "balance": store.balance(user_id)})

    @app.get("/api/wallet/transactions/<segment:user_id>")
    @app.get("/api/wallet/transactions/", defaults={"user_id": ""})
    def transactions(user_id):
        user_id = validate_user_id(user_id, allow_int=False)
        limit = validate_limit(request.args.get("limit"))
        return json_response({"user_id": user_id, "transactions": store.transactions(user_id, limit)})

    @app.get("/api/leaderboard")
    def leaderboard():
        return json_response({"leaderboard": store.leaderboard()})

    @app.get("/healthz")
    def healthz():
        return json_response({"status": "ok"})

    @app.get("/")
    def dashboard():
        # The one non-JSON response: a self-contained page built on the public HTTP and WebSocket API.
        with open(DASHBOARD_PATH, "rb") as f:
            return Response(f.read(), 200, mimetype="text/html")

    @app.get("/openapi.json")
    def openapi():
        with open(OPENAPI_PATH, "rb") as f:
            return Response(f.read(), 200, mimetype="application/json")

    return app


# -- command line --------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"app.py: error: {message} (see --help)\n")


def _port(text):
    if not re.fullmatch(r"[0-9]{1,5}", text.strip()) or int(text) > 65535:
        raise ValueError(f"invalid port {text!r}: expected an integer from 0 to 65535")
    return int(text)


def _level(text):
    if text.upper() not in logs.LEVELS:
        raise ValueError(f"invalid log level {text!r}: expected one of {', '.join(logs.LEVELS)}")
    return text.upper()


def _format(text):
    if text.lower() not in logs.FORMATS:
        raise ValueError(f"invalid log format {text!r}: expected one of {', '.join(logs.FORMATS)}")
    return text.lower()


def _host(text):
    if not text.strip():
        raise ValueError("invalid host '': expected an address such as 0.0.0.0 or 127.0.0.1")
    return text.strip()


SETTINGS = [  # flag, environment variable, default, parser, help
    ("--host", "HOST", "0.0.0.0", _host, "address to listen on for HTTP and gRPC"),
    ("--http-port", "HTTP_PORT", "8080", _port, "HTTP and WebSocket port"),
    ("--grpc-port", "GRPC_PORT", "9090", _port, "gRPC port"),
    ("--log-level", "LOG_LEVEL", "INFO", _level, "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    ("--log-format", "LOG_FORMAT", "text", _format, "text or json (one JSON object per line)"),
]


def parse_settings(argv, environ):
    """Flags beat environment variables, which beat defaults; a bad value exits 2 naming its source."""
    parser = _Parser(prog="app.py", description="Wallet service: HTTP + WebSocket and gRPC in one process.")
    for flag, env, default, _, text in SETTINGS:
        parser.add_argument(flag, metavar=env, help=f"{text} (env {env}, default {default})")
    args = parser.parse_args(argv)
    settings = {}
    for flag, env, default, convert, _ in SETTINGS:
        name = flag[2:].replace("-", "_")
        raw, source = getattr(args, name), flag
        if raw is None:
            raw, source = environ.get(env), f"environment variable {env}"
        if raw is None:
            raw, source = default, "default"
        try:
            settings[name] = convert(raw)
        except ValueError as exc:
            parser.exit(2, f"app.py: error: {source}: {exc}\n")
    return argparse.Namespace(**settings)


def _raise_open_file_limit():
    # Each WebSocket holds two descriptors (its socket and the library's selector); a soft limit of
    # 1024 would stop the service at about 500 connections.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    log.info("open-file limit %s (about %s WebSockets)", soft, soft // 2 if soft != resource.RLIM_INFINITY else "any")


def main(argv=None, environ=None):


    settings = parse_settings(sys.argv[1:] if argv is None else argv, os.environ if environ is None else environ)
    logs.setup(settings.log_level, settings.log_format)
    _raise_open_file_limit()
    threading.stack_size(512 * 1024)  # two threads per WebSocket: keep their reserved stacks small

    try:
        http_sock = http_server.bind(settings.host, settings.http_port)
        if settings.grpc_port:
            # Probe first: gRPC itself would print its own internal error line before failing.
            http_server.bind(settings.host, settings.grpc_port, "gRPC").close()
    except OSError as exc:
        sys.stderr.write(f"app.py: error: {exc}\n")
        return 1
    hub = EventHub().start()
    store = MemoryStore(hub)
    try:
        grpc_service = grpc_server.serve(store, settings.host, settings.grpc_port)
    except OSError as exc:
        http_sock.close()
        sys.stderr.write(f"app.py: error: {exc}\n")
        return 1
    server = http_server.Server(http_sock, create_app(store, hub))

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="http-accept",
                               daemon=True)
    serving.start()
    host, port = server.server_address[:2]
    log.info("HTTP and WebSocket listening on http://%s:%d (ws://%s:%d/ws)", host, port, host, port)
    logging.getLogger("wallet.grpc").info("gRPC listening on %s:%d", settings.host, grpc_service.port)

    while not stop.wait(1.0):
        pass
    shutdown(server, grpc_service, hub)
    return 0


def shutdown(server, grpc_service, hub, budget=4.0):
    """Stop taking work, close WebSockets with 1001, let requests in flight finish, stop gRPC.

    Every step is bounded so the process exits within 5 s even with thousands of connections; the
    caller then ends the process, which closes whatever sockets remain.
    """
    deadline = time.monotonic() + budget
    log.info("shutting down")
    grpc_stopped = threading.Thread(target=grpc_service.stop, kwargs={"grace": 1.0}, daemon=True)
    grpc_stopped.start()  # flips health to NOT_SERVING first, then drains gRPC calls
    server.draining = True
    server.shutdown()  # stop accepting; the listening socket closes below
    server.server_close()
    closed = hub.close_all(1001)
    drained = server.drain(timeout=max(0.1, deadline - time.monotonic() - 1.0))
    # Give clients a moment to read their close frames and answer them.
    settle = time.monotonic() + min(0.5, max(0.0, deadline - time.monotonic() - 0.5))
    while hub.connection_count() and time.monotonic() < settle:
        time.sleep(0.05)
    grpc_stopped.join(timeout=max(0.1, deadline - time.monotonic()))
    log.info("stopped: %d WebSockets sent 1001, requests drained=%s, %d WebSockets still closing",
             closed, drained, hub.connection_count())
    logs.stop()
    logging.shutdown()


if __name__ == "__main__":
    code = main()
    logs.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    # Library reader threads are not daemons: end the process without waiting for them. Every request
    # in flight has been answered and every WebSocket told 1001; the kernel closes the rest.
    os._exit(code)
