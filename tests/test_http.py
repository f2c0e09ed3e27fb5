"""End-to-end tests of the HTTP API (CONTRACT.md sections 2, 3 and 6) against the real `python app.py`.

Everything goes through real sockets: `requests` for ordinary calls, a raw `socket` where the HTTP
framing itself is under test. Every test uses its own user ids, so the tests are independent of each
other and of their order. Tests whose assertions depend on global state (the leaderboard) run against
a server of their own.
"""

import json
import re
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import requests

from conftest import Server, wait_for

TIMEOUT = 10  # seconds; a hung server fails the test instead of hanging it
MAX_BODY = 64 * 1024
INT64_MAX = 2**63 - 1
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)")

DEPOSIT = "/api/wallet/deposit"
WITHDRAW = "/api/wallet/withdraw"
OUTCOMES = "/api/games/outcomes"
POST_ROUTES = [DEPOSIT, WITHDRAW, OUTCOMES]
MISSING = object()  # marks a field left out of the request body


# -- helpers -------------------------------------------------------------------------------------------


def new_id(prefix="u"):
    return prefix + uuid.uuid4().hex[:16]


def post(base, path, body=None, *, raw=None, headers=None, session=None):
    """POST a JSON body (or raw bytes/str) and return the response."""
    sender = session or requests
    if raw is None:
        return sender.post(base + path, json=body, headers=headers, timeout=TIMEOUT)
    return sender.post(base + path, data=raw, headers=headers, timeout=TIMEOUT)


def get(base, path, **kwargs):
    return requests.get(base + path, timeout=TIMEOUT, **kwargs)


