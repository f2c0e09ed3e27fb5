"""The HTTP API of CONTRACT.md section 3 as a Flask Blueprint: routes, body parsing, the idempotent write.

Collaborators come from `current_app.extensions`: `wallet.store` (a wallet_store.Store), `wallet.auth`
(an auth.Auth, or None in tests that leave authentication out). Every refusal is a ServiceError and is
answered by one error handler with the contract's envelope. The blueprint also installs the app-wide
request hooks: request ids, one log line per request, JSON answers for routing errors.
"""

import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import time
from typing import Any

from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

import http_server
import logs
from auth import DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS, WWW_AUTHENTICATE
from errors import CODE_OF_STATUS, ServiceError, dumps, envelope
from origins import origin_allowed
from validation import ValidationError, parse_json, validate_amount, validate_game, validate_limit, validate_user_id
from wallet_store import Idempotency, Result, Store

log = logging.getLogger("wallet.http")

MAX_BODY = 64 * 1024
_KEY = re.compile(r"[\x20-\x7e]{1,255}")
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
HERE = os.path.dirname(os.path.abspath(__file__))
OPENAPI_PATH = os.path.join(HERE, "openapi.json")
DASHBOARD_PATH = os.path.join(HERE, "static", "dashboard.html")

bp = Blueprint("wallet", __name__)


class AnyText(PathConverter):
    """Any text, slashes and newlines included, so the validator (not the router) answers a bad user id."""

    regex = r"[^/][\s\S]*?"


@bp.record_once
def _add_converter(state: Any) -> None:
    # Runs when the blueprint is registered, before its rules are added.
    state.app.url_map.converters["anytext"] = AnyText


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(body), status, headers, mimetype="application/json")


def fingerprint(method: str, route: str, body: dict) -> bytes:
    """What makes two requests under one Idempotency-Key "the same": method, route and JSON value.

    The body is canonical JSON (sorted keys, no spaces), so spacing and key order do not matter; the
    route rule, not the raw path, so `/deposit` and `/deposit/` are one endpoint.
    """
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{method}\n{route}\n{canonical}".encode()).digest()


# -- request hooks (every request of the app, not only this blueprint's) ------------------------------


# Made-up request ids: this process's random prefix and a counter (32 hex digits, like a UUID's), unique
# across processes sharing a log without a random draw per request (uuid4 was 3 % of a deposit's time).
_RID_PREFIX = secrets.token_hex(8)
_rid_counter = itertools.count(1)


# The hooks run on every request: each looks the request and `g` up through their proxies once.
@bp.before_app_request
def _start() -> None:
    ctx = g._get_current_object()
    ctx.start = time.perf_counter()
    rid = request.environ.get("HTTP_X_REQUEST_ID", "")  # what request.headers["X-Request-ID"] reads
    # A client id that is not plain printable ASCII is replaced, never logged or echoed.
    if not _REQUEST_ID.fullmatch(rid):
        rid = f"{_RID_PREFIX}{next(_rid_counter):016x}"
    ctx.request_id = rid
    ctx.log_token = logs.request_id.set(rid)


@bp.after_app_request
def _finish(response: Response) -> Response:
    ctx = g._get_current_object()
    req = request._get_current_object()  # type: ignore[attr-defined]
    response.headers["X-Request-ID"] = ctx.get("request_id", "")
    # An upgraded request is a WebSocket connection now: ws.py logs its life, not this HTTP line.
    if not req.environ.get(http_server.UPGRADED):
        now = time.perf_counter()
        elapsed = round((now - ctx.get("start", now)) * 1000, 2)
        method, target = logs.printable(req.method), logs.printable(req.path)
        query = req.environ.get("QUERY_STRING")  # what request.query_string holds, as the server decoded it
        if query:
            target += "?" + logs.printable_query(query)
        principal = ctx.get("principal")
        who = f" {principal.name}" if principal is not None and principal.kind != "anonymous" else ""
        # The request id is added to the line by the log formatter, as on every line of a request.
        logs.access(log, "%s %s %d %.1fms%s", (method, target, response.status_code, elapsed, who),
                    {"method": method, "path": target, "status": response.status_code, "duration_ms": elapsed,
                     "principal": principal.name if principal is not None else None})
    return response


