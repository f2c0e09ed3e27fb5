"""Who is calling and what they may do: operator keys, player tokens (HS256 JWTs), one rule per action.

HTTP, WebSocket and gRPC all go through here, so the rules are written once (CONTRACT.md section 8):
- an operator key (one of `API_KEYS`) may do everything;
- a player token (a JWT signed with `PLAYER_TOKEN_SECRET`, claims `sub` and `exp`) may read the
  leaderboard and its own user only, and never write;
- with `API_KEYS` unset, authentication is off and every caller is an all-powerful anonymous principal.

Keys and tokens never reach a message or a log line: a principal's `name` is what logs show.
"""

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import jwt

from errors import ServiceError
from validation import is_user_id

log = logging.getLogger("wallet.auth")

MIN_KEY_LENGTH = 32
MAX_KEY_LENGTH = 256
MIN_SECRET_LENGTH = 32
MAX_TTL_SECONDS = 86_400
DEFAULT_TTL_SECONDS = 3_600
# Longer credentials are refused before any work: no legitimate key or token comes near this.
MAX_CREDENTIAL_LENGTH = 4096
# Verified player tokens remembered, so a client's repeated calls skip the JWT decode (a quarter of a gRPC
# call's cost, measured). Only tokens that verified are stored; the whole cache is dropped when full.
_TOKEN_CACHE_SIZE = 10_000

# Printable ASCII without space (0x20) or comma: what the contract allows in an operator key.
_KEY = re.compile(rf"[\x21-\x2b\x2d-\x7e]{{{MIN_KEY_LENGTH},{MAX_KEY_LENGTH}}}")
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([\x21-\x7e]+) *")
_ALGORITHMS = ["HS256"]

ACTIONS = frozenset({"read_user", "read_leaderboard", "write", "mint_token", "subscribe"})
# Events a player may receive only with its own user_id (the unfiltered game_outcomes feed names everyone).
_OWN_USER_EVENTS = frozenset({"game_outcomes", "balance"})

# The Bearer challenge sent with every 401 (RFC 6750).
WWW_AUTHENTICATE = "Bearer"


class AuthConfigError(Exception):
    """API_KEYS or PLAYER_TOKEN_SECRET is unusable; the message names the variable and never shows a key."""


def _unauthorized(message: str) -> ServiceError:
    return ServiceError(message, code="unauthorized")


def _forbidden(message: str) -> ServiceError:
    return ServiceError(message, code="forbidden")


