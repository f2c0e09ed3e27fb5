"""auth.py on its own: configuration, every credential case, the rule per action, minting."""

import base64
import hashlib
import json
import logging
import time
import warnings

import jwt
import pytest

import auth
from auth import ANONYMOUS, Auth, AuthConfigError
from errors import ServiceError

KEY = "op-key-" + "k" * 40
OTHER_KEY = "op-key-" + "z" * 40
SECRET = "s" * 40
NOW = time.time()


def token(sub="alice", exp=None, secret=SECRET, **extra):
    claims = {"sub": sub, "exp": int(NOW + 600) if exp is None else exp, **extra}
    return jwt.encode({k: v for k, v in claims.items() if v is not ...}, secret, algorithm="HS256")


def unsigned_token(sub="alice"):
    """An `alg: none` JWT: the classic way to get a token accepted without the secret."""
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({'sub': sub, 'exp': int(NOW + 600)})}."


@pytest.fixture
def on():
    return Auth.from_env({"API_KEYS": f"{KEY},{OTHER_KEY}", "PLAYER_TOKEN_SECRET": SECRET})


def refused(code, call, *args):
    with pytest.raises(ServiceError) as info:
        call(*args)
    assert info.value.code == code
    return info.value


# --- configuration ---------------------------------------------------------------------------------------

def test_off_without_api_keys():
    off = Auth.from_env({})
    assert not off.enabled
    assert off.authenticate(None) is ANONYMOUS
    assert off.authenticate("anything at all") is ANONYMOUS
    assert off.authenticate_header("Basic nonsense") is ANONYMOUS
    for action in ("read_user", "read_leaderboard", "write", "mint_token"):
        ANONYMOUS.require(action, "anyone")
    ANONYMOUS.require_subscription(["game_outcomes", "balance", "leaderboard"], None)


def test_on_with_keys_and_secret(on):
    assert on.enabled and on.player_tokens
    assert not Auth.from_env({"API_KEYS": KEY}).player_tokens


@pytest.mark.parametrize("value", [
    "", "short", "k" * 31, "k" * 257, KEY + ",", "," + KEY, f"{KEY},,{OTHER_KEY}", f"{KEY}, {OTHER_KEY}",
    "k" * 20 + " " + "k" * 20, "k" * 40 + "\t", "k" * 39 + "é", "k" * 39 + "\x00", "k" * 39 + "\x7f",
])
def test_bad_api_keys_name_the_variable_and_never_show_a_key(value):
    with pytest.raises(AuthConfigError) as info:
        Auth.from_env({"API_KEYS": value})
    message = str(info.value)
    assert "API_KEYS" in message
    for part in value.split(","):
        if len(part) >= 8:
            assert part.strip()[:8] not in message


def test_key_lengths_at_the_bounds_are_accepted():
    Auth.from_env({"API_KEYS": "a" * 32 + "," + "~" * 256 + "," + "!#$%&'()*+-./:;<=>?@[]^_`{|}" + "x" * 10})


@pytest.mark.parametrize("secret", ["", "x" * 31])
def test_short_player_token_secret_is_refused_without_showing_it(secret):
    with pytest.raises(AuthConfigError) as info:
        Auth.from_env({"API_KEYS": KEY, "PLAYER_TOKEN_SECRET": secret})
    assert "PLAYER_TOKEN_SECRET" in str(info.value)
    assert secret == "" or secret not in str(info.value)


def test_secret_without_keys_is_refused():
    # A secret alone would look like authentication is on while everything stays open.
    with pytest.raises(AuthConfigError, match="API_KEYS"):
        Auth.from_env({"PLAYER_TOKEN_SECRET": SECRET})


def test_startup_line_warns_when_off_and_never_shows_a_key(on, caplog):
    caplog.set_level(logging.INFO, logger="wallet.auth")
    Auth().log_startup()
    on.log_startup()
    warning, info = caplog.records
    assert warning.levelno == logging.WARNING and "authentication is OFF" in warning.getMessage()
    assert info.levelno == logging.INFO and auth.key_name(KEY) in info.getMessage()
    assert KEY not in caplog.text and OTHER_KEY not in caplog.text and SECRET not in caplog.text


