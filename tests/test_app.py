"""In-process tests of the HTTP API (CONTRACT.md sections 2, 3, 6 and 8) through Flask's test client.

Every test gets its own app over a fresh MemoryStore (conftest `app`/`client`), so "changes nothing"
and leaderboard checks see that test's requests only, and no process or socket is needed. What needs
a real socket (framing, keep-alive, chunked bodies, the process) is in test_http.py.
"""

import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

import logs
from app import create_app
from conftest import event_sink
from wallet_store import MemoryStore, StoreUnavailable

MAX_BODY = 64 * 1024
INT64_MAX = 2**63 - 1
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)")

DEPOSIT = "/api/wallet/deposit"
WITHDRAW = "/api/wallet/withdraw"
OUTCOMES = "/api/games/outcomes"
TOKENS = "/api/auth/player-tokens"
POST_ROUTES = [DEPOSIT, WITHDRAW, OUTCOMES]
MISSING = object()  # marks a field left out of the request body


# -- helpers -------------------------------------------------------------------------------------------


def new_id(prefix="u"):
    return prefix + uuid.uuid4().hex[:16]


def post(client, path, body=None, *, raw=None, headers=None, **kwargs):
    """POST a JSON body (or raw bytes/str, sent without a Content-Type) and return the response."""
    if raw is None:
        return client.post(path, json=body, headers=headers, **kwargs)
    return client.post(path, data=raw, headers=headers, **kwargs)


def ok_json(response, status=200):
    """Assert status and JSON content type, return the decoded body."""
    assert response.status_code == status, (response.status_code, response.data[:500])
    assert response.mimetype == "application/json", response.headers
    return json.loads(response.data)


def error_json(response, status, code):
    body = ok_json(response, status)
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"].strip(), body
    return body


def balance_of(client, user):
    return ok_json(client.get(f"/api/wallet/balance/{user}"))["balance"]


def transactions_of(client, user, limit=1000):
    return ok_json(client.get(f"/api/wallet/transactions/{user}?limit={limit}"))["transactions"]


def leaderboard(client):
    return ok_json(client.get("/api/leaderboard"))["leaderboard"]


def state(client, user):
    """Everything a refused request must leave as it was: the balance, the whole ledger, the leaderboard."""
    return balance_of(client, user), transactions_of(client, user), leaderboard(client)


def deposit(client, user, amount):
    return ok_json(post(client, DEPOSIT, {"user_id": user, "amount": amount}))


def outcome(client, user, bet, payout, game="slots"):
    return ok_json(post(client, OUTCOMES, {"user_id": user, "game": game, "bet": bet, "payout": payout}))


def json_object(**fields):
    """A JSON object from raw JSON value texts (so literals like 1e2 or 1.0 reach the server verbatim)."""
    return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items() if v is not MISSING) + "}"


# -- success bodies ----------------------------------------------------------------------------------


def test_deposit_success_body(client, uid):
    body = ok_json(post(client, DEPOSIT, {"user_id": uid, "amount": 5000}))
    assert set(body) == {"user_id", "balance", "transaction_id"}
    assert body["user_id"] == uid
    assert type(body["balance"]) is int and body["balance"] == 5000
    assert isinstance(body["transaction_id"], str) and body["transaction_id"]
    again = deposit(client, uid, 7)
    assert again["balance"] == 5007
    assert again["transaction_id"] != body["transaction_id"]


def test_withdraw_success_body(client, uid):
    deposit(client, uid, 5000)
    body = ok_json(post(client, WITHDRAW, {"user_id": uid, "amount": 1250}))
    assert set(body) == {"user_id", "balance", "transaction_id"}
    assert body["user_id"] == uid
    assert type(body["balance"]) is int and body["balance"] == 3750
    assert isinstance(body["transaction_id"], str) and body["transaction_id"]
    # Withdrawing everything is allowed and leaves exactly 0.
    assert ok_json(post(client, WITHDRAW, {"user_id": uid, "amount": 3750}))["balance"] == 0
    assert balance_of(client, uid) == 0


def test_balance_success_body_and_unknown_user_has_zero(client, uid):
    assert ok_json(client.get(f"/api/wallet/balance/{uid}")) == {"user_id": uid, "balance": 0}
    deposit(client, uid, 123)
    assert ok_json(client.get(f"/api/wallet/balance/{uid}")) == {"user_id": uid, "balance": 123}


def test_transactions_success_body(client, uid):
    assert ok_json(client.get(f"/api/wallet/transactions/{uid}")) == {"user_id": uid, "transactions": []}
    d = deposit(client, uid, 5000)
    w = ok_json(post(client, WITHDRAW, {"user_id": uid, "amount": 1250}))
    body = ok_json(client.get(f"/api/wallet/transactions/{uid}"))
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


def test_outcome_success_body(client, uid):
    deposit(client, uid, 1000)
    body = ok_json(post(client, OUTCOMES, {"user_id": uid, "game": "slots", "bet": 500, "payout": 2000}))
    assert set(body) == {"outcome_id", "user_id", "game", "bet", "payout", "net", "balance"}
    assert isinstance(body["outcome_id"], str) and body["outcome_id"]
    assert {k: v for k, v in body.items() if k != "outcome_id"} == {
        "user_id": uid, "game": "slots", "bet": 500, "payout": 2000, "net": 1500, "balance": 2500,
    }
    for key in ("bet", "payout", "net", "balance"):
        assert type(body[key]) is int


def test_leaderboard_success_body(client, uid):
    deposit(client, uid, 100)
    outcome(client, uid, 0, 0)
    assert ok_json(client.get("/api/leaderboard")) == {
        "leaderboard": [{"rank": 1, "user_id": uid, "net_winnings": 0}]}


def test_healthz_body(client):
    assert ok_json(client.get("/healthz")) == {"status": "ok"}


def test_dashboard_is_the_one_html_page(client):
    response = client.get("/")
    assert response.status_code == 200 and response.mimetype == "text/html"


# -- request body encodings ----------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [
    "application/x-www-form-urlencoded",  # what `curl -d` sends
    None,
    "text/plain",
    "application/json; charset=utf-8",
    "application/octet-stream",
])
def test_body_is_json_whatever_the_content_type(client, uid, content_type):
    raw = json.dumps({"user_id": uid, "amount": 300}).encode()
    body = ok_json(client.post(DEPOSIT, data=raw, content_type=content_type))
    assert body == {"user_id": uid, "balance": 300, "transaction_id": body["transaction_id"]}
    response = client.post(WITHDRAW, data=json.dumps({"user_id": uid, "amount": 100}), content_type=content_type)
    assert ok_json(response)["balance"] == 200
    assert balance_of(client, uid) == 200


