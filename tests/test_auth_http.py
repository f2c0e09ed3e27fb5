"""Authentication over HTTP and WebSocket against the real `python app.py` (CONTRACT.md section 8).

Every route and WebSocket path × every credential case: no credential, malformed header, unknown key,
expired token, token signed with another secret, `alg: none` token, player token for another user, the
player's own token, an operator key. Refused requests change nothing and leave their Idempotency-Key
unused; no key or token ever reaches the log.
"""

import json
import subprocess
import sys
import time
import uuid

import jwt
import pytest
import requests
import simple_websocket

import auth
from conftest import ROOT, Server

KEY = "http-operator-key-" + uuid.uuid4().hex  # 50 characters, unique per run so the log check means something
SECRET = "http-player-secret-" + uuid.uuid4().hex
TIMEOUT = 10.0

# Every credential that appears in a request of this module, for the log check at the end.
USED = {KEY, SECRET}


def player_token(sub, exp_in=600, secret=SECRET):
    token = jwt.encode({"sub": sub, "exp": int(time.time() + exp_in)}, secret, algorithm="HS256")
    USED.add(token)
    return token


def unsigned_token(sub):
    token = jwt.encode({"sub": sub, "exp": int(time.time() + 600)}, None, algorithm="none")
    USED.add(token)
    return token


UNKNOWN_KEY = "unknown-key-" + uuid.uuid4().hex
USED.add(UNKNOWN_KEY)


def credential_for(case, uid):
    """The Authorization header value of a case (None: no header)."""
    return {
        "none": None,
        "malformed": f"Basic {KEY}",
        "unknown key": f"Bearer {UNKNOWN_KEY}",
        "expired token": "Bearer " + player_token(uid, exp_in=-5),
        "other secret": "Bearer " + player_token(uid, secret="another-secret-" + "x" * 30),
        "alg none": "Bearer " + unsigned_token(uid),
        "player for another user": "Bearer " + player_token("someone_else"),
        "own player": "Bearer " + player_token(uid),
        "operator": f"Bearer {KEY}",
    }[case]


UNAUTHENTICATED = ["none", "malformed", "unknown key", "expired token", "other secret", "alg none"]
CASES = UNAUTHENTICATED + ["player for another user", "own player", "operator"]

# (name, method, path, body, action); {u} is the test's user.
ROUTES = [
    ("deposit", "POST", "/api/wallet/deposit", {"user_id": "{u}", "amount": 5}, "write"),
    ("withdraw", "POST", "/api/wallet/withdraw", {"user_id": "{u}", "amount": 1}, "write"),
    ("outcome", "POST", "/api/games/outcomes", {"user_id": "{u}", "game": "dice", "bet": 2, "payout": 7}, "write"),
    ("balance", "GET", "/api/wallet/balance/{u}", None, "read_user"),
    ("transactions", "GET", "/api/wallet/transactions/{u}", None, "read_user"),
    ("leaderboard", "GET", "/api/leaderboard", None, "read_leaderboard"),
    ("mint", "POST", "/api/auth/player-tokens", {"user_id": "{u}", "ttl_seconds": 60}, "mint_token"),
]


def expected_status(case, action):
    if case in UNAUTHENTICATED:
        return 401
    if case == "operator" or action == "read_leaderboard":
        return 200
    if action == "read_user" and case == "own player":
        return 200
    return 403


def fill(value, uid):
    return json.loads(json.dumps(value).replace("{u}", uid)) if value is not None else None


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("auth-http"), env={"API_KEYS": KEY, "PLAYER_TOKEN_SECRET": SECRET})
    yield srv
    code = srv.stop()
    log = srv.log()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    leaked = [secret[:16] + "..." for secret in USED if secret in log]
    assert not leaked, f"credentials in the log: {leaked}"


@pytest.fixture
def call(secured):
    def call(method, path, body=None, authorization=None, data=None, **headers):
        if authorization is not None:
            headers["Authorization"] = authorization
        kwargs = {"json": body} if body is not None else {"data": data}
        return requests.request(method, secured.url + path, headers=headers, timeout=TIMEOUT, **kwargs)

    return call


@pytest.fixture
def funded(call, uid):
    """The test's user with 100 cents and one game played, so every route has something to change."""
    assert call("POST", "/api/wallet/deposit", {"user_id": uid, "amount": 100}, f"Bearer {KEY}").status_code == 200
    assert call("POST", "/api/games/outcomes", {"user_id": uid, "game": "dice", "bet": 0, "payout": 0},
                f"Bearer {KEY}").status_code == 200
    return uid


