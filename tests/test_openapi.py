"""The OpenAPI document (openapi.json) against the app and the running server (CONTRACT.md section 3).

- The file is what `GET /openapi.json` serves, is a valid OpenAPI 3.1 document (schemathesis' own
  validator, plus the JSON Schema 2020-12 meta-schema for every embedded schema), and documents every
  Flask route except the WebSocket `/ws`; every documented operation is a real route.
- Schemathesis generates valid and invalid requests for every operation from the document and sends them
  to the app in-process (WSGI), with authentication on and an operator key: every answer must match the
  document (status documented, JSON content type, body schema, headers), invalid input must be refused
  with a 4xx, valid input accepted, never a 500; requests without the key must get the documented 401.
- Hand-made requests reach the statuses random generation rarely hits (401, 403, 409s, 413, 422, replays)
  and validate those answers against the document too.
- The real `python app.py` serves the file, and answers odd paths with documented JSON errors.
"""

import copy
import json
import re
import uuid
from pathlib import Path

import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from app import create_app
from auth import Auth
from conftest import event_sink
from events import EventHub
from validation import ValidationError, validate_user_id
from wallet_store import MemoryStore

ROOT = Path(__file__).resolve().parent.parent
RAW = (ROOT / "openapi.json").read_bytes()
DOC = json.loads(RAW)
INT64_MAX = 2**63 - 1
TIMEOUT = 10
OPERATOR_KEY = "operator-key-for-the-openapi-tests-0123456789"
PLAYER_TOKEN_SECRET = "player-token-secret-for-the-openapi-tests-0123"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}

# Valid requests may also meet 409 (not enough money, balance limit) and 422 (an Idempotency-Key that an
# earlier generated request already used with another body): both are the contract, not a refusal of valid data.
CONFIG = schemathesis.Config.from_dict({
    "seed": 20260101,
    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "409", "422"]}},
})
schema = schemathesis.openapi.from_dict(copy.deepcopy(DOC), config=CONFIG)


# -- the document itself -------------------------------------------------------------------------------