def test_integer_user_id_means_its_decimal_string(client):
    number = 10**15 + 42
    body = ok_json(post(client, DEPOSIT, {"user_id": number, "amount": 100}))
    assert body["user_id"] == str(number)
    body = ok_json(post(client, DEPOSIT, {"user_id": str(number), "amount": 50}))
    assert body == {"user_id": str(number), "balance": 150, "transaction_id": body["transaction_id"]}
    body = ok_json(post(client, WITHDRAW, {"user_id": number, "amount": 20}))
    assert body["user_id"] == str(number) and body["balance"] == 130
    body = ok_json(post(client, OUTCOMES, {"user_id": number, "game": "dice", "bet": 30, "payout": 0}))
    assert body["user_id"] == str(number) and body["balance"] == 100
    assert ok_json(client.get(f"/api/wallet/balance/{number}")) == {"user_id": str(number), "balance": 100}
    assert [t["amount"] for t in transactions_of(client, number)] == [30, 20, 50, 100]
    assert leaderboard(client) == [{"rank": 1, "user_id": str(number), "net_winnings": -30}]


def test_long_integer_user_id_means_its_decimal_string(client):
    number = int("7" * 64)  # 64 digits: the longest valid user id
    body = ok_json(post(client, DEPOSIT, {"user_id": number, "amount": 5}))
    assert body["user_id"] == str(number) and len(body["user_id"]) == 64
    assert balance_of(client, str(number)) == 5


def test_largest_amount_is_accepted(client, uid):
    assert deposit(client, uid, INT64_MAX)["balance"] == INT64_MAX
    assert ok_json(post(client, WITHDRAW, {"user_id": uid, "amount": INT64_MAX}))["balance"] == 0


# -- invalid field values: every field x bad value -> 400 naming the field, nothing changed ------------

BAD_AMOUNTS = ["0", "-1", "-0", "1.5", "1.0", "1e2", "1E+2", '"1"', '"100"', "true", "false", "null", "[]", "{}",
               "[100]", str(2**63), str(2**64), "9" * 5000, MISSING]


@pytest.mark.parametrize("path", [DEPOSIT, WITHDRAW])
@pytest.mark.parametrize("amount", BAD_AMOUNTS, ids=lambda v: repr(v)[:40])
def test_invalid_amount_is_refused_and_changes_nothing(client, uid, path, amount):
    deposit(client, uid, 1000)
    before = state(client, uid)
    response = post(client, path, raw=json_object(user_id=json.dumps(uid), amount=amount))
    body = error_json(response, 400, "invalid_request")
    assert set(body) == {"error", "message"}
    assert "amount" in body["message"], body
    assert state(client, uid) == before


BAD_USER_IDS = ['""', json.dumps("a" * 65), '"a b"', '"a/b"', '"é"', '"\\u00e9"', '"a\\n"', '"a\\u0000"', '" a"',
                '"a.b"', "0", "-5", "1.5", "1.0", "true", "false", "null", "[]", '["a"]', "{}", str(10**64), MISSING]


@pytest.mark.parametrize("path", POST_ROUTES)
@pytest.mark.parametrize("user_id", BAD_USER_IDS, ids=repr)
def test_invalid_user_id_is_refused_and_changes_nothing(client, store, path, user_id):
    fields = {"user_id": user_id, "amount": "100"} if path != OUTCOMES else {
        "user_id": user_id, "game": '"slots"', "bet": "0", "payout": "100"}
    body = error_json(post(client, path, raw=json_object(**fields)), 400, "invalid_request")
    assert set(body) == {"error", "message"}
    assert "user_id" in body["message"], body
    # A fresh store: whatever the server might have read the id as, nothing may exist anywhere.
    assert store.totals() == (0, 0)
    assert leaderboard(client) == []


BAD_GAMES = [MISSING, '""', json.dumps("g" * 65), '"bad game"', '"é"', '"a/b"', "5", "null", "true", "[]", "{}"]
BAD_STAKES = ["-1", "1.5", "1.0", "1e2", '"1"', "true", "false", "null", "[]", "{}", MISSING, str(2**63), "9" * 5000]


@pytest.mark.parametrize("field, value", [("game", v) for v in BAD_GAMES]
                         + [("bet", v) for v in BAD_STAKES] + [("payout", v) for v in BAD_STAKES],
                         ids=lambda v: repr(v)[:40])
def test_invalid_outcome_field_is_refused_and_changes_nothing(client, uid, field, value):
    deposit(client, uid, 1000)
    before = state(client, uid)
    fields = {"user_id": json.dumps(uid), "game": '"slots"', "bet": "100", "payout": "50", field: value}
    body = error_json(post(client, OUTCOMES, raw=json_object(**fields)), 400, "invalid_request")
    assert set(body) == {"error", "message"}
    assert field in body["message"], body
    assert state(client, uid) == before
    assert before[2] == []


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
def test_malformed_body_is_refused_and_changes_nothing(client, uid, path, kind):
    deposit(client, uid, 1000)
    before = state(client, uid)
    raw = MALFORMED_BODIES[kind](uid)
    assert len(raw) <= MAX_BODY
    body = error_json(post(client, path, raw=raw), 400, "invalid_request")
    assert set(body) == {"error", "message"}
    assert state(client, uid) == before


@pytest.mark.parametrize("path", POST_ROUTES)
def test_body_over_64_kib_is_413_before_parsing(client, uid, path):
    """100000 levels of nesting take 200000 bytes: over the limit, so 413 before any parsing."""
    deposit(client, uid, 1000)
    before = state(client, uid)
    for raw in (_with_user(uid, '{"user_id": USER, "amount": ' + _nested(100000) + "}"),
                json.dumps({"user_id": uid, "amount": 1}).ljust(MAX_BODY + 1)):
        body = error_json(post(client, path, raw=raw), 413, "payload_too_large")
        assert set(body) == {"error", "message"}
    assert state(client, uid) == before


def test_body_of_exactly_64_kib_is_accepted(client, uid):
    data = json.dumps({"user_id": uid, "amount": 77}).ljust(MAX_BODY).encode()
    assert len(data) == MAX_BODY
    assert ok_json(post(client, DEPOSIT, raw=data))["balance"] == 77


# -- path and query values -----------------------------------------------------------------------------

BAD_PATH_IDS = ["a%20b", "a" * 65, "", "a%2Fb", "a/b", "%C3%A9", "a.b", "a%00", "a%0A", "%20", "a+b", "~x"]