# --- the Authorization header ----------------------------------------------------------------------------

@pytest.mark.parametrize("header,credential", [
    (None, None), (f"Bearer {KEY}", KEY), (f"bearer {KEY}", KEY), (f"BEARER  {KEY}", KEY),
])
def test_bearer_header(header, credential):
    assert Auth.bearer(header) == credential


@pytest.mark.parametrize("header", [
    "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", f"Token {KEY}", f"Bearer{KEY}", f"Bearer {KEY} extra",
    f"Bearer {KEY}\r\nX: y", f"Bearer \x00{KEY}", "Bearer " + "k" * 10_000,
])
def test_malformed_header_is_unauthorized_without_echoing_it(header):
    err = refused("unauthorized", Auth.bearer, header)
    assert KEY not in err.message and "dXNlcjpwYXNz" not in err.message and "kkkk" not in err.message


# --- every credential case -------------------------------------------------------------------------------

def test_operator_key(on):
    principal = on.authenticate(KEY)
    assert (principal.kind, principal.user_id, principal.expires_at) == ("operator", None, None)
    assert principal.name == "key:" + hashlib.sha256(KEY.encode()).hexdigest()[:8]
    assert on.authenticate(OTHER_KEY).name == auth.key_name(OTHER_KEY) != principal.name
    for action in ("read_user", "read_leaderboard", "write", "mint_token"):
        principal.require(action, "anyone")
    principal.require_subscription(["game_outcomes"], None)


def test_valid_player_token(on):
    principal = on.authenticate(token("alice"))
    assert (principal.kind, principal.name, principal.user_id) == ("player", "player:alice", "alice")
    assert principal.expires_at == int(NOW + 600)
    principal.require("read_user", "alice")
    principal.require("read_leaderboard")
    principal.require_subscription(["leaderboard"], None)
    principal.require_subscription(["leaderboard", "balance", "game_outcomes"], "alice")
    principal.require_subscription([], None)


@pytest.mark.parametrize("credential,message", [
    (None, "authentication required"),
    ("", "malformed"),
    ("x" * 5000, "malformed"),
    ("unknown-" + "k" * 40, "unknown credential"),
    (KEY[:-1], "unknown credential"),
    (KEY + "x", "unknown credential"),
    ("é" * 40, "unknown credential"),
    ("\udcff" * 40, "unknown credential"),
    (token(exp=int(NOW - 5)), "expired"),
    (token(secret="another secret of at least 32 chars!!"), "invalid player token"),
    (unsigned_token(), "invalid player token"),
    (token(exp=...), "invalid player token"),          # exp is required
    (token(sub=...), "invalid player token"),          # sub is required
    (token(sub=42), "invalid player token"),           # sub must be a string
    (token(sub="bad id!"), "not a user id"),
    (token(nbf=int(NOW + 300)), "invalid player token"),  # not valid yet
    ("a.b.c", "invalid player token"),
])
def test_refused_credentials_are_unauthorized_and_never_echoed(on, credential, message):
    err = refused("unauthorized", on.authenticate, credential)
    assert message in err.message
    assert not credential or credential[:12] not in err.message


def test_another_hmac_algorithm_is_refused(on):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT warns that the secret is short for HS512: it is the point
        hs512 = jwt.encode({"sub": "alice", "exp": int(NOW + 600)}, SECRET, algorithm="HS512")
    assert "invalid player token" in refused("unauthorized", on.authenticate, hs512).message


def test_player_tokens_are_unknown_without_a_secret():
    keys_only = Auth.from_env({"API_KEYS": KEY})
    assert "unknown credential" in refused("unauthorized", keys_only.authenticate, token()).message