def state(call, uid):
    """What a refused request must leave alone: the user's balance and ledger, and the leaderboard."""
    operator = f"Bearer {KEY}"
    return (call("GET", f"/api/wallet/balance/{uid}", authorization=operator).json(),
            call("GET", f"/api/wallet/transactions/{uid}", authorization=operator).json(),
            call("GET", "/api/leaderboard", authorization=operator).json())


# --- every route × every credential ----------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name,method,path,body,action", ROUTES, ids=[r[0] for r in ROUTES])
def test_route_per_credential(call, funded, name, method, path, body, action, case):
    uid = funded
    before = state(call, uid)
    response = call(method, fill(path, uid), fill(body, uid), credential_for(case, uid))
    expected = expected_status(case, action)
    assert response.status_code == expected, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    if expected == 401:
        assert response.json()["error"] == "unauthorized"
        assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
    elif expected == 403:
        assert response.json()["error"] == "forbidden"
        assert "WWW-Authenticate" not in response.headers
    text = response.text
    for secret in USED:
        assert secret not in text  # no credential is echoed in a body
    if expected != 200 or action != "write":
        assert state(call, uid) == before  # refused, or a read: nothing changed
    if name == "mint" and expected == 200:
        USED.add(response.json()["token"])


def test_check_comes_before_validation(call, uid):
    player = "Bearer " + player_token(uid)
    # Not JSON at all: still 401 without a credential, 403 for a player, 400 only for an operator.
    for authorization, status in [(None, 401), (player, 403), (f"Bearer {KEY}", 400)]:
        response = call("POST", "/api/wallet/deposit", authorization=authorization, data="{not json")
        assert response.status_code == status, response.text
    assert call("GET", "/api/wallet/balance/bad!id").status_code == 401
    assert call("GET", "/api/wallet/balance/bad!id", authorization=player).status_code == 403
    assert call("GET", "/api/wallet/balance/bad!id", authorization=f"Bearer {KEY}").status_code == 400
    assert call("GET", f"/api/wallet/transactions/{uid}?limit=0").status_code == 401