@pytest.mark.parametrize("route", ["/api/wallet/balance/", "/api/wallet/transactions/"])
@pytest.mark.parametrize("user_id", BAD_PATH_IDS)
def test_bad_user_id_in_path_is_400(client, route, user_id):
    body = error_json(client.get(route + user_id), 400, "invalid_request")
    assert set(body) == {"error", "message"}
    assert "user_id" in body["message"], body


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "abc", "1.5", "", "1e2", "%201", "99999999999999999999"])
def test_bad_transactions_limit_is_400(client, uid, limit):
    deposit(client, uid, 10)
    body = error_json(client.get(f"/api/wallet/transactions/{uid}?limit={limit}"), 400, "invalid_request")
    assert "limit" in body["message"], body


def test_transactions_limit_and_default(client, uid):
    for amount in range(1, 61):
        deposit(client, uid, amount)
    txs = ok_json(client.get(f"/api/wallet/transactions/{uid}"))["transactions"]
    assert [t["amount"] for t in txs] == list(range(60, 10, -1))  # default 50, newest first
    one = ok_json(client.get(f"/api/wallet/transactions/{uid}?limit=1"))["transactions"]
    assert [t["amount"] for t in one] == [60]
    assert one[0]["balance"] == sum(range(1, 61))
    everything = transactions_of(client, uid)
    assert [t["amount"] for t in everything] == list(range(60, 0, -1))
    assert [t["balance"] for t in everything] == [sum(range(1, n + 1)) for n in range(60, 0, -1)]
    assert len({t["transaction_id"] for t in everything}) == 60
    stamps = [datetime.fromisoformat(t["created_at"]) for t in everything]
    assert stamps == sorted(stamps, reverse=True)


def test_ledger_keeps_the_newest_1000(client, uid):
    for amount in range(1, 1006):
        deposit(client, uid, amount)
    txs = transactions_of(client, uid)
    assert len(txs) == 1000
    assert [t["amount"] for t in txs] == list(range(1005, 5, -1))  # the oldest five (1..5) are gone
    assert txs[0]["balance"] == sum(range(1, 1006)) == balance_of(client, uid)


# -- routes and methods ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [
    ("GET", "/nope"), ("POST", "/nope"), ("GET", "/api"), ("GET", "/api/wallet"), ("POST", "/api/wallet"),
    ("GET", "/api/wallet/deposit/extra"), ("POST", "/api/wallet/deposit/extra"), ("GET", "/api/leaderboard/x"),
    ("GET", "/healthz/x"), ("PUT", "/nope"), ("DELETE", "/nope"), ("GET", "/api/wallet/balances/x"),
    ("POST", "/api/wallet//deposit"), ("GET", "/api/auth/player-tokens/x"),
])
def test_unknown_route_is_json_404(client, method, path):
    body = error_json(client.open(path, method=method), 404, "not_found")
    assert set(body) == {"error", "message"}


@pytest.mark.parametrize("method, path", [
    ("GET", DEPOSIT), ("GET", WITHDRAW), ("GET", OUTCOMES), ("PUT", DEPOSIT), ("DELETE", WITHDRAW),
    ("POST", "/api/wallet/balance/someone"), ("POST", "/api/wallet/transactions/someone"),
    ("POST", "/api/leaderboard"), ("DELETE", "/healthz"), ("POST", "/healthz"), ("PATCH", "/api/leaderboard"),
    ("OPTIONS", DEPOSIT), ("OPTIONS", "/healthz"), ("GET", TOKENS),
])
def test_wrong_method_is_json_405_with_allow(client, method, path):
    response = client.open(path, method=method)
    body = error_json(response, 405, "method_not_allowed")
    assert set(body) == {"error", "message"}
    assert response.headers["Allow"]


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
    ("GET", "/openapi.json", None),
])
def test_every_response_is_json_with_a_request_id(client, method, path, body):
    response = client.open(path, method=method, data=body)
    assert response.mimetype == "application/json", response.headers
    assert isinstance(json.loads(response.data), dict)
    assert re.fullmatch(r"[\x21-\x7e]{1,128}", response.headers["X-Request-ID"])


