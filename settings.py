"""Process settings from the command line and the environment (CONTRACT.md section 1).

A flag beats its environment variable, which beats the default. A bad value ends start-up with exit
code 2 and one short line naming the flag or variable: never a traceback. Secrets (`API_KEYS`,
`PLAYER_TOKEN_SECRET`) are read by auth.Auth.from_env from the environment only, never from flags.
"""

import argparse
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import http_server
import logs
from origins import parse_allowed

PROG = "app.py"
DEFAULT_MAX_CONNECTIONS = http_server.DEFAULT_MAX_CONNECTIONS


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    http_port: int = 8080
    grpc_port: int = 9090
    log_level: str = "INFO"
    log_format: str = "text"
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    allowed_origins: frozenset[str] = frozenset()
    redis_url: str | None = None
    redis_prefix: str = "wallet:"


def redact_url(url: str) -> str:
    """A Redis URL fit for a message or a log: any password (and user name) replaced by `***`."""
    try:
        parts = urlsplit(url)
        if parts.password is None and parts.username is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=f"***@{host}").geturl()
    except ValueError:
        return "<unparsable URL>"


def address(host: str, port: int) -> str:
    """`host:port`, with an IPv6 address in brackets as in a URL."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text.strip()) or int(text) > 65535:
        raise ValueError(f"invalid port {text!r}: expected an integer from 0 to 65535")
    return int(text)


def _level(text: str) -> str:
    if text.upper() not in logs.LEVELS:
        raise ValueError(f"invalid log level {text!r}: expected one of {', '.join(logs.LEVELS)}")
    return text.upper()


def _format(text: str) -> str:
    if text.lower() not in logs.FORMATS:
        raise ValueError(f"invalid log format {text!r}: expected one of {', '.join(logs.FORMATS)}")
    return text.lower()


def _host(text: str) -> str:
    if not text.strip():
        raise ValueError("invalid host '': expected an address such as 0.0.0.0 or 127.0.0.1")
    return text.strip()


def _count(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,7}", text.strip()) or int(text) < 1:
        raise ValueError(f"invalid connection count {text!r}: expected an integer from 1 to 9999999")
    return int(text)


def _origins(text: str) -> frozenset[str]:
    try:
        return parse_allowed(text)
    except ValueError as exc:
        raise ValueError(f"invalid origin: {exc}") from None


def _redis_url(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None  # REDIS_URL= (empty) means: keep state in the process
    shown = redact_url(text)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        raise ValueError(f"invalid Redis URL {shown!r}: bad host or port") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"invalid Redis URL {shown!r}: expected redis://[:PASSWORD@]HOST:PORT/DB or rediss://...")
    if parts.path not in ("", "/") and not re.fullmatch(r"/[0-9]{1,5}", parts.path):
        raise ValueError(f"invalid Redis URL {shown!r}: the database must be a number, as in redis://HOST:6379/0")
    return text


def _prefix(text: str) -> str:
    if not re.fullmatch(r"[\x21-\x7e]{1,64}", text):
        raise ValueError(f"invalid Redis key prefix {text!r}: expected 1 to 64 printable ASCII characters, no spaces")
    return text


# flag, environment variable, default (as text), parser, help
SPECS: list[tuple[str, str, str, Callable, str]] = [
    ("--host", "HOST", "0.0.0.0", _host, "address to listen on for HTTP and gRPC"),
    ("--http-port", "HTTP_PORT", "8080", _port, "HTTP and WebSocket port"),
    ("--grpc-port", "GRPC_PORT", "9090", _port, "gRPC port"),
    ("--log-level", "LOG_LEVEL", "INFO", _level, "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    ("--log-format", "LOG_FORMAT", "text", _format, "text or json (one JSON object per line)"),
    ("--max-connections", "MAX_CONNECTIONS", str(DEFAULT_MAX_CONNECTIONS), _count,
     "client connections (HTTP and WebSocket) served at once; more are answered 503"),
    ("--allowed-origins", "ALLOWED_ORIGINS", "", _origins,
     "comma-separated browser origins (https://casino.example) that may write and open WebSockets"),
    ("--redis-url", "REDIS_URL", "", _redis_url,
     "keep state in Redis: redis://[:PASSWORD@]HOST:PORT/DB or rediss://...; unset: in the process"),
    ("--redis-prefix", "REDIS_PREFIX", "wallet:", _prefix, "prefix of every Redis key"),
]

_EPILOG = """Authentication (environment only, so secrets stay out of `ps`):
  API_KEYS             comma-separated operator keys (32 to 256 printable characters each); unset: no authentication
  PLAYER_TOKEN_SECRET  HS256 secret (at least 32 characters) for player tokens
"""


_CREDENTIALS_IN_URL = re.compile(r"(\w+://)[^@\s/]*@")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # "unrecognized arguments: ..." repeats what was typed, which may be a URL with a password.
        message = _CREDENTIALS_IN_URL.sub(r"\1***@", message)
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def parse_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Read the settings; a bad value exits 2 with one line naming its flag or variable."""
    parser = _Parser(prog=PROG, description="Wallet service: HTTP + WebSocket and gRPC in one process.",
                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    for flag, env, default, _, text in SPECS:
        shown = f"default {default}" if default else "unset by default"
        parser.add_argument(flag, metavar=env, help=f"{text} (env {env}, {shown})")
    args = parser.parse_args(argv)
    values = {}
    for flag, env, default, convert, _ in SPECS:
        name = flag[2:].replace("-", "_")
        raw, source = getattr(args, name), flag
        if raw is None:
            raw, source = environ.get(env), f"environment variable {env}"
        if raw is None:
            raw, source = default, "default"
        try:
            values[name] = convert(raw)
        except ValueError as exc:
            parser.exit(2, f"{PROG}: error: {source}: {exc}\n")
    return Settings(**values)