def test_served_document_is_the_file(server):
    response = requests.get(server.url + "/openapi.json", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    assert response.content == RAW
    assert response.json() == DOC


def test_document_is_valid_openapi_3_1():
    assert DOC["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(copy.deepcopy(DOC)).validate()  # raises on any violation of the 3.1 schema


def _walk(node, path=""):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}/{i}")


def _schemas():
    """Every Schema Object of the document: components/schemas and each `schema` of a parameter, header or body."""
    for name, value in DOC["components"]["schemas"].items():
        yield f"/components/schemas/{name}", value
    for path, node in _walk(DOC):
        if isinstance(node, dict) and isinstance(node.get("schema"), dict):
            yield path + "/schema", node["schema"]


def test_embedded_schemas_are_valid_json_schema_2020_12():
    found = list(_schemas())
    assert len(found) > 20
    for where, value in found:
        try:
            jsonschema_rs.meta.validate({"$schema": "https://json-schema.org/draft/2020-12/schema", **value})
        except jsonschema_rs.ValidationError as exc:
            raise AssertionError(f"{where}: {exc}") from None


def _resolve(pointer):
    node = DOC
    for part in pointer.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_reference_resolves():
    refs = [(path, node["$ref"]) for path, node in _walk(DOC) if isinstance(node, dict) and "$ref" in node]
    assert refs
    for where, target in refs:
        assert target.startswith("#/"), where
        _resolve(target)  # KeyError names the missing part


def _validator(name):
    # The components travel with the schema so that its "#/components/..." references resolve.
    return jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{name}", "components": DOC["components"]})


def test_schema_examples_are_valid():
    for name, value in DOC["components"]["schemas"].items():
        for example in value.get("examples", []):
            _validator(name).validate(example)


@pytest.mark.parametrize("body, valid", [
    ({"error": "insufficient_funds", "message": "not enough money", "balance": 5}, True),
    ({"error": "insufficient_funds", "message": "not enough money"}, False),  # balance is required then
    ({"error": "insufficient_funds", "message": "no", "balance": 5}, False),  # the contract's exact message
    ({"error": "invalid_request", "message": "amount is required"}, True),
    ({"error": "invalid_request", "message": "amount is required", "balance": 5}, False),
    ({"error": "internal_error", "message": "internal server error", "trace": "..."}, False),
    ({"error": "teapot", "message": "?"}, False),
])
def test_error_schema(body, valid):
    assert _validator("Error").is_valid(body) is valid


@pytest.mark.parametrize("value, valid", [
    ("alice", True), ("A-z_09", True), ("x" * 64, True), (42, True), (10**64 - 1, True),
    ("", False), ("x" * 65, False), ("a b", False), ("é", False), ("a\n", False),
    (0, False), (-1, False), (10**64, False), (True, False), (None, False), (1.5, False),
])
def test_user_id_schema_matches_validation(value, valid):
    try:
        validate_user_id(value)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted is valid
    assert _validator("UserIdInput").is_valid(value) is valid


def test_amount_schemas_follow_the_contract():
    amount, stake = _validator("Amount"), _validator("Stake")
    assert amount.is_valid(1) and amount.is_valid(INT64_MAX)
    assert not amount.is_valid(0) and not amount.is_valid(INT64_MAX + 1)
    assert stake.is_valid(0) and not stake.is_valid(-1)
    for bad in ("1", True, None, 1.5):
        assert not amount.is_valid(bad) and not stake.is_valid(bad)


def _flask_app(auth=None):
    hub = EventHub()  # never started: these tests only route, or send requests that publish into its queue
    return create_app(MemoryStore(event_sink(hub)), hub, auth)


@pytest.fixture(scope="module")
def secured():
    """The app with authentication on: an operator key and player tokens."""
    return _flask_app(Auth([OPERATOR_KEY], PLAYER_TOKEN_SECRET))


def _openapi_path(rule):
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def test_every_route_is_documented():
    app = _flask_app()
    rules = [rule for rule in app.url_map.iter_rules() if not rule.endpoint.startswith("websocket")]
    documented = {(path, method.upper()) for path, item in DOC["paths"].items() for method in item}
    for rule in rules:
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            path = _openapi_path(rule.rule)
            if (path, method) in documented:
                continue
            # `/api/wallet/balance/` is the same view with user_id defaulted to "" (answered 400): it is covered
            # when the endpoint's parametrized rule is documented.
            siblings = [other for other in rules if other.endpoint == rule.endpoint and other is not rule
                        and set(rule.defaults or {}) <= set(other.arguments)]
            assert rule.defaults and any((_openapi_path(o.rule), method) in documented for o in siblings), (
                f"{method} {rule.rule} is not documented in openapi.json")


def test_every_documented_operation_is_a_route():
    adapter = _flask_app().url_map.bind("localhost")
    samples = {"user_id": "alice", "filename": "dashboard.html"}
    for path, item in DOC["paths"].items():
        concrete = re.sub(r"\{([^}]+)\}", lambda m: samples[m.group(1)], path)
        for method in item:
            endpoint, _ = adapter.match(concrete, method=method.upper())
            assert not endpoint.startswith("websocket"), path


def test_contract_routes_are_all_there():
    expected = {
        ("/api/wallet/deposit", "post"), ("/api/wallet/withdraw", "post"),
        ("/api/wallet/balance/{user_id}", "get"), ("/api/wallet/transactions/{user_id}", "get"),
        ("/api/games/outcomes", "post"), ("/api/leaderboard", "get"), ("/healthz", "get"),
        ("/openapi.json", "get"), ("/api/auth/player-tokens", "post"),
    }
    assert expected <= {(path, method) for path, item in DOC["paths"].items() for method in item}


# -- the app against the document (schemathesis, in-process) -------------------------------------------


BODY_INTEGERS = ("user_id", "amount", "bet", "payout", "ttl_seconds")


def _integers_spelled_as_integers(case):
    """Write `563.0` as `563` in the integer fields of a generated body.

    JSON Schema counts `563.0` as an integer and schemathesis sends such spellings on purpose; the contract
    refuses them ("a float such as 1.0 ... is invalid"), which no JSON Schema can say. Same value, same
    validity under the schema: only the spelling changes (test_app covers the refusal itself).
    """
    if isinstance(case.body, dict):
        for name in BODY_INTEGERS:
            value = case.body.get(name)
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                case.body[name] = int(value)


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_app_conforms_to_document(case, secured):
    _integers_spelled_as_integers(case)
    case.call_and_validate(app=secured, headers=OPERATOR)


# -- statuses that random generation seldom reaches ----------------------------------------------------


def _call(app, path, method, *, headers=None, path_parameters=None, query=None, **body):
    """Send one hand-made request of a documented operation and validate the answer against the document."""
    case = schema[path][method].Case(headers=headers, path_parameters=path_parameters, query=query, **body)
    return case.call_and_validate(app=app)


def _header(response, name):
    values = response.headers.get(name.lower())  # schemathesis' Response: lower-case names, lists of values
    return values[0] if values else None


def _uid():
    return "u" + uuid.uuid4().hex[:16]


def test_documented_conflicts_and_replays(secured):
    user, key = _uid(), "k-" + uuid.uuid4().hex
    r = _call(secured, "/api/wallet/withdraw", "POST", body={"user_id": user, "amount": 5}, headers=OPERATOR)
    assert (r.status_code, r.json()) == (409, {"error": "insufficient_funds", "message": "not enough money",
                                               "balance": 0})
    r = _call(secured, "/api/wallet/deposit", "POST", body={"user_id": user, "amount": INT64_MAX},
              headers={"Idempotency-Key": key, **OPERATOR})
    assert r.status_code == 200 and _header(r, "Idempotent-Replayed") is None
    r = _call(secured, "/api/wallet/deposit", "POST", body={"amount": INT64_MAX, "user_id": user},
              headers={"Idempotency-Key": key, **OPERATOR})
    assert r.status_code == 200 and _header(r, "Idempotent-Replayed") == "true"
    r = _call(secured, "/api/wallet/deposit", "POST", body={"user_id": user, "amount": 1}, headers=OPERATOR)
    assert r.status_code == 409 and r.json()["error"] == "balance_limit_exceeded"
    r = _call(secured, "/api/games/outcomes", "POST", body={"user_id": user, "game": "g", "bet": 0, "payout": 1},
              headers=OPERATOR)
    assert r.status_code == 409 and r.json()["error"] == "balance_limit_exceeded"
    r = _call(secured, "/api/games/outcomes", "POST", body={"user_id": user, "game": "g", "bet": INT64_MAX,
                                                            "payout": 0}, headers=OPERATOR)
    assert r.status_code == 200 and r.json()["net"] == -INT64_MAX
    r = _call(secured, "/api/games/outcomes", "POST", body={"user_id": user, "game": "g", "bet": 1, "payout": 0},
              headers=OPERATOR)
    assert r.status_code == 409 and r.json()["error"] == "insufficient_funds"
    r = _call(secured, "/api/wallet/withdraw", "POST", body={"user_id": user, "amount": 1},
              headers={"Idempotency-Key": key, **OPERATOR})
    assert r.status_code == 422 and r.json()["error"] == "idempotency_key_reused"
    r = _call(secured, "/api/wallet/transactions/{user_id}", "GET", path_parameters={"user_id": user},
              query={"limit": 1000}, headers=OPERATOR)
    assert [t["type"] for t in r.json()["transactions"]] == ["bet", "deposit"]
    _call(secured, "/api/leaderboard", "GET", headers=OPERATOR)


def test_documented_bad_requests(secured):
    user = _uid()
    for path, body in [
        ("/api/wallet/deposit", {"user_id": user, "amount": 1.0}),
        ("/api/wallet/deposit", {"user_id": user}),
        ("/api/wallet/withdraw", {"user_id": "", "amount": 1}),
        ("/api/games/outcomes", {"user_id": user, "game": "no spaces", "bet": 0, "payout": 0}),
        ("/api/games/outcomes", [1, 2]),
        ("/api/auth/player-tokens", {"user_id": user, "ttl_seconds": 0}),
    ]:
        r = _call(secured, path, "POST", body=body, headers=OPERATOR)
        assert r.status_code == 400, (path, body, r.text)
    r = _call(secured, "/api/wallet/deposit", "POST", body={"user_id": user, "amount": 1},
              headers={"Idempotency-Key": "x" * 256, **OPERATOR})
    assert r.status_code == 400
    r = _call(secured, "/api/wallet/transactions/{user_id}", "GET", path_parameters={"user_id": user},
              query={"limit": 0}, headers=OPERATOR)
    assert r.status_code == 400
    r = _call(secured, "/api/wallet/balance/{user_id}", "GET", path_parameters={"user_id": "x" * 65},
              headers=OPERATOR)
    assert r.status_code == 400


def test_documented_payload_too_large(secured):
    body = {"user_id": _uid(), "amount": 1, "padding": "x" * (64 * 1024)}
    r = _call(secured, "/api/wallet/deposit", "POST", body=body, headers=OPERATOR)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


def test_documented_authentication_refusals(secured):
    user = _uid()
    for headers in (None, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic eDp5"}):
        r = _call(secured, "/api/wallet/balance/{user_id}", "GET", path_parameters={"user_id": user},
                  headers=headers)
        assert r.status_code == 401 and _header(r, "WWW-Authenticate") == "Bearer"
    r = _call(secured, "/api/auth/player-tokens", "POST", body={"user_id": user, "ttl_seconds": 60},
              headers=OPERATOR)
    assert r.status_code == 200 and r.json()["user_id"] == user
    player = {"Authorization": f"Bearer {r.json()['token']}"}
    r = _call(secured, "/api/wallet/balance/{user_id}", "GET", path_parameters={"user_id": user}, headers=player)
    assert r.status_code == 200
    r = _call(secured, "/api/wallet/balance/{user_id}", "GET", path_parameters={"user_id": "other"}, headers=player)
    assert r.status_code == 403
    r = _call(secured, "/api/wallet/deposit", "POST", body={"user_id": user, "amount": 1}, headers=player)
    assert r.status_code == 403
    r = _call(secured, "/api/wallet/deposit", "POST", body={"user_id": user, "amount": 1},
              headers={"Origin": "https://elsewhere.example", **OPERATOR})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = _call(_flask_app(Auth()), "/api/auth/player-tokens", "POST", body={"user_id": user})
    assert r.status_code == 404 and r.json()["error"] == "not_found"


# CONTRACT.md section 3: "Every response body is JSON with Content-Type: application/json, errors and unknown
# routes included", and a bad path value is a 400 invalid_request: no HTML redirects, no automatic OPTIONS.


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/wallet/balance"),
    ("GET", "/api/wallet/balance/%2F"),
    ("GET", "/api/wallet/transactions/%2Fx"),
    ("POST", "/api/wallet//deposit"),
])
def test_bad_paths_get_json_errors(server, method, path):
    r = requests.request(method, server.url + path, data=b"{}", allow_redirects=False, timeout=TIMEOUT)
    assert r.headers.get("Content-Type", "").split(";")[0] == "application/json", (r.status_code, r.text[:80])
    assert r.status_code in (400, 404) and r.json()["error"] in ("invalid_request", "not_found")


@pytest.mark.parametrize("path", ["/api/wallet/deposit", "/healthz"])
def test_options_is_method_not_allowed_json(server, path):
    r = requests.options(server.url + path, timeout=TIMEOUT)
    assert r.headers.get("Content-Type", "").split(";")[0] == "application/json", (r.status_code, r.text[:80])
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