def test_openapi_route_serves_the_file(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    with open("openapi.json", "rb") as f:
        assert response.data == f.read()


# -- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("balance, amount", [(0, 1), (100, 101), (1000, INT64_MAX)])
def test_withdraw_more_than_balance_is_409(client, uid, balance, amount):
    if balance:
        deposit(client, uid, balance)
    before = state(client, uid)
    body = ok_json(post(client, WITHDRAW, {"user_id": uid, "amount": amount}), 409)
    assert body == {"error": "insufficient_funds", "message": "not enough money", "balance": balance}
    assert state(client, uid) == before


def test_deposit_over_int64_max_is_409(client, uid):
    deposit(client, uid, INT64_MAX)
    before = state(client, uid)
    body = error_json(post(client, DEPOSIT, {"user_id": uid, "amount": 1}), 409, "balance_limit_exceeded")
    assert set(body) == {"error", "message"}
    assert state(client, uid) == before and before[0] == INT64_MAX


@pytest.mark.parametrize("balance, bet", [(0, 1), (100, 101), (500, INT64_MAX)])
def test_outcome_with_bet_over_balance_is_409_and_changes_nothing(client, uid, balance, bet):
    if balance:
        deposit(client, uid, balance)
    before = state(client, uid)
    response = post(client, OUTCOMES, {"user_id": uid, "game": "slots", "bet": bet, "payout": 10**6})
    body = ok_json(response, 409)
    assert body == {"error": "insufficient_funds", "message": "not enough money", "balance": balance}
    assert state(client, uid) == before and before[2] == []


def test_outcome_over_int64_max_is_409_and_changes_nothing(client, uid):
    deposit(client, uid, INT64_MAX - 10)
    before = state(client, uid)
    response = post(client, OUTCOMES, {"user_id": uid, "game": "slots", "bet": 5, "payout": 16})
    error_json(response, 409, "balance_limit_exceeded")
    assert state(client, uid) == before


def test_net_winnings_beyond_int64_are_409(client, uid):
    deposit(client, uid, INT64_MAX)
    outcome(client, uid, INT64_MAX, 0)  # net winnings at -INT64_MAX
    deposit(client, uid, INT64_MAX)
    before = state(client, uid)
    body = error_json(post(client, OUTCOMES, {"user_id": uid, "game": "g", "bet": 2, "payout": 0}), 409,
                      "balance_limit_exceeded")
    assert "net winnings" in body["message"]
    assert state(client, uid) == before
    assert before[2] == [{"rank": 1, "user_id": uid, "net_winnings": -INT64_MAX}]


def test_outcome_of_zero_bet_and_zero_payout_counts_as_played(client, uid):
    deposit(client, uid, 300)
    before = transactions_of(client, uid)
    body = outcome(client, uid, 0, 0)
    assert {k: v for k, v in body.items() if k != "outcome_id"} == {
        "user_id": uid, "game": "slots", "bet": 0, "payout": 0, "net": 0, "balance": 300}
    assert transactions_of(client, uid) == before
    assert leaderboard(client) == [{"rank": 1, "user_id": uid, "net_winnings": 0}]


# -- game outcomes and the leaderboard --------------------------------------------------------------------


@pytest.mark.parametrize("bet, payout", [(100, 250), (100, 0), (0, 50), (300, 100), (1000, 1000), (1000, 0)])
def test_outcome_writes_bet_then_win(client, uid, bet, payout):
    start = deposit(client, uid, 1000)
    body = outcome(client, uid, bet, payout, game="blackjack-21_v2")
    assert body["game"] == "blackjack-21_v2"
    assert body["net"] == payout - bet
    assert body["balance"] == 1000 - bet + payout == balance_of(client, uid)
    expected = []  # newest first: the win (written after the bet), then the bet, then the deposit
    if payout:
        expected.append(("win", payout, 1000 - bet + payout))
    if bet:
        expected.append(("bet", bet, 1000 - bet))
    expected.append(("deposit", 1000, 1000))
    txs = transactions_of(client, uid)
    assert [(t["type"], t["amount"], t["balance"]) for t in txs] == expected
    assert txs[-1]["transaction_id"] == start["transaction_id"]
    assert len({t["transaction_id"] for t in txs}) == len(txs)


def test_outcome_ids_differ(client, uid):
    deposit(client, uid, 100)
    assert len({outcome(client, uid, 1, 1)["outcome_id"] for _ in range(5)}) == 5


def test_leaderboard_order_ties_cut_and_ranks(client):
    assert ok_json(client.get("/api/leaderboard")) == {"leaderboard": []}
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
        deposit(client, int(user) if user.isdigit() else user, 2000)
        for bet, payout in plays:
            outcome(client, int(user) if user.isdigit() else user, bet, payout)
    nets = {user: sum(p - b for b, p in plays) for user, plays in rounds.items()}
    ranked = sorted(nets.items(), key=lambda item: (-item[1], item[0]))[:10]
    expected = [{"rank": i, "user_id": u, "net_winnings": n} for i, (u, n) in enumerate(ranked, start=1)]
    assert leaderboard(client) == expected
    assert [row["user_id"] for row in expected][:4] == ["carol", "42", "alice", "bob"]
    assert "ivan" not in [row["user_id"] for row in expected]
    # A player outside the top 10 climbs in; the last one falls out.
    outcome(client, "ivan", 0, 2000)
    nets["ivan"] += 2000
    ranked = sorted(nets.items(), key=lambda item: (-item[1], item[0]))[:10]
    board = leaderboard(client)
    assert board == [{"rank": i, "user_id": u, "net_winnings": n} for i, (u, n) in enumerate(ranked, start=1)]
    assert board[0] == {"rank": 1, "user_id": "ivan", "net_winnings": 1000}
    assert len(board) == 10


# -- idempotency ---------------------------------------------------------------------------------------


def idem(key):
    return {"Idempotency-Key": key}


def _payload(path, uid):
    return {"user_id": uid, "amount": 100} if path != OUTCOMES else {
        "user_id": uid, "game": "slots", "bet": 100, "payout": 300}


@pytest.mark.parametrize("path", POST_ROUTES)
def test_replay_returns_the_same_answer_and_changes_nothing(client, uid, path):
    deposit(client, uid, 1000)
    payload = _payload(path, uid)
    first = post(client, path, payload, headers=idem("k1"))
    first_body = ok_json(first)
    assert "Idempotent-Replayed" not in first.headers
    after = state(client, uid)
    for _ in range(3):
        again = post(client, path, payload, headers=idem("k1"))
        assert ok_json(again) == first_body
        assert again.headers.get("Idempotent-Replayed") == "true"
    assert state(client, uid) == after


def test_outcome_replay_does_not_count_twice_on_the_leaderboard(client, uid):
    deposit(client, uid, 1000)
    payload = {"user_id": uid, "game": "slots", "bet": 100, "payout": 350}
    first = ok_json(post(client, OUTCOMES, payload, headers=idem("round-1")))
    replay = post(client, OUTCOMES, payload, headers=idem("round-1"))
    assert ok_json(replay) == first and replay.headers.get("Idempotent-Replayed") == "true"
    assert leaderboard(client) == [{"rank": 1, "user_id": uid, "net_winnings": 250}]
    assert [t["type"] for t in transactions_of(client, uid)] == ["win", "bet", "deposit"]


@pytest.mark.parametrize("first_path, second_path, second_body", [
    (DEPOSIT, DEPOSIT, {"amount": 101}),
    (DEPOSIT, DEPOSIT, {"amount": 100, "user_id": "someone-else"}),
    (DEPOSIT, DEPOSIT, {"extra": 1}),
    (DEPOSIT, WITHDRAW, {}),
    (WITHDRAW, DEPOSIT, {}),
    (DEPOSIT, OUTCOMES, {"game": "slots", "bet": 0, "payout": 0}),
])
def test_same_key_with_another_request_is_422(client, uid, first_path, second_path, second_body):
    deposit(client, uid, 1000)
    payload = {"user_id": uid, "amount": 100}
    first_body = ok_json(post(client, first_path, payload, headers=idem("k")))
    after = state(client, uid)
    response = post(client, second_path, {**payload, **second_body}, headers=idem("k"))
    body = error_json(response, 422, "idempotency_key_reused")
    assert set(body) == {"error", "message"}
    assert "Idempotent-Replayed" not in response.headers
    assert state(client, uid) == after
    # The first request is still the one remembered.
    again = post(client, first_path, payload, headers=idem("k"))
    assert ok_json(again) == first_body and again.headers.get("Idempotent-Replayed") == "true"


def test_same_json_with_other_spacing_and_key_order_is_a_replay(client, uid):
    first = ok_json(post(client, DEPOSIT, raw=f'{{"user_id":"{uid}","amount":250}}', headers=idem("k")))
    for raw in (f'{{ "amount" : 250 ,\n\t"user_id" : "{uid}" }}', f'  {{"amount":250,"user_id":"{uid}"}}\n'):
        again = post(client, DEPOSIT, raw=raw, headers=idem("k"))
        assert ok_json(again) == first
        assert again.headers.get("Idempotent-Replayed") == "true"
    assert balance_of(client, uid) == 250
    assert len(transactions_of(client, uid)) == 1


def test_trailing_slash_is_the_same_endpoint_for_idempotency(client, uid):
    first = post(client, DEPOSIT, {"user_id": uid, "amount": 3}, headers=idem("slash"))
    again = post(client, DEPOSIT + "/", {"user_id": uid, "amount": 3}, headers=idem("slash"))
    assert ok_json(first) == ok_json(again) and again.headers.get("Idempotent-Replayed") == "true"
    assert balance_of(client, uid) == 3


@pytest.mark.parametrize("key", ["", "k" * 256, "caf\u00e9", "tab\there"],
                         ids=["empty", "256 chars", "non-ascii", "tab"])
@pytest.mark.parametrize("path", POST_ROUTES)
def test_bad_idempotency_key_is_400_and_changes_nothing(client, uid, key, path):
    deposit(client, uid, 1000)
    before = state(client, uid)
    response = post(client, path, raw=json.dumps(_payload(path, uid)), headers={"Idempotency-Key": key})
    body = error_json(response, 400, "invalid_request")
    assert "idempotency" in body["message"].lower(), body
    assert state(client, uid) == before


@pytest.mark.parametrize("length", [1, 255])
def test_idempotency_key_of_1_and_255_characters_work(client, uid, length):
    key = ("k" + uuid.uuid4().hex * 8)[:length]
    first = post(client, DEPOSIT, {"user_id": uid, "amount": 10}, headers=idem(key))
    assert ok_json(first)["balance"] == 10
    again = post(client, DEPOSIT, {"user_id": uid, "amount": 10}, headers=idem(key))
    assert ok_json(again) == json.loads(first.data) and again.headers.get("Idempotent-Replayed") == "true"
    assert balance_of(client, uid) == 10


def test_a_400_is_not_remembered(client, uid):
    error_json(post(client, DEPOSIT, {"user_id": uid, "amount": -5}, headers=idem("k")), 400, "invalid_request")
    error_json(post(client, DEPOSIT, raw="{", headers=idem("k")), 400, "invalid_request")
    response = post(client, DEPOSIT, {"user_id": uid, "amount": 40}, headers=idem("k"))
    assert ok_json(response)["balance"] == 40
    assert "Idempotent-Replayed" not in response.headers
    assert balance_of(client, uid) == 40


def test_a_409_is_remembered(client, uid):
    payload = {"user_id": uid, "amount": 500}
    first = post(client, WITHDRAW, payload, headers=idem("k"))
    assert ok_json(first, 409) == {"error": "insufficient_funds", "message": "not enough money", "balance": 0}
    deposit(client, uid, 1000)
    before = state(client, uid)
    replay = post(client, WITHDRAW, payload, headers=idem("k"))
    assert ok_json(replay, 409) == json.loads(first.data)
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert state(client, uid) == before and before[0] == 1000


def test_concurrent_requests_with_one_key_apply_once(app, uid):
    client = app.test_client()
    deposit(client, uid, 1000)
    start = threading.Barrier(20)

    def send(_):
        start.wait(timeout=10)
        return post(app.test_client(), WITHDRAW, {"user_id": uid, "amount": 300}, headers=idem("k"))

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(send, range(20)))
    bodies = [ok_json(r) for r in responses]
    assert all(body == bodies[0] for body in bodies) and bodies[0]["balance"] == 700
    assert sum("Idempotent-Replayed" not in r.headers for r in responses) == 1
    assert [t["type"] for t in transactions_of(client, uid)] == ["withdraw", "deposit"]