@bp.teardown_app_request
def _forget_request_id(exc: BaseException | None) -> None:
    token = g.pop("log_token", None)
    if token is not None:
        logs.request_id.reset(token)


@bp.app_errorhandler(ServiceError)
def _refused(exc: ServiceError) -> Response:
    headers = {}
    if exc.code == "unauthorized":
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    if getattr(exc, "replayed", False):
        headers["Idempotent-Replayed"] = "true"
    return json_response(exc.body(), exc.http_status, headers)


@bp.app_errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 404:
        message = f"no route for {request.method} {request.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.path}"
    else:
        message = exc.description or "request refused"
    response = json_response(envelope(CODE_OF_STATUS.get(status, "invalid_request"), message), status)
    if status == 405:
        response.headers["Allow"] = ", ".join(exc.valid_methods or [])  # type: ignore[attr-defined]
    return response


@bp.app_errorhandler(Exception)
def _internal(exc: Exception) -> Response:
    log.exception("unhandled error")
    return json_response(envelope("internal_error", "internal server error"), 500)


# -- the pieces every route is made of ---------------------------------------------------------------


def _store() -> Store:
    return current_app.extensions["wallet.store"]


def _authorize(action: str, user_id: str | None = None) -> None:
    """Authenticate the request and check it may do `action`: before any validation or idempotency.

    A write from a browser page of another origin is refused first, with or without a credential.
    """
    req = request._get_current_object()  # type: ignore[attr-defined]
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if req.method not in ("GET", "HEAD") and not origin_allowed(req.environ, app.config["ALLOWED_ORIGINS"]):
        raise ServiceError("cross-origin request refused: its Origin is not this service's nor in --allowed-origins",
                           "forbidden")
    auth = app.extensions.get("wallet.auth")
    if auth is None:
        return
    principal = auth.authenticate_header(req.environ.get("HTTP_AUTHORIZATION"))  # = headers.get("Authorization")
    g.principal = principal
    principal.require(action, user_id)


def _too_large() -> ServiceError:
    return ServiceError(f"request body is larger than {MAX_BODY} bytes", "payload_too_large")