@pytest.mark.parametrize("case", ["none", "unknown key", "own player"])
def test_refused_idempotent_write_leaves_the_key_unused(call, uid, case):
    key = "idem-" + uuid.uuid4().hex
    body = {"user_id": uid, "amount": 40}
    refused = call("POST", "/api/wallet/deposit", body, credential_for(case, uid), **{"Idempotency-Key": key})
    assert refused.status_code in (401, 403)
    # The same key with another body is not "reused": the refused request was never remembered.
    first = call("POST", "/api/wallet/deposit", {"user_id": uid, "amount": 41}, f"Bearer {KEY}",
                 **{"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    assert "Idempotent-Replayed" not in first.headers
    again = call("POST", "/api/wallet/deposit", {"user_id": uid, "amount": 41}, f"Bearer {KEY}",
                 **{"Idempotency-Key": key})
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert call("GET", f"/api/wallet/balance/{uid}", authorization=f"Bearer {KEY}").json()["balance"] == 41


@pytest.mark.parametrize("path", ["/healthz", "/openapi.json", "/"])
@pytest.mark.parametrize("case", ["none", "malformed", "unknown key"])
def test_open_routes_stay_open(call, path, case, uid):
    response = call("GET", path, authorization=credential_for(case, uid))
    assert response.status_code == 200, response.text


# --- minting player tokens -------------------------------------------------------------------------------

def test_operator_mints_a_token_that_works(call, funded):
    uid = funded
    response = call("POST", "/api/auth/player-tokens", {"user_id": uid, "ttl_seconds": 120}, f"Bearer {KEY}")
    assert response.status_code == 200, response.text
    minted = response.json()
    USED.add(minted["token"])
    assert set(minted) == {"token", "user_id", "expires_at"} and minted["user_id"] == uid
    claims = jwt.decode(minted["token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == uid and abs(claims["exp"] - time.time() - 120) < 5
    assert minted["expires_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims["exp"]))
    bearer = "Bearer " + minted["token"]
    assert call("GET", f"/api/wallet/balance/{uid}", authorization=bearer).json() == {"user_id": uid, "balance": 100}
    assert call("GET", "/api/wallet/balance/someone_else", authorization=bearer).status_code == 403
    default = call("POST", "/api/auth/player-tokens", {"user_id": uid}, f"Bearer {KEY}").json()
    USED.add(default["token"])
    assert abs(jwt.decode(default["token"], SECRET, algorithms=["HS256"])["exp"] - time.time() - 3600) < 5


@pytest.mark.parametrize("body", [
    {"user_id": "u1", "ttl_seconds": 0}, {"user_id": "u1", "ttl_seconds": 86_401},
    {"user_id": "u1", "ttl_seconds": 1.5}, {"user_id": "u1", "ttl_seconds": True}, {"user_id": "bad id"}, {},
])
def test_mint_validates_its_body(call, body):
    response = call("POST", "/api/auth/player-tokens", body, f"Bearer {KEY}")
    assert response.status_code == 400 and response.json()["error"] == "invalid_request", response.text


# --- logs and start-up -----------------------------------------------------------------------------------

def test_log_names_the_caller_never_the_credential(secured, call, funded):
    call("GET", f"/api/wallet/balance/{funded}", authorization=f"Bearer {KEY}")
    call("GET", f"/api/wallet/balance/{funded}", authorization="Bearer " + player_token(funded))
    deadline = time.monotonic() + TIMEOUT
    while f"player:{funded}" not in secured.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = secured.log()
    assert auth.key_name(KEY) in log
    assert f"player:{funded}" in log
    assert KEY not in log and SECRET not in log


def test_startup_warning_when_authentication_is_off(server):
    lines = [line for line in server.log().splitlines() if "WARNING" in line and "authentication" in line.lower()]
    assert lines, "no start-up WARNING that authentication is off"


def test_no_warning_when_authentication_is_on(secured):
    assert not [line for line in secured.log().splitlines()
                if "WARNING" in line and "authentication is off" in line.lower()]


@pytest.mark.parametrize("env", [
    {"API_KEYS": ""},
    {"API_KEYS": "short-key-1234"},
    {"API_KEYS": "a-long-enough-key-but-with a-space-inside-it-0123"},
    {"API_KEYS": "first-valid-key-0123456789abcdef0123456789,"},
    {"API_KEYS": "first-valid-key-0123456789abcdef0123456789,second-is-tiny"},
    {"API_KEYS": "k" * 257},
    {"API_KEYS": "first-valid-key-0123456789abcdef0123456789", "PLAYER_TOKEN_SECRET": "too-short-secret"},
])
def test_bad_auth_settings_exit_2_without_showing_a_key(env):
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--http-port", "0",
                             "--grpc-port", "0"], cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    named = "PLAYER_TOKEN_SECRET" if "PLAYER_TOKEN_SECRET" in env else "API_KEYS"
    assert named in output
    assert "Traceback" not in output
    for value in env.values():
        for part in value.split(","):
            if len(part) >= 8:
                assert part not in output and part[:8] not in output.replace(named, "")


# --- WebSocket -------------------------------------------------------------------------------------------

class _Client(simple_websocket.Client):
    """Frames that arrive with the 101 (an error and a close) are processed before the reader starts."""

    def handshake(self):
        super().handshake()
        if self.connected and not self._handle_events():
            self.connected = True


class WS:
    def __init__(self, url, authorization=None):
        headers = {"Authorization": authorization} if authorization else None
        self.client = _Client.connect(url, headers=headers)

    def send(self, message):
        self.client.send(json.dumps(message))

    def recv(self, timeout=TIMEOUT):
        raw = self.client.receive(timeout=timeout)
        assert raw is not None, f"no message within {timeout}s"
        return json.loads(raw)

    def until(self, predicate, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if predicate(msg):
                return msg

    def expect_close(self, timeout=TIMEOUT):
        """(close code, messages received before it)."""
        deadline = time.monotonic() + timeout
        got = []
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"not closed within {timeout}s; got {got[-3:]!r}"
            try:
                raw = self.client.receive(timeout=remaining)
            except simple_websocket.ConnectionClosed as exc:
                return exc.reason, got
            if raw is not None:
                got.append(json.loads(raw))

    def close(self):
        try:
            self.client.close()
        except (simple_websocket.ConnectionClosed, OSError):
            pass


@pytest.fixture
def ws(secured):
    opened = []

    def connect(query="", authorization=None):
        client = WS(f"{secured.ws_url}{query}", authorization)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def query_token(header):
    return header.split(" ", 1)[1] if header else None


@pytest.mark.parametrize("via", ["header", "query"])
@pytest.mark.parametrize("case", UNAUTHENTICATED)
def test_ws_without_a_valid_credential_gets_unauthorized_then_1008(ws, uid, case, via):
    header = credential_for(case, uid)
    if via == "query":
        # A query token has no scheme to get wrong: its malformed case is an empty token.
        token = "" if case == "malformed" else query_token(header)
        client = ws(f"?events=leaderboard{'' if token is None else '&token=' + token}")
    else:
        client = ws("?events=leaderboard", header)
    code, before = client.expect_close()
    assert code == 1008
    assert [m.get("error") for m in before] == ["unauthorized"], before
    assert before[0]["type"] == "error"


@pytest.mark.parametrize("via", ["header", "query"])
def test_ws_player_for_another_user_is_forbidden_then_1008(ws, uid, via):
    header = credential_for("player for another user", uid)
    if via == "query":
        client = ws(f"?events=balance&user_id={uid}&token={query_token(header)}")
    else:
        client = ws(f"?events=balance&user_id={uid}", header)
    code, before = client.expect_close()
    assert code == 1008
    assert [(m["type"], m.get("error")) for m in before] == [("error", "forbidden")], before


def test_ws_player_may_not_take_the_unfiltered_feed(ws, uid):
    code, before = ws(f"?events=game_outcomes&token={player_token(uid)}").expect_close()
    assert code == 1008 and [m.get("error") for m in before] == ["forbidden"]


@pytest.mark.parametrize("via", ["header", "query"])
def test_ws_own_player_subscribes_to_its_own_events(ws, call, uid, via):
    token = player_token(uid)
    query = f"?events=balance,game_outcomes,leaderboard&user_id={uid}"
    client = ws(query + f"&token={token}") if via == "query" else ws(query, f"Bearer {token}")
    subscribed = client.recv()
    assert subscribed["type"] == "subscribed", subscribed
    assert sorted(subscribed["events"]) == ["balance", "game_outcomes", "leaderboard"]
    assert subscribed["user_id"] == uid
    call("POST", "/api/wallet/deposit", {"user_id": uid, "amount": 9}, f"Bearer {KEY}")
    event = client.until(lambda m: m["type"] == "balance")
    assert event["data"]["user_id"] == uid and event["data"]["amount"] == 9


def test_ws_forbidden_subscribe_message_keeps_the_connection(ws, uid):
    client = ws(f"?events=leaderboard&token={player_token(uid)}")
    assert client.recv()["type"] == "subscribed"
    client.until(lambda m: m["type"] == "leaderboard")  # the snapshot
    for message in [{"action": "subscribe", "events": ["balance"], "user_id": "someone_else", "id": 1},
                    {"action": "subscribe", "events": ["game_outcomes"], "id": 2}]:
        client.send(message)
        reply = client.until(lambda m, want=message["id"]: m.get("id") == want)
        assert (reply["type"], reply["error"]) == ("error", "forbidden"), reply
    client.send({"action": "subscribe", "events": [], "id": "state"})
    state_reply = client.until(lambda m: m.get("id") == "state")
    assert state_reply["type"] == "subscribed" and state_reply["events"] == ["leaderboard"]
    assert state_reply["user_id"] is None
    client.send({"action": "subscribe", "events": ["balance"], "user_id": uid, "id": 3})
    assert client.until(lambda m: m.get("id") == 3)["type"] == "subscribed"


@pytest.mark.parametrize("via", ["header", "query"])
def test_ws_operator_may_subscribe_to_everything(ws, uid, via):
    query = "?events=game_outcomes,leaderboard"
    client = ws(query + f"&token={KEY}") if via == "query" else ws(query, f"Bearer {KEY}")
    subscribed = client.recv()
    assert subscribed["type"] == "subscribed" and sorted(subscribed["events"]) == ["game_outcomes", "leaderboard"]


def test_ws_closes_1008_when_the_player_token_expires(ws, uid):
    expires = int(time.time()) + 2
    token = jwt.encode({"sub": uid, "exp": expires}, SECRET, algorithm="HS256")
    USED.add(token)
    client = ws(f"?events=leaderboard&token={token}")
    assert client.recv()["type"] == "subscribed"
    code, before = client.expect_close(timeout=expires - time.time() + 3)
    assert code == 1008
    assert time.time() >= expires - 0.5  # not before expiry
    assert [m.get("error") for m in before if m["type"] == "error"] == ["unauthorized"]


def test_ws_trailing_slash_path_is_guarded_the_same(ws, uid):
    code, before = ws("/?events=leaderboard").expect_close()
    assert code == 1008 and [m.get("error") for m in before] == ["unauthorized"]
    client = ws(f"/?events=balance&user_id={uid}&token={player_token(uid)}")
    assert client.recv()["type"] == "subscribed"