# -- store failures -------------------------------------------------------------------------------------


class _UnreachableStore(MemoryStore):
    """A store whose backend is gone: every call raises StoreUnavailable, as RedisStore does."""

    def healthy(self):
        return False

    def _gone(self, *args, **kwargs):
        raise StoreUnavailable("the store cannot be reached")

    balance = transactions = leaderboard = deposit = withdraw = settle = _gone


@pytest.fixture
def unreachable(hub):
    return create_app(_UnreachableStore(event_sink(hub)), hub).test_client()


@pytest.mark.parametrize("method, path, body", [
    ("POST", DEPOSIT, {"user_id": "a", "amount": 1}),
    ("POST", WITHDRAW, {"user_id": "a", "amount": 1}),
    ("POST", OUTCOMES, {"user_id": "a", "game": "g", "bet": 0, "payout": 0}),
    ("GET", "/api/wallet/balance/a", None),
    ("GET", "/api/wallet/transactions/a", None),
    ("GET", "/api/leaderboard", None),
])
def test_store_unavailable_is_503_envelope(unreachable, method, path, body):
    response = unreachable.open(path, method=method, json=body, headers=idem("k") if body else None)
    assert error_json(response, 503, "unavailable") == {"error": "unavailable",
                                                         "message": "the store cannot be reached"}


def test_healthz_is_503_while_the_store_is_unreachable(unreachable):
    assert ok_json(unreachable.get("/healthz"), 503) == {"status": "unavailable"}


def test_a_bug_is_a_bare_500(hub, caplog):
    class Broken(MemoryStore):
        def balance(self, user_id):
            raise KeyError("internal detail")

    client = create_app(Broken(event_sink(hub)), hub).test_client()
    with caplog.at_level(logging.ERROR, "wallet.http"):
        body = error_json(client.get("/api/wallet/balance/a"), 500, "internal_error")
    assert body == {"error": "internal_error", "message": "internal server error"}
    assert any(r.exc_info for r in caplog.records)


# -- request ids and log lines ---------------------------------------------------------------------------


def _request_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "wallet.http"]


@pytest.mark.parametrize("method, path, body, status", [
    ("GET", "/healthz", None, 200),
    ("GET", "/api/wallet/balance/someone", None, 200),
    ("POST", DEPOSIT, '{"user_id": "log-user", "amount": 5}', 200),
    ("POST", DEPOSIT, '{"user_id": "log-user", "amount": 0}', 400),
    ("POST", WITHDRAW, '{"user_id": "nobody-has-this", "amount": 5}', 409),
    ("GET", "/no/such/route", None, 404),
    ("DELETE", "/healthz", None, 405),
])
def test_request_id_is_echoed_and_one_line_logged(client, caplog, method, path, body, status):
    rid = "rid-" + uuid.uuid4().hex
    with caplog.at_level(logging.INFO, "wallet.http"):
        response = client.open(path, method=method, data=body, headers={"X-Request-ID": rid})
    assert response.status_code == status
    assert response.headers["X-Request-ID"] == rid
    records = [r for r in caplog.records if r.name == "wallet.http"]
    assert len(records) == 1
    assert re.fullmatch(rf"{method} {re.escape(path)} {status} \d+\.\dms", records[0].getMessage())
    assert records[0].status == status and records[0].method == method