def ok_json(response, status=200):
    """Assert status and JSON content type, return the decoded body."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers.get("Content-Type", "").split(";")[0].strip() == "application/json", response.headers
    return response.json()


def error_json(response, status, code):
    body = ok_json(response, status)
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"].strip(), body
    return body


def balance_of(base, user):
    return ok_json(get(base, f"/api/wallet/balance/{user}"))["balance"]


def transactions_of(base, user, limit=1000):
    return ok_json(get(base, f"/api/wallet/transactions/{user}?limit={limit}"))["transactions"]


def leaderboard(base):
    return ok_json(get(base, "/api/leaderboard"))["leaderboard"]


def state(base, user):
    """Everything a refused request must leave as it was: the balance and the whole ledger."""
    return balance_of(base, user), transactions_of(base, user)


def deposit(base, user, amount, session=None):
    return ok_json(post(base, DEPOSIT, {"user_id": user, "amount": amount}, session=session))


def outcome(base, user, bet, payout, game="slots"):
    return ok_json(post(base, OUTCOMES, {"user_id": user, "game": game, "bet": bet, "payout": payout}))


def json_object(**fields):
    """A JSON object from raw JSON value texts (so literals like 1e2 or 1.0 reach the server verbatim)."""
    return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items() if v is not MISSING) + "}"


def read_response(reader):
    """Read one HTTP/1.1 response from a socket file: (status, headers dict (lower-case), body bytes)."""
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1."), status_line
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = reader.readline()
        assert line, "connection closed inside the response head"
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", 0)))
    return status, headers, body


def raw_connection(srv):
    sock = socket.create_connection(("127.0.0.1", srv.http_port), timeout=TIMEOUT)
    return sock, sock.makefile("rb")


def raw_request(srv, data):
    sock, reader = raw_connection(srv)
    with sock, reader:
        sock.sendall(data)
        return read_response(reader)


# -- a server that never sees an accepted game outcome ------------------------------------------------


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    """A server of this module's own that only ever gets refused or invalid game outcomes.

    Its leaderboard must therefore stay empty: any invalid outcome that slipped through would show.
    """
    srv = Server(tmp_path_factory.mktemp("quiet"))
    yield srv
    srv.stop()


def assert_unchanged(base, user, before, board_before=None):
    assert state(base, user) == before
    if board_before is not None:
        board = leaderboard(base)
        assert board == board_before
        assert user not in [row["user_id"] for row in board]


# -- success bodies ----------------------------------------------------------------------------------


def test_deposit_success_body(server, uid):
    body = ok_json(post(server.url, DEPOSIT, {"user_id": uid, "amount": 5000}))
    assert set(body) == {"user_id", "balance", "transaction_id"}
    assert body["user_id"] == uid
    assert type(body["balance"]) is int and body["balance"] == 5000
    assert isinstance(body["transaction_id"], str) and body["transaction_id"]
    again = deposit(server.url, uid, 7)
    assert again["balance"] == 5007
    assert again["transaction_id"] != body["transaction_id"]


def test_withdraw_success_body(server, uid):
    deposit(server.url, uid, 5000)
    body = ok_json(post(server.url, WITHDRAW, {"user_id": uid, "amount": 1250}))
    assert set(body) == {"user_id", "balance", "transaction_id"}
    assert body["user_id"] == uid
    assert type(body["balance"]) is int and body["balance"] == 3750
    assert isinstance(body["transaction_id"], str) and body["transaction_id"]
    # Withdrawing everything is allowed and leaves exactly 0.
    assert ok_json(post(server.url, WITHDRAW, {"user_id": uid, "amount": 3750}))["balance"] == 0
    assert balance_of(server.url, uid) == 0


def test_balance_success_body_and_unknown_user_has_zero(server, uid):
    assert ok_json(get(server.url, f"/api/wallet/balance/{uid}")) == {"user_id": uid, "balance": 0}
    deposit(server.url, uid, 123)
    assert ok_json(get(server.url, f"/api/wallet/balance/{uid}")) == {"user_id": uid, "balance": 123}


def test_transactions_success_body(server, uid):
    assert ok_json(get(server.url, f"/api/wallet/transactions/{uid}")) == {"user_id": uid, "transactions": []}
    d = deposit(server.url, uid, 5000)
    w = ok_json(post(server.url, WITHDRAW, {"user_id": uid, "amount": 1250}))
    body = ok_json(get(server.url, f"/api/wallet/transactions/{uid}"))
    assert set(body) == {"user_id", "transactions"}
    assert body["user_id"] == uid
    txs = body["transactions"]
    assert [(t["transaction_id"], t["type"], t["amount"], t["balance"]) for t in txs] == [
        (w["transaction_id"], "withdraw", 1250, 3750),
        (d["transaction_id"], "deposit", 5000, 5000),
    ]
    for tx in txs:
        assert set(tx) == {"transaction_id", "type", "amount", "balance", "created_at"}
        assert type(tx["amount"]) is int and tx["amount"] > 0
        assert type(tx["balance"]) is int
        assert RFC3339_UTC.fullmatch(tx["created_at"]), tx["created_at"]
        created = datetime.fromisoformat(tx["created_at"])
        assert created.utcoffset() == timedelta(0)
        assert abs(datetime.now(UTC) - created) < timedelta(minutes=5)
    assert datetime.fromisoformat(txs[0]["created_at"]) >= datetime.fromisoformat(txs[1]["created_at"])


def test_outcome_success_body(server, uid):
    deposit(server.url, uid, 1000)
    body = ok_json(post(server.url, OUTCOMES, {"user_id": uid, "game": "slots", "bet": 500, "payout": 2000}))
    assert set(body) == {"outcome_id", "user_id", "game", "bet", "payout", "net", "balance"}
    assert isinstance(body["outcome_id"], str) and body["outcome_id"]
    assert {k: v for k, v in body.items() if k != "outcome_id"} == {
        "user_id": uid, "game": "slots", "bet": 500, "payout": 2000, "net": 1500, "balance": 2500,
    }
    for key in ("bet", "payout", "net", "balance"):
        assert type(body[key]) is int


def test_leaderboard_success_body(server, uid):
    deposit(server.url, uid, 100)
    outcome(server.url, uid, 0, 0)
    body = ok_json(get(server.url, "/api/leaderboard"))
    assert set(body) == {"leaderboard"}
    rows = body["leaderboard"]
    assert 1 <= len(rows) <= 10
    assert [row["rank"] for row in rows] == list(range(1, len(rows) + 1))
    for row in rows:
        assert set(row) == {"rank", "user_id", "net_winnings"}
        assert type(row["rank"]) is int and type(row["net_winnings"]) is int
        assert isinstance(row["user_id"], str)


def test_healthz_body(server):
    assert ok_json(get(server.url, "/healthz")) == {"status": "ok"}


def test_openapi_document_describes_the_http_api(server):
    doc = ok_json(get(server.url, "/openapi.json"))
    assert str(doc.get("openapi", "")).startswith("3.1")
    paths = doc.get("paths", {})
    joined = " ".join(paths)
    for route in (DEPOSIT, WITHDRAW, OUTCOMES, "/api/wallet/balance/", "/api/wallet/transactions/",
                  "/api/leaderboard", "/healthz"):
        assert route in joined, f"{route} missing from the OpenAPI paths {sorted(paths)}"


# -- request body encodings ----------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [
    "application/x-www-form-urlencoded",  # what `curl -d` sends
    None,
    "text/plain",
    "application/json; charset=utf-8",
    "application/octet-stream",
])
def test_body_is_json_whatever_the_content_type(server, uid, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    raw = json.dumps({"user_id": uid, "amount": 300}).encode()
    response = post(server.url, DEPOSIT, raw=raw, headers=headers)
    if content_type is None:
        assert "Content-Type" not in response.request.headers
    assert ok_json(response) == {"user_id": uid, "balance": 300, "transaction_id": response.json()["transaction_id"]}
    response = post(server.url, WITHDRAW, raw=json.dumps({"user_id": uid, "amount": 100}), headers=headers)
    assert ok_json(response)["balance"] == 200
    assert balance_of(server.url, uid) == 200


def test_integer_user_id_means_its_decimal_string(server):
    number = int(uuid.uuid4().int % 10**15) + 10**15  # a user id no other test uses
    body = ok_json(post(server.url, DEPOSIT, {"user_id": number, "amount": 100}))
    assert body["user_id"] == str(number)
    body = ok_json(post(server.url, DEPOSIT, {"user_id": str(number), "amount": 50}))
    assert body == {"user_id": str(number), "balance": 150, "transaction_id": body["transaction_id"]}
    body = ok_json(post(server.url, WITHDRAW, {"user_id": number, "amount": 20}))
    assert body["user_id"] == str(number) and body["balance"] == 130
    body = ok_json(post(server.url, OUTCOMES, {"user_id": number, "game": "dice", "bet": 30, "payout": 0}))
    assert body["user_id"] == str(number) and body["balance"] == 100
    assert ok_json(get(server.url, f"/api/wallet/balance/{number}")) == {"user_id": str(number), "balance": 100}
    assert [t["amount"] for t in transactions_of(server.url, number)] == [30, 20, 50, 100]


def test_long_integer_user_id_means_its_decimal_string(server):
    number = int(str(uuid.uuid4().int).rjust(64, "7")[:64])  # 64 digits: the longest valid user id
    body = ok_json(post(server.url, DEPOSIT, {"user_id": number, "amount": 5}))
    assert body["user_id"] == str(number) and len(body["user_id"]) == 64
    assert balance_of(server.url, str(number)) == 5


def test_largest_amount_is_accepted(server, uid):
    assert deposit(server.url, uid, INT64_MAX)["balance"] == INT64_MAX
    assert ok_json(post(server.url, WITHDRAW, {"user_id": uid, "amount": INT64_MAX}))["balance"] == 0


# -- invalid field values ------------------------------------------------------------------------------

BAD_AMOUNTS = ["0", "-1", "-0", "1.5", "1.0", "1e2", "1E+2", '"1"', '"100"', "true", "false", "null", "[]", "{}",
               "[100]", str(2**63), str(2**64), MISSING]


@pytest.mark.parametrize("path", [DEPOSIT, WITHDRAW])
@pytest.mark.parametrize("amount", BAD_AMOUNTS, ids=repr)
def test_invalid_amount_is_refused_and_changes_nothing(quiet, uid, path, amount):
    deposit(quiet.url, uid, 1000)
    before = state(quiet.url, uid)
    response = post(quiet.url, path, raw=json_object(user_id=json.dumps(uid), amount=amount))
    body = error_json(response, 400, "invalid_request")
    assert set(body) == {"error", "message"}
    assert "amount" in body["message"], body
    assert_unchanged(quiet.url, uid, before)


BAD_USER_IDS = ['""', json.dumps("a" * 65), '"a b"', '"a/b"', '"é"', '"\\u00e9"', '"a\\n"', '"a\\u0000"', '" a"',
                '"a.b"', "0", "-5", "1.5", "1.0", "true", "false", "null", "[]", '["a"]', "{}", str(10**64), MISSING]


def _user_id_readings(raw):
    """User ids a server might wrongly turn an invalid JSON user_id into; none of them may gain money."""
    if raw is MISSING:
        return set()
    value = json.loads(raw)
    readings = {str(value), json.dumps(value)}
    if isinstance(value, bool | int | float):
        readings.add(str(int(value)))
        readings.add(str(abs(int(value))))
    if isinstance(value, str):
        readings |= {value.strip(), value[:64], re.sub(r"[^A-Za-z0-9_-]", "", value), value.replace(" ", "_")}
    return {r for r in readings if NAME.fullmatch(r)}


@pytest.mark.parametrize("path", POST_ROUTES)
@pytest.mark.parametrize("user_id", BAD_USER_IDS, ids=repr)
def test_invalid_user_id_is_refused_and_changes_nothing(quiet, path, user_id):
    readings = sorted(_user_id_readings(user_id))
    before = {r: state(quiet.url, r) for r in readings}
    board = leaderboard(quiet.url)
    fields = {"user_id": user_id, "amount": "100"} if path != OUTCOMES else {
        "user_id": user_id, "game": '"slots"', "bet": "0", "payout": "100"}
    body = error_json(post(quiet.url, path, raw=json_object(**fields)), 400, "invalid_request")
    assert set(body) == {"error", "message"}
    assert "user_id" in body["message"], body
    assert {r: state(quiet.url, r) for r in readings} == before
    assert leaderboard(quiet.url) == board


BAD_GAMES = [MISSING, '""', json.dumps("g" * 65), '"bad game"', '"é"', '"a/b"', "5", "null", "true", "[]", "{}"]
BAD_STAKES = ["-1", "1.5", "1.0", "1e2", '"1"', "true", "false", "null", "[]", "{}", MISSING, str(2**63)]


@pytest.mark.parametrize("field, value", [("game", v) for v in BAD_GAMES]
                         + [("bet", v) for v in BAD_STAKES] + [("payout", v) for v in BAD_STAKES], ids=repr)
def test_invalid_outcome_field_is_refused_and_changes_nothing(quiet, uid, field, value):
    deposit(quiet.url, uid, 1000)
    before, board = state(quiet.url, uid), leaderboard(quiet.url)
    fields = {"user_id": json.dumps(uid), "game": '"slots"', "bet": "100", "payout": "50", field: value}
    body = error_json(post(quiet.url, OUTCOMES, raw=json_object(**fields)), 400, "invalid_request")
    assert set(body) == {"error", "message"}
    assert field in body["message"], body
    assert_unchanged(quiet.url, uid, before, board)


def _nested(depth):
    return "[" * depth + "]" * depth


def _with_user(uid, text):
    """Raw body text with USER standing for the JSON string of uid (string building, no JSON encoder)."""
    return text.replace("USER", json.dumps(uid))


_GAME_FIELDS = ', "bet": 1, "payout": 1, "game": "g"'
MALFORMED_BODIES = {
    "truncated": lambda uid: _with_user(uid, '{"user_id": USER, "amount": 100'),
    "trailing comma": lambda uid: _with_user(uid, '{"user_id": USER, "amount": 100,}'),
    "single quotes": lambda uid: _with_user(uid, "{'user_id': USER, 'amount': 100}").replace('"', "'"),
    "trailing garbage": lambda uid: _with_user(uid, '{"user_id": USER, "amount": 100} x'),
    "two objects": lambda uid: _with_user(uid, '{"user_id": USER, "amount": 100}{}'),
    "array": lambda uid: _with_user(uid, '[{"user_id": USER, "amount": 100}]'),
    "string": lambda uid: json.dumps(json.dumps({"user_id": uid, "amount": 100})),
    "number": lambda uid: "100",
    "null": lambda uid: "null",
    "true": lambda uid: "true",
    "empty body": lambda uid: "",
    "only spaces": lambda uid: "   ",
    "form fields": lambda uid: f"user_id={uid}&amount=100",
    "NaN": lambda uid: _with_user(uid, '{"user_id": USER, "amount": NaN' + _GAME_FIELDS + "}"),
    "Infinity": lambda uid: _with_user(uid, '{"user_id": USER, "amount": Infinity' + _GAME_FIELDS + "}"),
    "-Infinity": lambda uid: _with_user(uid, '{"user_id": USER, "amount": -Infinity' + _GAME_FIELDS + "}"),
    "NaN in bet": lambda uid: _with_user(uid, '{"user_id": USER, "amount": 1, "game": "g", "bet": NaN, "payout": 1}'),
    "Infinity in payout": lambda uid: _with_user(
        uid, '{"user_id": USER, "amount": 1, "game": "g", "bet": 1, "payout": Infinity}'),
    "nested 30000 deep": lambda uid: _with_user(uid, '{"user_id": USER, "amount": ' + _nested(30000) + "}"),
    "nested objects": lambda uid: _with_user(
        uid, '{"user_id": USER, "amount": ' + '{"a":' * 10000 + "1" + "}" * 10000 + "}"),
    "invalid utf-8 in string": lambda uid: _with_user(uid, '{"user_id": USER, "amount": 100, "x": "Z"}').encode()
    .replace(b"Z", b"\xff"),
    "invalid utf-8 bytes": lambda uid: b"\xff\xfe\xfd" + _with_user(uid, '{"user_id": USER, "amount": 100}').encode(),
    "invalid utf-8 in user_id": lambda uid: _with_user(uid + "Z", '{"user_id": USER, "amount": 100}').encode()
    .replace(b"Z", b"\xc3"),
    "lone surrogate": lambda uid: _with_user(uid, '{"user_id": USER, "amount": 1, "x": "Z"' + _GAME_FIELDS + "}")
    .encode()
    .replace(b"Z", b"\xed\xa0\x80"),
}


@pytest.mark.parametrize("path", POST_ROUTES)
@pytest.mark.parametrize("kind", list(MALFORMED_BODIES))
def test_malformed_body_is_refused_and_changes_nothing(quiet, uid, path, kind):
    deposit(quiet.url, uid, 1000)
    before, board = state(quiet.url, uid), leaderboard(quiet.url)
    raw = MALFORMED_BODIES[kind](uid)
    assert len(raw) <= MAX_BODY
    body = error_json(post(quiet.url, path, raw=raw), 400, "invalid_request")
    assert set(body) == {"error", "message"}
    assert_unchanged(quiet.url, uid, before, board)


@pytest.mark.parametrize("path, field", [(DEPOSIT, "amount"), (WITHDRAW, "amount"), (OUTCOMES, "bet"),
                                         (OUTCOMES, "payout")])
def test_huge_integer_literal_is_an_invalid_amount(quiet, uid, path, field):
    """A 5000-digit integer is valid JSON, but not an amount that fits 64 bits: 400 naming the field."""
    deposit(quiet.url, uid, 1000)
    before, board = state(quiet.url, uid), leaderboard(quiet.url)
    fields = {"user_id": json.dumps(uid), "amount": "1", "game": '"slots"', "bet": "1", "payout": "1",
              field: "9" * 5000}
    body = error_json(post(quiet.url, path, raw=json_object(**fields)), 400, "invalid_request")
    assert_unchanged(quiet.url, uid, before, board)
    assert field in body["message"], body


@pytest.mark.parametrize("path", POST_ROUTES)
def test_deeply_nested_body_of_100000_levels_is_refused(quiet, uid, path):
    """100000 levels of nesting take 200000 bytes: over the 64 KiB limit, so 413 before any parsing."""
    deposit(quiet.url, uid, 1000)
    before, board = state(quiet.url, uid), leaderboard(quiet.url)
    raw = _with_user(uid, '{"user_id": USER, "amount": ' + _nested(100000) + "}")
    response = post(quiet.url, path, raw=raw)
    error_json(response, 413, "payload_too_large")
    assert_unchanged(quiet.url, uid, before, board)


# -- path and query values -----------------------------------------------------------------------------

BAD_PATH_IDS = ["a%20b", "a" * 65, "", "a%2Fb", "a/b", "%C3%A9", "a.b", "a%00", "a%0A", "%20", "a+b", "~x"]


@pytest.mark.parametrize("route", ["/api/wallet/balance/", "/api/wallet/transactions/"])
@pytest.mark.parametrize("user_id", BAD_PATH_IDS)
def test_bad_user_id_in_path_is_400(server, route, user_id):
    body = error_json(get(server.url, route + user_id), 400, "invalid_request")
    assert set(body) == {"error", "message"}
    assert "user_id" in body["message"], body


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "abc", "1.5", "", "1e2", "%201", "99999999999999999999"])
def test_bad_transactions_limit_is_400(server, uid, limit):
    deposit(server.url, uid, 10)
    body = error_json(get(server.url, f"/api/wallet/transactions/{uid}?limit={limit}"), 400, "invalid_request")
    assert "limit" in body["message"], body


def test_transactions_limit_and_default(server, uid, http):
    for amount in range(1, 61):
        deposit(server.url, uid, amount, session=http)
    txs = ok_json(get(server.url, f"/api/wallet/transactions/{uid}"))["transactions"]
    assert [t["amount"] for t in txs] == list(range(60, 10, -1))  # default 50, newest first
    one = ok_json(get(server.url, f"/api/wallet/transactions/{uid}?limit=1"))["transactions"]
    assert [t["amount"] for t in one] == [60]
    assert one[0]["balance"] == sum(range(1, 61))
    everything = ok_json(get(server.url, f"/api/wallet/transactions/{uid}?limit=1000"))["transactions"]
    assert [t["amount"] for t in everything] == list(range(60, 0, -1))
    assert [t["balance"] for t in everything] == [sum(range(1, n + 1)) for n in range(60, 0, -1)]
    ids = [t["transaction_id"] for t in everything]
    assert len(set(ids)) == 60
    stamps = [datetime.fromisoformat(t["created_at"]) for t in everything]
    assert stamps == sorted(stamps, reverse=True)


def test_ledger_keeps_the_newest_1000(server, uid, http):
    for amount in range(1, 1006):
        deposit(server.url, uid, amount, session=http)
    txs = ok_json(http.get(f"{server.url}/api/wallet/transactions/{uid}?limit=1000", timeout=TIMEOUT))["transactions"]
    assert len(txs) == 1000
    assert [t["amount"] for t in txs] == list(range(1005, 5, -1))  # the oldest five (1..5) are gone
    assert txs[0]["balance"] == sum(range(1, 1006)) == balance_of(server.url, uid)


# -- routes, methods, sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [
    ("GET", "/nope"), ("POST", "/nope"), ("GET", "/api"), ("GET", "/api/wallet"), ("POST", "/api/wallet"),
    ("GET", "/api/wallet/deposit/extra"), ("POST", "/api/wallet/deposit/extra"), ("GET", "/api/leaderboard/x"),
    ("GET", "/healthz/x"), ("PUT", "/nope"), ("DELETE", "/nope"), ("GET", "/api/wallet/balances/x"),
])
def test_unknown_route_is_json_404(server, method, path):
    body = error_json(requests.request(method, server.url + path, timeout=TIMEOUT), 404, "not_found")
    assert set(body) == {"error", "message"}


@pytest.mark.parametrize("method, path", [
    ("GET", DEPOSIT), ("GET", WITHDRAW), ("GET", OUTCOMES), ("PUT", DEPOSIT), ("DELETE", WITHDRAW),
    ("POST", "/api/wallet/balance/someone"), ("POST", "/api/wallet/transactions/someone"),
    ("POST", "/api/leaderboard"), ("DELETE", "/healthz"), ("POST", "/healthz"), ("PATCH", "/api/leaderboard"),
])
def test_wrong_method_is_json_405(server, method, path):
    body = error_json(requests.request(method, server.url + path, timeout=TIMEOUT), 405, "method_not_allowed")
    assert set(body) == {"error", "message"}


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/healthz", None),
    ("GET", "/api/leaderboard", None),
    ("GET", "/api/wallet/balance/x1", None),
    ("GET", "/api/wallet/transactions/x1", None),
    ("GET", "/api/wallet/balance/a%20b", None),
    ("GET", "/api/wallet/transactions/x1?limit=0", None),
    ("POST", DEPOSIT, "{"),
    ("POST", WITHDRAW, '{"user_id": "nobody-has-this", "amount": 1}'),
    ("POST", OUTCOMES, "[]"),
    ("POST", DEPOSIT, " " * (MAX_BODY + 1)),
    ("GET", "/missing", None),
    ("DELETE", "/healthz", None),
    ("GET", "/ws", None),
])
def test_every_response_is_json(server, method, path, body):
    response = requests.request(method, server.url + path, data=body, timeout=TIMEOUT)
    assert response.headers["Content-Type"].split(";")[0] == "application/json", response.headers
    assert isinstance(response.json(), dict)


def _padded(uid, size, amount=1):
    text = json.dumps({"user_id": uid, "amount": amount})
    return (text + " " * (size - len(text))).encode()


def _chunks(data, size=7000):
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_of_exactly_64_kib_is_accepted(server, uid, chunked):
    data = _padded(uid, MAX_BODY, 77)
    assert len(data) == MAX_BODY
    response = post(server.url, DEPOSIT, raw=_chunks(data) if chunked else data)
    if chunked:
        assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert ok_json(response)["balance"] == 77


@pytest.mark.parametrize("path", POST_ROUTES)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_64_kib_is_413(server, uid, path, chunked):
    deposit(server.url, uid, 1000)
    before = state(server.url, uid)
    data = _padded(uid, MAX_BODY + 1)
    response = post(server.url, path, raw=_chunks(data) if chunked else data)
    if chunked:
        assert response.request.headers.get("Transfer-Encoding") == "chunked"
    body = error_json(response, 413, "payload_too_large")
    assert set(body) == {"error", "message"}
    assert state(server.url, uid) == before


def test_declared_huge_body_is_413_without_sending_it(server):
    head = (f"POST {DEPOSIT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000000\r\n\r\n")
    status, headers, body = raw_request(server, head.encode())
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"] == "payload_too_large"


# -- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("balance, amount", [(0, 1), (100, 101), (1000, INT64_MAX)])
def test_withdraw_more_than_balance_is_409(server, uid, balance, amount):
    if balance:
        deposit(server.url, uid, balance)
    before = state(server.url, uid)
    body = ok_json(post(server.url, WITHDRAW, {"user_id": uid, "amount": amount}), 409)
    assert body == {"error": "insufficient_funds", "message": "not enough money", "balance": balance}
    assert state(server.url, uid) == before


def test_deposit_over_int64_max_is_409(server, uid):
    deposit(server.url, uid, INT64_MAX)
    before = state(server.url, uid)
    body = error_json(post(server.url, DEPOSIT, {"user_id": uid, "amount": 1}), 409, "balance_limit_exceeded")
    assert state(server.url, uid) == before
    assert before[0] == INT64_MAX
    assert body["error"] == "balance_limit_exceeded"


@pytest.mark.parametrize("balance, bet", [(0, 1), (100, 101), (500, INT64_MAX)])
def test_outcome_with_bet_over_balance_is_409_and_changes_nothing(quiet, uid, balance, bet):
    if balance:
        deposit(quiet.url, uid, balance)
    before, board = state(quiet.url, uid), leaderboard(quiet.url)
    response = post(quiet.url, OUTCOMES, {"user_id": uid, "game": "slots", "bet": bet, "payout": 10**6})
    body = ok_json(response, 409)
    assert body == {"error": "insufficient_funds", "message": "not enough money", "balance": balance}
    assert_unchanged(quiet.url, uid, before, board)


def test_outcome_over_int64_max_is_409_and_changes_nothing(quiet, uid):
    deposit(quiet.url, uid, INT64_MAX - 10)
    before, board = state(quiet.url, uid), leaderboard(quiet.url)
    response = post(quiet.url, OUTCOMES, {"user_id": uid, "game": "slots", "bet": 5, "payout": 16})
    error_json(response, 409, "balance_limit_exceeded")
    assert_unchanged(quiet.url, uid, before, board)


def test_outcome_of_zero_bet_and_zero_payout_counts_as_played(start_server):
    srv = start_server()
    user = new_id()
    deposit(srv.url, user, 300)
    before = transactions_of(srv.url, user)
    body = outcome(srv.url, user, 0, 0)
    assert {k: v for k, v in body.items() if k != "outcome_id"} == {
        "user_id": user, "game": "slots", "bet": 0, "payout": 0, "net": 0, "balance": 300}
    assert transactions_of(srv.url, user) == before
    assert balance_of(srv.url, user) == 300
    assert leaderboard(srv.url) == [{"rank": 1, "user_id": user, "net_winnings": 0}]


# -- game outcomes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bet, payout", [(100, 250), (100, 0), (0, 50), (300, 100), (1000, 1000), (1000, 0)])
def test_outcome_writes_bet_then_win(server, uid, bet, payout):
    start = deposit(server.url, uid, 1000)
    body = outcome(server.url, uid, bet, payout, game="blackjack-21_v2")
    assert body["game"] == "blackjack-21_v2"
    assert body["net"] == payout - bet
    assert body["balance"] == 1000 - bet + payout == balance_of(server.url, uid)
    txs = transactions_of(server.url, uid)
    expected = []  # newest first: the win (written after the bet), then the bet, then the deposit
    if payout:
        expected.append(("win", payout, 1000 - bet + payout))
    if bet:
        expected.append(("bet", bet, 1000 - bet))
    expected.append(("deposit", 1000, 1000))
    assert [(t["type"], t["amount"], t["balance"]) for t in txs] == expected
    assert txs[-1]["transaction_id"] == start["transaction_id"]
    assert len({t["transaction_id"] for t in txs}) == len(txs)


def test_outcome_ids_differ(server, uid):
    deposit(server.url, uid, 100)
    ids = {outcome(server.url, uid, 1, 1)["outcome_id"] for _ in range(5)}
    assert len(ids) == 5


def test_leaderboard_order_ties_cut_and_ranks(start_server):
    srv = start_server()
    assert ok_json(get(srv.url, "/api/leaderboard")) == {"leaderboard": []}
    rounds = {  # user -> (bet, payout) rounds; nets: sums of payout - bet
        "carol": [(100, 700)],                 # 600
        "alice": [(100, 300), (100, 300)],     # 400
        "bob": [(400, 800)],                   # 400, tie with alice: alice first
        "42": [(0, 400)],                      # 400, tie: "42" < "alice" < "bob"
        "dave": [(500, 0), (0, 800)],          # 300
        "erin": [(0, 0)],                      # 0
        "frank": [(200, 0)],                   # -200
        "gina": [(100, 50)],                   # -50
        "hank": [(10, 20)],                    # 10
        "ivan": [(1000, 0)],                   # -1000, cut
        "judy": [(0, 5), (5, 0)],              # 0, tie with erin: erin first
        "kim": [(300, 0)],                     # -300, cut
    }
    for user, plays in rounds.items():
        deposit(srv.url, int(user) if user.isdigit() else user, 2000)
        for bet, payout in plays:
            outcome(srv.url, int(user) if user.isdigit() else user, bet, payout)
    nets = {user: sum(p - b for b, p in plays) for user, plays in rounds.items()}
    ranked = sorted(nets.items(), key=lambda item: (-item[1], item[0]))[:10]
    expected = [{"rank": i, "user_id": u, "net_winnings": n} for i, (u, n) in enumerate(ranked, start=1)]
    assert leaderboard(srv.url) == expected
    assert [row["user_id"] for row in expected][:4] == ["carol", "42", "alice", "bob"]
    assert "ivan" not in [row["user_id"] for row in expected]
    # A player outside the top 10 climbs in; the last one falls out.
    outcome(srv.url, "ivan", 0, 2000)
    nets["ivan"] += 2000
    ranked = sorted(nets.items(), key=lambda item: (-item[1], item[0]))[:10]
    board = leaderboard(srv.url)
    assert board == [{"rank": i, "user_id": u, "net_winnings": n} for i, (u, n) in enumerate(ranked, start=1)]
    assert board[0] == {"rank": 1, "user_id": "ivan", "net_winnings": 1000}
    assert len(board) == 10


# -- idempotency ---------------------------------------------------------------------------------------


def idem(key):
    return {"Idempotency-Key": key}


@pytest.mark.parametrize("path", [DEPOSIT, WITHDRAW, OUTCOMES])
def test_replay_returns_the_same_answer_and_changes_nothing(server, uid, path):
    deposit(server.url, uid, 1000)
    key = new_id("k")
    payload = {"user_id": uid, "amount": 100} if path != OUTCOMES else {
        "user_id": uid, "game": "slots", "bet": 100, "payout": 300}
    first = post(server.url, path, payload, headers=idem(key))
    first_body = ok_json(first)
    assert "Idempotent-Replayed" not in first.headers
    after = state(server.url, uid)
    for _ in range(3):
        again = post(server.url, path, payload, headers=idem(key))
        assert ok_json(again) == first_body
        assert again.headers.get("Idempotent-Replayed") == "true"
    assert state(server.url, uid) == after


def test_outcome_replay_does_not_count_twice_on_the_leaderboard(start_server):
    srv = start_server()
    user = new_id()
    deposit(srv.url, user, 1000)
    payload = {"user_id": user, "game": "slots", "bet": 100, "payout": 350}
    first = ok_json(post(srv.url, OUTCOMES, payload, headers=idem("round-1")))
    replay = post(srv.url, OUTCOMES, payload, headers=idem("round-1"))
    assert ok_json(replay) == first and replay.headers.get("Idempotent-Replayed") == "true"
    assert leaderboard(srv.url) == [{"rank": 1, "user_id": user, "net_winnings": 250}]
    assert [t["type"] for t in transactions_of(srv.url, user)] == ["win", "bet", "deposit"]


@pytest.mark.parametrize("first_path, second_path, second_body", [
    (DEPOSIT, DEPOSIT, {"amount": 101}),
    (DEPOSIT, DEPOSIT, {"amount": 100, "user_id": "someone-else"}),
    (DEPOSIT, DEPOSIT, {"extra": 1}),
    (DEPOSIT, WITHDRAW, {}),
    (WITHDRAW, DEPOSIT, {}),
    (DEPOSIT, OUTCOMES, {"game": "slots", "bet": 0, "payout": 0}),
])
def test_same_key_with_another_request_is_422(server, uid, first_path, second_path, second_body):
    deposit(server.url, uid, 1000)
    key = new_id("k")
    payload = {"user_id": uid, "amount": 100}
    first_body = ok_json(post(server.url, first_path, payload, headers=idem(key)))
    after = state(server.url, uid)
    response = post(server.url, second_path, {**payload, **second_body}, headers=idem(key))
    body = error_json(response, 422, "idempotency_key_reused")
    assert set(body) == {"error", "message"}
    assert "Idempotent-Replayed" not in response.headers
    assert state(server.url, uid) == after
    # The first request is still the one remembered.
    again = post(server.url, first_path, payload, headers=idem(key))
    assert ok_json(again) == first_body and again.headers.get("Idempotent-Replayed") == "true"


def test_same_json_with_other_spacing_and_key_order_is_a_replay(server, uid):
    key = new_id("k")
    first = ok_json(post(server.url, DEPOSIT, raw=f'{{"user_id":"{uid}","amount":250}}', headers=idem(key)))
    for raw in (f'{{ "amount" : 250 ,\n\t"user_id" : "{uid}" }}', f'  {{"amount":250,"user_id":"{uid}"}}\n'):
        again = post(server.url, DEPOSIT, raw=raw, headers=idem(key))
        assert ok_json(again) == first
        assert again.headers.get("Idempotent-Replayed") == "true"
    assert balance_of(server.url, uid) == 250
    assert len(transactions_of(server.url, uid)) == 1


@pytest.mark.parametrize("key", ["", "k" * 256, "caf\u00e9", "tab\there"],
                         ids=["empty", "256 chars", "non-ascii", "tab"])
@pytest.mark.parametrize("path", POST_ROUTES)
def test_bad_idempotency_key_is_400_and_changes_nothing(quiet, uid, key, path):
    deposit(quiet.url, uid, 1000)
    before, board = state(quiet.url, uid), leaderboard(quiet.url)
    payload = {"user_id": uid, "amount": 100} if path != OUTCOMES else {
        "user_id": uid, "game": "slots", "bet": 100, "payout": 300}
    response = post(quiet.url, path, raw=json.dumps(payload), headers={"Idempotency-Key": key.encode("latin-1")})
    body = error_json(response, 400, "invalid_request")
    assert "idempotency" in body["message"].lower(), body
    assert_unchanged(quiet.url, uid, before, board)


@pytest.mark.parametrize("length", [1, 255])
def test_idempotency_key_of_1_and_255_characters_work(start_server, length):
    srv = start_server()
    user = new_id()
    key = (new_id("k") * 20)[:length]
    first = post(srv.url, DEPOSIT, {"user_id": user, "amount": 10}, headers=idem(key))
    assert ok_json(first)["balance"] == 10
    again = post(srv.url, DEPOSIT, {"user_id": user, "amount": 10}, headers=idem(key))
    assert ok_json(again) == first.json() and again.headers.get("Idempotent-Replayed") == "true"
    assert balance_of(srv.url, user) == 10


def test_a_400_is_not_remembered(server, uid):
    key = new_id("k")
    error_json(post(server.url, DEPOSIT, {"user_id": uid, "amount": -5}, headers=idem(key)), 400, "invalid_request")
    error_json(post(server.url, DEPOSIT, raw="{", headers=idem(key)), 400, "invalid_request")
    response = post(server.url, DEPOSIT, {"user_id": uid, "amount": 40}, headers=idem(key))
    assert ok_json(response)["balance"] == 40
    assert "Idempotent-Replayed" not in response.headers
    assert balance_of(server.url, uid) == 40


def test_a_409_is_remembered(server, uid):
    key = new_id("k")
    payload = {"user_id": uid, "amount": 500}
    first = post(server.url, WITHDRAW, payload, headers=idem(key))
    assert ok_json(first, 409) == {"error": "insufficient_funds", "message": "not enough money", "balance": 0}
    deposit(server.url, uid, 1000)
    before = state(server.url, uid)
    replay = post(server.url, WITHDRAW, payload, headers=idem(key))
    assert ok_json(replay, 409) == first.json()
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert state(server.url, uid) == before
    assert before[0] == 1000


def test_concurrent_requests_with_one_key_apply_once(server, uid):
    deposit(server.url, uid, 1000)
    key = new_id("k")
    payload = {"user_id": uid, "amount": 300}
    start = threading.Barrier(20)

    def send(_):
        with requests.Session() as session:
            session.get(server.url + "/healthz", timeout=TIMEOUT)  # connect first, so the posts race
            start.wait(timeout=TIMEOUT)
            return post(server.url, WITHDRAW, payload, headers=idem(key), session=session)

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(send, range(20)))
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses]
    bodies = [r.json() for r in responses]
    assert all(body == bodies[0] for body in bodies), bodies
    assert bodies[0]["balance"] == 700
    assert sum("Idempotent-Replayed" not in r.headers for r in responses) == 1
    assert all(r.headers.get("Idempotent-Replayed") == "true" for r in responses if "Idempotent-Replayed" in r.headers)
    assert balance_of(server.url, uid) == 700
    txs = transactions_of(server.url, uid)
    assert [t["type"] for t in txs] == ["withdraw", "deposit"]
    assert txs[0]["transaction_id"] == bodies[0]["transaction_id"]


# -- request ids and logging ---------------------------------------------------------------------------

_LOGGED = [
    ("GET", "/healthz", None, 200),
    ("GET", "/api/wallet/balance/someone", None, 200),
    ("POST", DEPOSIT, '{"user_id": "log-user", "amount": 5}', 200),
    ("POST", DEPOSIT, '{"user_id": "log-user", "amount": 0}', 400),
    ("POST", WITHDRAW, '{"user_id": "nobody-has-this", "amount": 5}', 409),
    ("GET", "/no/such/route", None, 404),
    ("DELETE", "/healthz", None, 405),
]


@pytest.mark.parametrize("method, path, body, status", _LOGGED)
def test_request_id_is_echoed_and_logged_once(server, method, path, body, status):
    rid = "rid-" + uuid.uuid4().hex
    response = requests.request(method, server.url + path, data=body, headers={"X-Request-ID": rid}, timeout=TIMEOUT)
    assert response.status_code == status
    assert response.headers["X-Request-ID"] == rid
    wait_for(lambda: rid in server.log(), timeout=5, message=f"log line with {rid}")
    lines = [line for line in server.log().splitlines() if rid in line]
    assert len(lines) == 1, lines
    assert re.search(rf"\b{method} {re.escape(path)} {status}\b", lines[0]), lines[0]
    assert re.search(r"\d+(\.\d+)? ?ms\b", lines[0]), lines[0]


def test_request_id_is_made_up_when_missing(server):
    ids = []
    for _ in range(2):
        response = get(server.url, "/api/leaderboard")
        rid = response.headers.get("X-Request-ID", "")
        assert rid.strip()
        ids.append(rid)
        wait_for(lambda rid=rid: rid in server.log(), timeout=5, message=f"log line with {rid}")
        lines = [line for line in server.log().splitlines() if rid in line]
        assert len(lines) == 1 and "GET /api/leaderboard 200" in lines[0], lines
    assert ids[0] != ids[1]


# -- raw HTTP framing ----------------------------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(server, uid):
    sock, reader = raw_connection(server)
    with sock, reader:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(reader)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert headers.get("connection", "").lower() != "close"
        payload = json.dumps({"user_id": uid, "amount": 9}).encode()
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (DEPOSIT.encode(), len(payload), payload))
        status, headers, body = read_response(reader)
        assert status == 200 and json.loads(body)["balance"] == 9
        sock.sendall(f"GET /api/wallet/balance/{uid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, body = read_response(reader)
        assert (status, json.loads(body)) == (200, {"user_id": uid, "balance": 9})


def test_keep_alive_survives_an_error_response(server):
    sock, reader = raw_connection(server)
    with sock, reader:
        sock.sendall(b"POST /api/wallet/deposit HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n{")
        status, _, body = read_response(reader)
        assert status == 400 and json.loads(body)["error"] == "invalid_request"
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(reader)
        assert (status, json.loads(body)) == (200, {"status": "ok"})


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /healthz HTTP/1.1 extra\r\n\r\n",
    b"\x00\x01\x02\xff\r\n\r\n",
    b"GET /healthz HTTP/x.y\r\nHost: x\r\n\r\n",
], ids=["garbage", "no path", "extra word", "binary", "bad version"])
def test_malformed_request_line_gets_json_400(server, request_bytes):
    status, headers, body = raw_request(server, request_bytes)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    decoded = json.loads(body)
    assert decoded["error"] == "invalid_request" and decoded["message"]
    assert b"<html" not in body.lower()


# -- no stack traces -----------------------------------------------------------------------------------


def test_no_stack_trace_in_the_log_after_bad_input(server, quiet):
    """Runs last in this file: by now both servers have seen all the bad input above, and a bit more here."""
    uid = new_id()
    for raw in ["{", "[]", "", "NaN", _nested(30000), '{"user_id": "x", "amount": %s}' % ("9" * 5000)]:
        error_json(post(server.url, DEPOSIT, raw=raw), 400, "invalid_request")
    error_json(post(server.url, DEPOSIT, raw=b'{"user_id": "\xff"}'), 400, "invalid_request")
    raw_request(server, b"GARBAGE\r\n\r\n")
    deposit(server.url, uid, 1)
    rid = "last-" + uuid.uuid4().hex
    get(server.url, "/healthz", headers={"X-Request-ID": rid})
    wait_for(lambda: rid in server.log(), timeout=5, message="the last log line")
    for srv in (server, quiet):
        log = srv.log()
        assert "Traceback" not in log, log[-5000:]
        assert "internal_error" not in log and "unhandled error" not in log, log[-5000:]