def test_player_for_another_user_is_forbidden(on):
    player = on.authenticate(token("alice"))
    refused("forbidden", player.require, "read_user", "bob")
    refused("forbidden", player.require, "read_user", None)
    refused("forbidden", player.require_subscription, ["balance"], "bob")
    refused("forbidden", player.require_subscription, ["game_outcomes"], None)  # the feed of every player
    refused("forbidden", player.require_subscription, ["leaderboard", "game_outcomes"], "bob")


@pytest.mark.parametrize("action", ["write", "mint_token"])
def test_player_may_not_write_or_mint(on, action):
    refused("forbidden", on.authenticate(token("alice")).require, action, "alice")


def test_unknown_action_is_a_programming_error(on):
    with pytest.raises(ValueError):
        on.authenticate(KEY).require("delete_everything")
    with pytest.raises(ValueError):
        on.authenticate(token()).require("subscribe", "alice")


def test_player_token_expiring_after_it_was_accepted():
    now = [NOW]
    clocked = Auth([KEY], SECRET, clock=lambda: now[0])
    player = clocked.authenticate(token("alice", exp=int(NOW + 60)))
    player.require("read_user", "alice")
    now[0] = NOW + 61
    assert player.expired()
    refused("unauthorized", player.require, "read_user", "alice")
    refused("unauthorized", player.require_subscription, ["leaderboard"], None)
    refused("unauthorized", clocked.authenticate, token("alice", exp=int(NOW + 60)))


def test_verified_tokens_are_remembered_until_they_expire(monkeypatch):
    now = [NOW]
    clocked = Auth([KEY], SECRET, clock=lambda: now[0])
    valid = token("alice", exp=int(NOW + 60))
    first = clocked.authenticate(valid)
    decoded = []
    monkeypatch.setattr(auth.jwt, "decode", lambda *a, **k: decoded.append(a) or pytest.fail("decoded again"))
    assert clocked.authenticate(valid) is first and not decoded
    now[0] = NOW + 60
    refused("unauthorized", clocked.authenticate, valid)
    monkeypatch.undo()
    # Refused tokens are never remembered: each is checked again (and refused again).
    real_decode = auth.jwt.decode
    monkeypatch.setattr(auth.jwt, "decode", lambda *a, **k: decoded.append(a) or real_decode(*a, **k))
    forged = token("alice", secret="x" * 40)
    for _ in range(2):
        refused("unauthorized", clocked.authenticate, forged)
    assert len(decoded) == 2


def test_every_key_is_compared_in_constant_time(on, monkeypatch):
    compared = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert on.authenticate(KEY).kind == "operator"
    # The first key matched, and the second was still compared: no early exit reveals which key it was.
    assert compared == [(KEY.encode(), KEY.encode()), (OTHER_KEY.encode(), KEY.encode())]
    compared.clear()
    refused("unauthorized", on.authenticate, "unknown-" + "k" * 40)
    assert len(compared) == 2


# --- minting ---------------------------------------------------------------------------------------------

def test_mint_gives_a_token_the_service_accepts(on):
    minted = on.mint("alice", 120)
    assert set(minted) == {"token", "user_id", "expires_at"}
    assert minted["user_id"] == "alice"
    claims = jwt.decode(minted["token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 120
    assert minted["expires_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims["exp"]))
    principal = on.authenticate(minted["token"])
    assert principal.user_id == "alice" and principal.expires_at == claims["exp"]
    assert on.mint("bob")["user_id"] == "bob"  # default TTL


@pytest.mark.parametrize("user_id,ttl", [
    ("alice", 0), ("alice", 86_401), ("alice", True), ("alice", 1.5), ("alice", "60"),
    ("", 60), ("bad id", 60), (42, 60), ("a" * 65, 60),
])
def test_mint_refuses_bad_input(on, user_id, ttl):
    refused("invalid_request", on.mint, user_id, ttl)


def test_mint_bounds(on):
    on.mint("a" * 64, 1)
    on.mint("alice", 86_400)


def test_mint_without_a_secret_is_refused():
    refused("not_found", Auth.from_env({"API_KEYS": KEY}).mint, "alice", 60)