def test_request_id_is_made_up_when_missing_or_not_printable(client):
    ids = {client.get("/healthz").headers["X-Request-ID"] for _ in range(3)}
    assert len(ids) == 3
    for bad in ("", "a b", "x" * 129, "caf\u00e9", "a\x1bb"):
        rid = client.get("/healthz", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
        assert rid != bad and re.fullmatch(r"[\x21-\x7e]{1,128}", rid)


def test_client_text_in_a_log_line_is_escaped(client, caplog):
    """Control characters in the method, path, query and X-Request-ID never reach a log line raw."""
    with caplog.at_level(logging.INFO, "wallet.http"):
        client.open("/api/wallet/balance/a%0D%0Ab%1B%5B31m%00?limit=%0A&x=\x1b\x7f", method="GE\x1bT\x00",
                    environ_overrides={"HTTP_X_REQUEST_ID": "ok\r\nforged: yes"})
        client.get("/api/wallet/balance/a%0D%0A2026-01-01 INFO forged line")
    lines = _request_lines(caplog)
    assert len(lines) == 2
    for line in lines:
        assert line.isprintable(), repr(line)
    assert lines[0].startswith("GE\\x1bT\\x00 /api/wallet/balance/a\\r\\nb\\x1b[31m\\x00?limit=%0A&x=\\x1b\\x7f 40")
    assert "forged" not in lines[0]  # the bad X-Request-ID was replaced, not logged
    assert lines[1].startswith("GET /api/wallet/balance/a\\r\\n2026-01-01 INFO forged line 400")
    formatter = logging.Formatter("%(message)s")
    for record in caplog.records:
        assert "\n" not in formatter.format(record)


def test_query_tokens_are_not_logged(client, caplog):
    with caplog.at_level(logging.INFO, "wallet.http"):
        client.get("/api/leaderboard?token=eyJhbGciOi.secret.sig&x=1")
    (line,) = _request_lines(caplog)
    assert "secret" not in line and "token=***&x=1" in line


@pytest.mark.parametrize("text, expected", [
    ("plain /path?x=1", "plain /path?x=1"),
    ("a\r\nb", "a\\r\\nb"),
    ("\x1b[2J\x00\x07\x7f", "\\x1b[2J\\x00\\x07\\x7f"),
    ("\u0085\u2028\u2029", "\\x85\\u2028\\u2029"),
    ("back\\slash", "back\\\\slash"),
    ("\ud800", "\\ud800"),
    ("caf\u00e9 \U0001f600", "caf\u00e9 \U0001f600"),
])
def test_printable_escapes_every_control_character(text, expected):
    assert logs.printable(text) == expected
    assert logs.printable(text).isprintable()


def test_text_log_format_keeps_a_traceback_on_one_line():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys
        record = logging.LogRecord("x", logging.ERROR, "", 0, "failed %s", ("a\nb",), sys.exc_info())
    record.request_id = None
    line = logs._TextFormatter().format(record)
    assert "\n" not in line and "Traceback" in line and "second line" in line


@pytest.mark.parametrize("fmt", logs.FORMATS)
def test_an_access_line_is_written_as_the_same_record_through_logging_would_be(fmt):
    # logs.access() skips the LogRecord on the serving thread; what it writes must not differ.
    import io
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    quiet = logging.getLogger("wallet.test-access-quiet")
    quiet.setLevel(logging.WARNING)
    stream = io.StringIO()
    logs.setup("INFO", fmt, stream=stream)
    assert len(root.handlers) == 1  # setup()'s own handler only: access() takes its short way
    logger = logging.getLogger("wallet.test-access")
    args = ("POST", "/a\x1b\n\u2028", 200, 1.5, "")  # control characters: one line whichever way
    extra = {"method": "POST", "path": "/a\x1b\n\u2028", "status": 200, "duration_ms": 1.5, "principal": None}
    token = logs.request_id.set("rid-1")
    try:
        logs.access(logger, "%s %s %d %.1fms%s", args, extra)
        logger.info("%s %s %d %.1fms%s", *args, extra=extra)
        logs.access(quiet, "never %s", ("x",), {})  # below the logger's level: nothing
    finally:
        logs.request_id.reset(token)
        logs.stop()
        root.handlers[:], level = saved
        root.setLevel(level)
        quiet.setLevel(logging.NOTSET)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    if fmt == "json":
        fast, slow = (json.loads(line) for line in lines)
        del fast["time"], slow["time"]  # written a moment apart
        assert fast == slow and fast["request_id"] == "rid-1" and "principal" not in fast
    else:
        assert lines[0].split(" ", 2)[2] == lines[1].split(" ", 2)[2]  # all but the date and time
        assert lines[0].endswith(" rid=rid-1") and "wallet.test-access: POST /a\\x1b\\n\\u2028 200 1.5ms" in lines[0]


def test_an_access_line_reaches_other_handlers_as_a_record(caplog):
    # With a handler beside setup()'s (here pytest's), access() takes logging's own way.
    logger = logging.getLogger("wallet.test-access-caplog")
    with caplog.at_level(logging.INFO, logger.name):
        logs.access(logger, "%s %d", ("GET", 200), {"status": 200})
    (record,) = [r for r in caplog.records if r.name == logger.name]
    assert record.getMessage() == "GET 200" and record.status == 200


# -- the Origin rule (CONTRACT.md section 3) ----------------------------------------------------------------


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:8081", "https://localhost",
                                    "not a url", ""])
@pytest.mark.parametrize("path", POST_ROUTES + [TOKENS])
def test_cross_origin_write_is_403_and_changes_nothing(client, store, path, origin):
    body = {"user_id": "victim", "amount": 5, "game": "g", "bet": 0, "payout": 5}
    response = post(client, path, raw=json.dumps(body), content_type="text/plain",
                    headers={"Origin": origin, "Host": "localhost:8080", "Idempotency-Key": "k"})
    error_json(response, 403, "forbidden")
    assert store.totals() == (0, 0)
    # Refused before idempotency: the same key from this service's own page is processed afresh.
    same = post(client, DEPOSIT, body, headers={"Origin": "http://localhost:8080", "Host": "localhost:8080",
                                                "Idempotency-Key": "k"})
    assert "Idempotent-Replayed" not in same.headers and ok_json(same)["balance"] == 5


@pytest.mark.parametrize("origin, host", [
    (None, "localhost:8080"),                              # curl and servers send no Origin
    ("http://localhost:8080", "localhost:8080"),           # the service's own page (the dashboard)
    ("http://LOCALHOST:8080", "localhost:8080"),
    ("http://wallet.example", "wallet.example"),           # default port on both sides
    ("https://wallet.example", "wallet.example"),          # behind a TLS-terminating proxy
    ("http://[::1]:8080", "[::1]:8080"),
])
def test_same_origin_and_originless_writes_pass(client, uid, origin, host):
    headers = {"Host": host, **({"Origin": origin} if origin is not None else {})}
    assert ok_json(post(client, DEPOSIT, {"user_id": uid, "amount": 5}, headers=headers))["balance"] == 5


