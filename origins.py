"""The cross-origin rule of CONTRACT.md section 3, for HTTP writes and WebSocket handshakes alike.

A browser names the page that made a request in `Origin`. A request from a page of another origin
(or from an opaque one, `Origin: null`) may not write nor open a WebSocket unless that origin is
listed in `--allowed-origins`. Requests without `Origin` (curl, servers) are not browsers' and pass.
"""

from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalize_origin(text: str) -> str:
    """`scheme://host[:port]` in canonical form (lower case, default port left out); ValueError if not an origin.

    Used for the `--allowed-origins` list, so `https://Casino.example:443` and `https://casino.example`
    are one origin. `null` is kept as it is (it may be listed on purpose).
    """
    text = text.strip()
    if text == "null":
        return text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise ValueError(f"{text!r} is not an origin such as https://casino.example")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{text!r} is not an origin: no path, query or fragment allowed")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} has an invalid port") from None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    return f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


def parse_allowed(text: str) -> frozenset[str]:
    """The `--allowed-origins` value: comma-separated origins; ValueError naming the bad one."""
    return frozenset(normalize_origin(item) for item in text.split(",") if item.strip())


def _host_port(host_header: str, default_port: int) -> tuple[str, int] | None:
    """The host and port a `Host` header names; a missing port is the origin scheme's default."""
    try:
        parts = urlsplit("//" + host_header.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.path or parts.username is not None:
        return None
    return parts.hostname.lower(), default_port if port is None else port


def _same_origin(origin: str, host_header: str | None) -> bool:
    try:
        parts = urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return False
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or not host_header:
        return False
    default = _DEFAULT_PORTS[scheme]
    # Host carries no scheme: behind a TLS proxy, `Host: casino.example` is the page `https://casino.example`.
    return _host_port(host_header, default) == (parts.hostname.lower(), default if origin_port is None else origin_port)


def _headers_of(environ_or_headers: Mapping) -> tuple[str | None, str | None]:
    if "REQUEST_METHOD" in environ_or_headers:  # a WSGI environ
        return environ_or_headers.get("HTTP_ORIGIN"), environ_or_headers.get("HTTP_HOST")
    get = environ_or_headers.get  # werkzeug Headers are case-insensitive; a plain dict may use either case
    return get("Origin", get("origin")), get("Host", get("host"))


def origin_allowed(environ_or_headers: Mapping, allowed: Iterable[str] = ()) -> bool:
    """True unless the request comes from a browser page of another origin that is not allowed.

    `environ_or_headers` is a WSGI environ or a headers mapping; `allowed` holds normalized origins
    (see parse_allowed). A request without `Origin` is allowed; `Origin: null` only when listed.
    """
    origin, host = _headers_of(environ_or_headers)
    if origin is None:
        return True
    origin = origin.strip()
    if origin != "null" and _same_origin(origin, host):
        return True
    try:
        return normalize_origin(origin) in allowed
    except ValueError:
        return False