def read_json_object() -> dict:
    """The request body as a JSON object, whatever its Content-Type; ServiceError when it is not one."""
    req = request._get_current_object()  # type: ignore[attr-defined]
    environ = req.environ
    declared = environ.get("CONTENT_LENGTH")  # what req.content_length parses, without its machinery
    if declared and declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY:
        raise _too_large()
    try:
        # One byte past the limit catches chunked bodies too, which declare no length (and which
        # Werkzeug would silently cut at MAX_CONTENT_LENGTH).
        # A server that ends wsgi.input at the body's end (ours does, Content-Length or chunked) gives
        # the same stream request.stream would, without Werkzeug's checks (read_json_object 7.5 -> 3.8 us).
        stream = environ["wsgi.input"] if environ.get("wsgi.input_terminated") else req.stream
        raw = stream.read(MAX_BODY + 1)
    except (OSError, ValueError):
        raise ValidationError("request body is malformed (bad chunked encoding)") from None
    if len(raw) > MAX_BODY:
        raise _too_large()
    try:
        body = parse_json(raw)
    except (ValueError, RecursionError):
        raise ValidationError("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ValidationError("request body must be a JSON object")
    return body


def _field(body: dict, name: str, validate: Any, **kwargs: Any) -> Any:
    if name not in body:
        raise ValidationError(f"{name} is required")
    return validate(body[name], name, **kwargs)


def _idempotency(body: dict) -> Idempotency | None:
    key = request.environ.get("HTTP_IDEMPOTENCY_KEY")  # = headers.get("Idempotency-Key"), without its key mangling
    if key is None:
        return None
    if not _KEY.fullmatch(key):
        raise ValidationError("Idempotency-Key must be 1 to 255 printable ASCII characters")
    route = request.url_rule.rule if request.url_rule else request.path
    return Idempotency(key, fingerprint(request.method, route, body))


def _answer(result: Result) -> Response:
    return json_response(result.body, 200, {"Idempotent-Replayed": "true"} if result.replayed else None)


# -- routes ------------------------------------------------------------------------------------------


@bp.post("/api/wallet/deposit")
def deposit() -> Response:
    _authorize("write")
    body = read_json_object()
    user_id = _field(body, "user_id", validate_user_id)
    amount = _field(body, "amount", validate_amount)
    return _answer(_store().deposit(user_id, amount, idem=_idempotency(body)))


@bp.post("/api/wallet/withdraw")
def withdraw() -> Response:
    _authorize("write")
    body = read_json_object()
    user_id = _field(body, "user_id", validate_user_id)
    amount = _field(body, "amount", validate_amount)
    return _answer(_store().withdraw(user_id, amount, idem=_idempotency(body)))


@bp.post("/api/games/outcomes")
def outcome() -> Response:
    _authorize("write")
    body = read_json_object()
    user_id = _field(body, "user_id", validate_user_id)
    game = _field(body, "game", validate_game)
    bet = _field(body, "bet", validate_amount, minimum=0)
    payout = _field(body, "payout", validate_amount, minimum=0)
    return _answer(_store().settle(user_id, game, bet, payout, idem=_idempotency(body)))


@bp.get("/api/wallet/balance/<anytext:user_id>")
@bp.get("/api/wallet/balance/", defaults={"user_id": ""})
def balance(user_id: str) -> Response:
    _authorize("read_user", user_id)
    user_id = validate_user_id(user_id)
    return json_response({"user_id": user_id, "balance": _store().balance(user_id)})


@bp.get("/api/wallet/transactions/<anytext:user_id>")
@bp.get("/api/wallet/transactions/", defaults={"user_id": ""})
def transactions(user_id: str) -> Response:
    _authorize("read_user", user_id)
    user_id = validate_user_id(user_id)
    limit = validate_limit(request.args.get("limit"))
    return json_response({"user_id": user_id, "transactions": _store().transactions(user_id, limit)})


@bp.get("/api/leaderboard")
def leaderboard() -> Response:
    _authorize("read_leaderboard")
    return json_response({"leaderboard": _store().leaderboard()})


@bp.post("/api/auth/player-tokens")
def player_token() -> Response:
    _authorize("mint_token")
    body = read_json_object()
    user_id = _field(body, "user_id", validate_user_id)
    ttl = body.get("ttl_seconds", DEFAULT_TTL_SECONDS)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_TTL_SECONDS:
        raise ValidationError(f"ttl_seconds must be an integer from 1 to {MAX_TTL_SECONDS}")
    auth = current_app.extensions.get("wallet.auth")
    if auth is None:
        raise ServiceError("player tokens are not enabled on this server", "not_found")
    return json_response(auth.mint(user_id, ttl))


@bp.get("/healthz")
def healthz() -> Response:
    try:
        healthy = _store().healthy()
    except ServiceError:
        healthy = False
    return json_response({"status": "ok"} if healthy else {"status": "unavailable"}, 200 if healthy else 503)


@bp.get("/")
def dashboard() -> Response:
    # The one non-JSON response: a self-contained page built on the public HTTP and WebSocket API.
    with open(DASHBOARD_PATH, "rb") as f:
        return Response(f.read(), 200, mimetype="text/html")


@bp.get("/openapi.json")
def openapi() -> Response:
    with open(OPENAPI_PATH, "rb") as f:
        return Response(f.read(), 200, mimetype="application/json")