def test_reads_are_not_affected_by_origin(client, uid):
    assert ok_json(client.get(f"/api/wallet/balance/{uid}", headers={"Origin": "http://evil.example"}))


def test_allowed_origins_may_write(store, hub, uid):
    client = create_app(store, hub, allowed_origins=["https://Casino.example:443", "null"]).test_client()
    for origin in ("https://casino.example", "null"):
        response = post(client, DEPOSIT, {"user_id": uid, "amount": 1}, headers={"Origin": origin})
        assert response.status_code == 200
    error_json(post(client, DEPOSIT, {"user_id": uid, "amount": 1}, headers={"Origin": "http://casino.example"}),
               403, "forbidden")


def test_origin_rule_takes_an_environ_or_headers():
    import origins
    allowed = origins.parse_allowed("https://casino.example, http://localhost:3000")
    assert allowed == {"https://casino.example", "http://localhost:3000"}
    environ = {"REQUEST_METHOD": "GET", "HTTP_HOST": "svc:8080", "HTTP_ORIGIN": "http://svc:8080"}
    assert origins.origin_allowed(environ, allowed)
    assert not origins.origin_allowed({**environ, "HTTP_ORIGIN": "http://svc:9090"}, allowed)
    assert origins.origin_allowed({**environ, "HTTP_ORIGIN": "http://localhost:3000"}, allowed)
    assert origins.origin_allowed({"REQUEST_METHOD": "GET", "HTTP_HOST": "svc"}, ())
    assert origins.origin_allowed({"Origin": "https://casino.example", "Host": "svc"}, allowed)
    assert not origins.origin_allowed({"origin": "null", "host": "svc"}, allowed)
    for bad in ("casino.example", "ftp://x", "https://x/path", "https://user@x", "https://x:99999"):
        with pytest.raises(ValueError):
            origins.parse_allowed(bad)


# -- authentication (CONTRACT.md section 8) -----------------------------------------------------------------

OPERATOR_KEY = "op-key-0123456789abcdef0123456789abcdef"
SECRET = "player-token-secret-0123456789abcdef-xyz"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}


class _Clock:
    """The service's clock, moved by the test; it starts at the real time, which PyJWT checks `iat` against."""

    def __init__(self):
        self.now = float(int(time.time()))

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return _Clock()


@pytest.fixture
def secured(store, hub, clock):
    from auth import Auth
    return create_app(store, hub, Auth([OPERATOR_KEY], SECRET, clock=clock)).test_client()


def _token(secured, user, ttl=None):
    body = {"user_id": user} if ttl is None else {"user_id": user, "ttl_seconds": ttl}
    return ok_json(post(secured, TOKENS, body, headers=OPERATOR))


def _as(token):
    return {"Authorization": f"Bearer {token}"}


API_CALLS = [  # method, path, body: every /api route
    ("POST", DEPOSIT, {"user_id": "p1", "amount": 5}),
    ("POST", WITHDRAW, {"user_id": "p1", "amount": 5}),
    ("POST", OUTCOMES, {"user_id": "p1", "game": "g", "bet": 0, "payout": 5}),
    ("GET", "/api/wallet/balance/p1", None),
    ("GET", "/api/wallet/transactions/p1", None),
    ("GET", "/api/leaderboard", None),
    ("POST", TOKENS, {"user_id": "p1"}),
]


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer wrong-key-0123456789abcdef0123456789"},
                                     {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"},
                                     {"Authorization": f"Bearer {OPERATOR_KEY} extra"},
                                     {"Authorization": "Bearer a.b.c"}],
                         ids=["missing", "unknown", "other scheme", "empty", "two words", "bad token"])