def key_name(key: str) -> str:
    """How logs name an operator key: its SHA-256, first 8 hex digits (identifies it, reveals nothing usable)."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:8]


def rfc3339_seconds(timestamp: float) -> str:
    """UTC to the second with a Z (a token's expiry; wallet_store.rfc3339 gives microseconds for money events)."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `kind` is operator, player or anonymous (authentication off)."""

    kind: str
    name: str
    user_id: str | None = None
    expires_at: float | None = None
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    def expired(self) -> bool:
        return self.expires_at is not None and self.clock() >= self.expires_at

    def require(self, action: str, user_id: str | None = None) -> None:
        """Raise ServiceError `forbidden` unless this caller may do `action` (on `user_id` for read_user).

        A player token that has expired since it was presented (a long-lived WebSocket) is `unauthorized`.
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        if self.kind != "player":
            return  # operators and the anonymous principal of an open service may do everything
        if self.expired():
            raise _unauthorized("the player token has expired")
        if action == "read_leaderboard":
            return
        if action == "read_user":
            if user_id is not None and str(user_id) == self.user_id:
                return
            raise _forbidden("a player token may read its own user only")
        if action == "subscribe":
            # Without the events there is nothing to check against: callers use require_subscription.
            raise ValueError("use require_subscription(events, user_id) for subscriptions")
        raise _forbidden("a player token may not do this: it may only read its own user and the leaderboard")

    def require_subscription(self, events: Iterable[str], user_id: str | None) -> None:
        """Raise `forbidden` unless this caller may hold a subscription to `events` filtered by `user_id`.

        Pass the whole subscription as it would be after the change (every event, the connection's user_id).
        """
        if self.kind != "player":
            return
        if self.expired():
            raise _unauthorized("the player token has expired")
        wanted = set(events)
        if wanted & _OWN_USER_EVENTS and (user_id is None or str(user_id) != self.user_id):
            raise _forbidden("a player token may subscribe to balance and game_outcomes with its own user_id only")


ANONYMOUS = Principal(kind="anonymous", name="anonymous")


class Auth:
    """The service's credentials. Build it with `Auth.from_env(os.environ)`; `Auth()` is authentication off."""

    def __init__(self, api_keys: Sequence[str] = (), player_token_secret: str | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        for key in api_keys:
            if not _KEY.fullmatch(key):
                raise AuthConfigError("API_KEYS: every key must be 32 to 256 printable ASCII characters "
                                      "without spaces or commas")
        if player_token_secret is not None and len(player_token_secret) < MIN_SECRET_LENGTH:
            raise AuthConfigError(f"PLAYER_TOKEN_SECRET must be at least {MIN_SECRET_LENGTH} characters long")
        if player_token_secret is not None and not api_keys:
            raise AuthConfigError("PLAYER_TOKEN_SECRET is set but API_KEYS is not: authentication is off unless "
                                  "API_KEYS is set")
        # Bytes, so compare_digest accepts any credential (it refuses non-ASCII str).
        # One principal per key, made once: a frozen dataclass costs ~2 us to build on every call.
        self._keys = [(key.encode(), Principal(kind="operator", name=key_name(key))) for key in api_keys]
        self._secret = player_token_secret
        self._clock = clock
        self._verified: dict[str, Principal] = {}

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, clock: Callable[[], float] = time.time) -> "Auth":
        """Read API_KEYS and PLAYER_TOKEN_SECRET; raise AuthConfigError (exit 2 in app.py) if either is bad."""
        raw_keys = environ.get("API_KEYS")
        keys: list[str] = []
        if raw_keys is not None:
            if raw_keys == "":
                raise AuthConfigError("API_KEYS is set but empty: unset it to run without authentication")
            items = raw_keys.split(",")
            for position, item in enumerate(items, 1):
                if not _KEY.fullmatch(item):
                    # Position and length only: the value itself might be a real key with one typo.
                    raise AuthConfigError(
                        f"API_KEYS: key {position} of {len(items)} is not 32 to 256 printable ASCII characters "
                        f"without spaces or commas (it has {len(item)} characters)")
            keys = items
        return cls(keys, environ.get("PLAYER_TOKEN_SECRET"), clock=clock)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def player_tokens(self) -> bool:
        """Whether player tokens are accepted and can be minted (PLAYER_TOKEN_SECRET is set)."""
        return self._secret is not None

    def log_startup(self, logger: logging.Logger | None = None) -> None:
        """One start-up line: a WARNING when authentication is off, what is on otherwise (never a key)."""
        logger = logger or log
        if not self.enabled:
            logger.warning("authentication is OFF: API_KEYS is not set, so anyone who can reach the ports may "
                           "read and move any player's money")
            return
        logger.info("authentication is on: %d operator key(s) (%s); player tokens %s", len(self._keys),
                    ", ".join(principal.name for _, principal in self._keys),
                    "on" if self._secret is not None else "off (PLAYER_TOKEN_SECRET is not set)")

    @staticmethod
    def bearer(header_value: str | None) -> str | None:
        """The credential of an `Authorization: Bearer X` header; None when there is no header.

        Any other shape (another scheme, no credential, spaces or control characters) is `unauthorized`.
        """
        if header_value is None:
            return None
        match = _BEARER.fullmatch(header_value) if len(header_value) <= MAX_CREDENTIAL_LENGTH + 16 else None
        if match is None:
            raise _unauthorized("malformed Authorization header: expected 'Bearer <key or token>'")
        return match.group(1)

    def authenticate_header(self, header_value: str | None) -> Principal:
        """bearer() then authenticate(): the principal of an Authorization header (anonymous when off)."""
        if not self.enabled:
            return ANONYMOUS
        return self.authenticate(self.bearer(header_value))

    def authenticate(self, credential: str | None) -> Principal:
        """The principal a credential stands for, or ServiceError `unauthorized`; anonymous when auth is off."""
        if not self.enabled:
            return ANONYMOUS
        if credential is None:
            raise _unauthorized("authentication required: send 'Authorization: Bearer <key or token>'")
        if not credential or len(credential) > MAX_CREDENTIAL_LENGTH:
            raise _unauthorized("malformed credential")
        presented = credential.encode("utf-8", "surrogatepass")
        matched = None
        # Every key is compared, each in constant time, so timing reveals neither a key nor which one matched.
        for key, principal in self._keys:
            if hmac.compare_digest(key, presented):
                matched = principal
        if matched is not None:
            return matched
        if self._secret is not None and credential.count(".") == 2:
            player = self._verified.get(credential)
            if player is None:
                player = self._player(credential)
                if len(self._verified) >= _TOKEN_CACHE_SIZE:
                    self._verified.clear()
                self._verified[credential] = player
            elif player.expired():
                raise _unauthorized("the player token has expired")
            return player
        raise _unauthorized("unknown credential")

    def _player(self, token: str) -> Principal:
        try:
            claims = jwt.decode(token, self._secret, algorithms=_ALGORITHMS,
                                options={"require": ["exp", "sub"]}, leeway=0)
        except jwt.ExpiredSignatureError:
            raise _unauthorized("the player token has expired")
        except jwt.PyJWTError:
            raise _unauthorized("invalid player token")
        subject = claims["sub"]
        if not is_user_id(subject):
            raise _unauthorized("invalid player token: sub is not a user id")
        expires_at = float(claims["exp"])
        # PyJWT checked exp against the system clock; the service's clock (tests) decides too.
        if self._clock() >= expires_at:
            raise _unauthorized("the player token has expired")
        return Principal(kind="player", name=f"player:{subject}", user_id=subject, expires_at=expires_at,
                         clock=self._clock)

    def mint(self, user_id: str, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> dict:
        """A player token for `user_id`: {"token", "user_id", "expires_at" (RFC 3339 UTC)}."""
        if self._secret is None:
            raise ServiceError("player tokens are off: PLAYER_TOKEN_SECRET is not set", code="not_found")
        if not is_user_id(user_id):
            raise ServiceError("user_id must be 1 to 64 characters from A-Z a-z 0-9 _ -", code="invalid_request")
        if (not isinstance(ttl_seconds, int) or isinstance(ttl_seconds, bool)
                or not 1 <= ttl_seconds <= MAX_TTL_SECONDS):
            raise ServiceError(f"ttl_seconds must be an integer from 1 to {MAX_TTL_SECONDS}", code="invalid_request")
        now = int(self._clock())
        expires = now + ttl_seconds
        token = jwt.encode({"sub": user_id, "iat": now, "exp": expires}, self._secret, algorithm="HS256")
        return {"token": token, "user_id": user_id, "expires_at": rfc3339_seconds(expires)}