@pytest.mark.parametrize("method, path, body", API_CALLS, ids=[p for _, p, _ in API_CALLS])
def test_api_without_a_valid_credential_is_401(secured, store, method, path, body, headers):
    response = secured.open(path, method=method, json=body, headers={**(headers or {}), "Idempotency-Key": "k"})
    error_json(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert OPERATOR_KEY not in response.get_data(as_text=True)
    assert store.totals() == (0, 0)


def test_refused_before_validation_and_idempotency(secured, store):
    error_json(post(secured, DEPOSIT, raw="{not json"), 401, "unauthorized")
    error_json(post(secured, DEPOSIT, raw="x" * (MAX_BODY + 10)), 401, "unauthorized")
    error_json(post(secured, DEPOSIT, {"user_id": "p1", "amount": 5}, headers=idem("k")), 401, "unauthorized")
    first = post(secured, DEPOSIT, {"user_id": "p1", "amount": 5}, headers={**OPERATOR, **idem("k")})
    assert ok_json(first)["balance"] == 5 and "Idempotent-Replayed" not in first.headers


@pytest.mark.parametrize("path", ["/healthz", "/openapi.json", "/"])
def test_open_routes_need_no_credential(secured, path):
    assert secured.get(path).status_code == 200


@pytest.mark.parametrize("method, path, body", API_CALLS, ids=[p for _, p, _ in API_CALLS])
def test_operator_may_do_everything(secured, method, path, body):
    if path == WITHDRAW:
        deposit_ok = post(secured, DEPOSIT, {"user_id": "p1", "amount": 5}, headers=OPERATOR)
        assert deposit_ok.status_code == 200
    assert secured.open(path, method=method, json=body, headers=OPERATOR).status_code == 200


def test_player_token_reads_its_own_user_and_the_leaderboard_only(secured, store):
    ok_json(post(secured, DEPOSIT, {"user_id": "p1", "amount": 50}, headers=OPERATOR))
    player = _as(_token(secured, "p1")["token"])
    assert ok_json(secured.get("/api/wallet/balance/p1", headers=player)) == {"user_id": "p1", "balance": 50}
    assert len(ok_json(secured.get("/api/wallet/transactions/p1", headers=player))["transactions"]) == 1
    assert ok_json(secured.get("/api/leaderboard", headers=player)) == {"leaderboard": []}
    for path in ("/api/wallet/balance/p2", "/api/wallet/transactions/p2", "/api/wallet/balance/a%20b"):
        error_json(secured.get(path, headers=player), 403, "forbidden")
    for method, path, body in API_CALLS:
        if method == "POST":
            response = secured.post(path, json=body, headers={**player, **idem("pk")})
            error_json(response, 403, "forbidden")
    assert store.totals() == (50, 1)
    # Refused writes were not remembered under their key.
    response = post(secured, DEPOSIT, {"user_id": "p1", "amount": 5}, headers={**OPERATOR, **idem("pk")})
    assert "Idempotent-Replayed" not in response.headers and ok_json(response)["balance"] == 55


def test_minted_token_body_ttl_and_expiry(secured, clock):
    body = _token(secured, 42)
    assert set(body) == {"token", "user_id", "expires_at"} and body["user_id"] == "42"
    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert expires.timestamp() == clock.now + 3600  # the default lifetime
    # PyJWT also checks `exp` against the real clock: a few seconds of lifetime keep a slow run valid.
    short = _token(secured, "p1", ttl=3)["token"]
    assert secured.get("/api/wallet/balance/p1", headers=_as(short)).status_code == 200
    clock.now += 3
    error_json(secured.get("/api/wallet/balance/p1", headers=_as(short)), 401, "unauthorized")
    assert _token(secured, "p1", ttl=86400)["user_id"] == "p1"


@pytest.mark.parametrize("body, field", [
    ({"user_id": "p1", "ttl_seconds": 0}, "ttl_seconds"), ({"user_id": "p1", "ttl_seconds": 86401}, "ttl_seconds"),
    ({"user_id": "p1", "ttl_seconds": "60"}, "ttl_seconds"), ({"user_id": "p1", "ttl_seconds": True}, "ttl_seconds"),
    ({"user_id": "p1", "ttl_seconds": 1.5}, "ttl_seconds"), ({"user_id": "p1", "ttl_seconds": None}, "ttl_seconds"),
    ({"ttl_seconds": 60}, "user_id"), ({"user_id": "a b"}, "user_id"), ({"user_id": 0}, "user_id"),
])
def test_bad_token_request_is_400_naming_the_field(secured, body, field):
    assert field in error_json(post(secured, TOKENS, body, headers=OPERATOR), 400, "invalid_request")["message"]


def test_tokens_are_404_without_a_secret(store, hub):
    from auth import Auth
    client = create_app(store, hub, Auth([OPERATOR_KEY])).test_client()
    error_json(post(client, TOKENS, {"user_id": "p1"}, headers=OPERATOR), 404, "not_found")


def test_cross_origin_write_is_403_even_for_an_operator(secured, store):
    response = post(secured, DEPOSIT, {"user_id": "p1", "amount": 5},
                    headers={**OPERATOR, "Origin": "http://evil.example"})
    error_json(response, 403, "forbidden")
    assert store.totals() == (0, 0)


def test_log_line_names_the_principal_never_the_credential(secured, caplog):
    with caplog.at_level(logging.INFO, "wallet.http"):
        secured.get("/api/leaderboard", headers=OPERATOR)
        secured.get("/api/leaderboard", headers={"Authorization": "Bearer wrong"})
    lines = _request_lines(caplog)
    assert re.search(r"GET /api/leaderboard 200 \S+ms key:[0-9a-f]{8}$", lines[0]), lines
    assert all(OPERATOR_KEY not in line and "wrong" not in line for line in lines)


# -- settings (CONTRACT.md section 1): in-process; test_process.py runs the real process -------------------


def _settings(argv, env=None, capsys=None):
    import settings
    return settings.parse_settings(argv, env or {})


@pytest.mark.parametrize("args, env, name", [
    (["--http-port", "abc"], {}, "--http-port"),
    (["--http-port", "70000"], {}, "--http-port"),
    (["--grpc-port", "-1"], {}, "--grpc-port"),
    (["--log-level", "LOUD"], {}, "--log-level"),
    (["--log-format", "xml"], {}, "--log-format"),
    (["--max-connections", "0"], {}, "--max-connections"),
    (["--max-connections", "many"], {}, "--max-connections"),
    (["--allowed-origins", "casino.example"], {}, "--allowed-origins"),
    (["--redis-url", "http://localhost:6379"], {}, "--redis-url"),
    (["--redis-url", "redis://localhost:notaport/0"], {}, "--redis-url"),
    (["--redis-prefix", "has space"], {}, "--redis-prefix"),
    ([], {"HTTP_PORT": "eighty"}, "HTTP_PORT"),
    ([], {"MAX_CONNECTIONS": "-5"}, "MAX_CONNECTIONS"),
    ([], {"ALLOWED_ORIGINS": "https://a.example/path"}, "ALLOWED_ORIGINS"),
    ([], {"REDIS_URL": "redis://:pw@host:port"}, "REDIS_URL"),
    ([], {"REDIS_PREFIX": ""}, "REDIS_PREFIX"),
    (["--no-such-flag"], {}, "--no-such-flag"),
    (["--redis"], {}, "--redis"),  # no abbreviations: a typo is an error, not another flag
])
def test_bad_setting_exits_2_with_one_line_naming_it(capsys, args, env, name):
    with pytest.raises(SystemExit) as exit_info:
        _settings(args, env)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args, env", [
    (["--redis-url", "redis://:hunter2-secret@redis.internal:notaport/0"], {}),
    ([], {"REDIS_URL": "ftp://user:hunter2-secret@redis.internal:6379/0"}),
    (["--redis-ur", "redis://:hunter2-secret@redis.internal:6379/0"], {}),
    (["--redis-url", "redis://:hunter2-secret@h/0", "stray"], {}),
])
def test_a_redis_password_is_never_printed(capsys, args, env):
    with pytest.raises(SystemExit):
        _settings(args, env)
    err = capsys.readouterr().err
    assert "hunter2" not in err and err.strip()


def test_settings_defaults_flags_and_variables():
    import http_server
    import settings
    s = _settings([])
    assert (s.host, s.http_port, s.grpc_port, s.log_level, s.log_format) == ("0.0.0.0", 8080, 9090, "INFO", "text")
    assert s.max_connections == http_server.DEFAULT_MAX_CONNECTIONS
    assert (s.allowed_origins, s.redis_url, s.redis_prefix) == (frozenset(), None, "wallet:")
    env = {"HTTP_PORT": "1", "MAX_CONNECTIONS": "7", "REDIS_URL": "redis://:pw@r:6380/2", "REDIS_PREFIX": "t:",
           "ALLOWED_ORIGINS": "https://a.example,https://b.example:8443", "LOG_LEVEL": "debug"}
    s = _settings(["--http-port", "2", "--redis-prefix", "flag:"], env)
    assert (s.http_port, s.max_connections, s.redis_prefix, s.log_level) == (2, 7, "flag:", "DEBUG")
    assert s.redis_url == "redis://:pw@r:6380/2"
    assert s.allowed_origins == {"https://a.example", "https://b.example:8443"}
    assert _settings([], {"REDIS_URL": ""}).redis_url is None
    assert settings.redact_url("redis://:pw@r:6380/2") == "redis://***@r:6380/2"
    assert settings.redact_url("rediss://user:pw@r/0") == "rediss://***@r/0"
