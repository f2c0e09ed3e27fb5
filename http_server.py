"""Threaded HTTP/1.1 server for a WSGI app: strict framing, a connection cap, head timeouts, drain.

A connection with a request to serve has a thread of its own, so a long-lived upgraded connection (a
WebSocket) never starves plain HTTP. A connection waiting for a request (new, or kept alive after a
response) has none: one poller thread, which also accepts, watches them all, closes those the client
closed or that overran the head timeout, and refuses connections past the cap with 503 itself. So idle
connections cost a descriptor and about a kilobyte, and a flood that ends wakes no thread.

Request heads and chunked bodies are parsed here, strictly (RFC 9112): anything malformed is answered
400 and the connection is closed before the app sees any of it. The socket is never read past the
end of the current request (heads and chunk lines are found with MSG_PEEK), so no byte of a body can
be taken for the next request, and an upgraded socket is handed over exactly where the head ended.

The server knows nothing of the app. The app talks to it through the WSGI environ and its response:
- it takes the socket for another protocol by setting `environ[UPGRADED] = True` (the socket is
  `environ["werkzeug.socket"]`); the server then writes nothing more and closes the socket when the
  app returns;
- a `Connection: close` header in its response closes the connection after that response.
"""

from __future__ import annotations

import email.utils
import errno
import logging
import re
import select
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit

from errors import CODE_OF_STATUS, error_json

log = logging.getLogger("wallet.http")

UPGRADED = "http_server.upgraded"  # environ key the app sets to True once it has taken the socket
# Measured with bench/flood.py: the WebSockets of a flood of twice this many connections, all upgrade
# requests, dropped at once, leave /healthz under 100 ms again within 2.5-4.5 s; 2,000 took over 10 s.
DEFAULT_MAX_CONNECTIONS = 1500
HEAD_TIMEOUT = 10.0  # seconds for a whole request head, from the connection or the previous response
MAX_HEAD = 64 * 1024  # bytes of request line and header fields together
MAX_FIELDS = 100
MAX_CHUNK_LINE = 1024  # a chunk-size line with its extensions, or one trailer field
KEEP_THREAD = 0.05  # seconds a connection thread waits for the next request before handing the connection back
SHUTDOWN_WAIT = 0.2  # seconds shutdown() waits for the accept loop to end
LINGER = 2.0  # seconds to read and discard what a refused client still sends, so it sees our answer
ACCEPT_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"+) ([\x21-\x22\x24-\x7e]+) HTTP/([0-9])\.([0-9])")
# field-name ":" OWS field-value OWS; a value is visible characters (obs-text too) with inner spaces.
_VCHAR = rb"[\x21-\x7e\x80-\xff]"
_FIELD = re.compile(rb"(" + _TCHAR + rb"+):[ \t]*(" + _VCHAR + rb"+(?:[ \t]+" + _VCHAR + rb"+)*)?[ \t]*")
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_EXT = rb"(?:[ \t]*;[ \t]*" + _TCHAR + rb"+(?:[ \t]*=[ \t]*(?:" + _TCHAR + rb"+|" + _QUOTED + rb"))?)*"
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})" + _CHUNK_EXT)
_DIGITS = re.compile(r"[0-9]{1,18}")
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
_BROKEN_LINE_END = re.compile(rb"\r[^\n]|(?<!\r)\n|\x00")
_HOP_BY_HOP = frozenset({"connection", "content-length", "transfer-encoding", "keep-alive"})


class BadRequest(ValueError):
    """A request whose framing is not well formed: answered `status` and the connection closed."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Request:
    """A parsed request head. Header names keep their spelling; lookups go through `lower`."""

    __slots__ = ("method", "target", "version", "fields", "length", "chunked", "keep_alive", "expect_continue")

    def __init__(self, method: str, target: str, version: str, fields: list[tuple[str, str]]) -> None:
        self.method = method
        self.target = target
        self.version = version  # "HTTP/1.1" or "HTTP/1.0"
        self.fields = fields
        self.length = 0  # body bytes when not chunked
        self.chunked = False
        self.keep_alive = True
        self.expect_continue = False


def parse_head(head: bytes) -> Request:
    """Parse a request head (request line and field lines, each ending CRLF, without the empty line).

    Raises BadRequest for anything RFC 9112 does not allow or that could frame the body two ways.
    """
    lines = head.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    while lines and lines[0] == b"":
        lines.pop(0)  # RFC 9112 2.2: empty lines before a request line are ignored
    if not lines:
        raise BadRequest("empty request")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise BadRequest("malformed request line")
    method, target, major, minor = m.groups()
    if major != b"1":
        raise BadRequest("HTTP version not supported", 505)
    version = "HTTP/1.0" if minor == b"0" else "HTTP/1.1"
    if not (target.startswith(b"/") or target == b"*" or target[:7].lower() in (b"http://", b"https:/")):
        raise BadRequest("malformed request target")
    if len(lines) - 1 > MAX_FIELDS:
        raise BadRequest("too many header fields", 431)
    fields: list[tuple[str, str]] = []
    lengths: set[str] = set()
    hosts = encodings = 0
    te = ""
    connection = ""
    expect = ""
    for line in lines[1:]:
        f = _FIELD.fullmatch(line)
        if f is None:
            raise BadRequest(_field_problem(line))
        name = f[1].decode("ascii")
        value = (f[2] or b"").decode("latin-1")
        fields.append((name, value))
        lower = name.lower()
        if lower == "content-length":
            lengths.update(v.strip(" \t") for v in value.split(","))
        elif lower == "transfer-encoding":
            encodings += 1
            te = value
        elif lower == "host":
            hosts += 1
            if _HOST.fullmatch(value) is None:
                raise BadRequest("invalid Host header")
        elif lower == "connection":
            connection += "," + value.lower()
        elif lower == "expect":
            expect = value.lower()
    request = Request(method.decode("ascii"), target.decode("ascii"), version, fields)
    if hosts > 1:
        raise BadRequest("repeated Host header")
    if hosts == 0 and version == "HTTP/1.1":
        raise BadRequest("missing Host header")
    if encodings:
        if lengths:
            raise BadRequest("both Transfer-Encoding and Content-Length")
        if version == "HTTP/1.0":
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        # Exactly `chunked`: anything a proxy might read differently (a list, parameters, other codings,
        # a second field) is refused rather than guessed at.
        if encodings > 1 or te.lower() != "chunked":
            raise BadRequest("Transfer-Encoding other than chunked")
        request.chunked = True
    elif lengths:
        if len(lengths) > 1:
            raise BadRequest("conflicting Content-Length headers")
        (length,) = lengths
        if _DIGITS.fullmatch(length) is None:
            raise BadRequest("invalid Content-Length header")
        request.length = int(length)
    tokens = {t.strip(" \t") for t in connection.split(",")}
    request.keep_alive = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
    request.expect_continue = expect == "100-continue" and version == "HTTP/1.1"
    return request


def _field_problem(line: bytes) -> str:
    """Name what is wrong with a field line that did not match (only on the error path)."""
    if line[:1] in (b" ", b"\t"):
        return "obsolete line folding in a header"
    name, colon, _ = line.partition(b":")
    if not colon:
        return "header line without a colon"
    if name[-1:] in (b" ", b"\t"):
        return "whitespace before a colon in a header"
    if not name or not re.fullmatch(_TCHAR + rb"+", name):
        return "invalid header name"
    return "control character in a header value"


def check_chunk_line(line: bytes) -> int:
    """The size from a chunk-size line (without its CRLF); BadRequest if it is not well formed."""
    m = _CHUNK_LINE.fullmatch(line)
    if m is None:
        raise BadRequest("malformed chunked body")
    return int(m[1], 16)


def read_until(sock: socket.socket, terminator: bytes, limit: int, deadline: float | None,
               timeout: float) -> bytes:
    """Read up to and including `terminator` without consuming a byte past it.

    Returns b"" at end of stream before any byte. Raises BadRequest when more than `limit` bytes come
    without the terminator or a bare CR, bare LF or NUL shows up first, TimeoutError past the deadline
    (or `timeout` per read when there is no deadline), ConnectionError when the stream ends midway.
    """
    data, unread, _ = peek_until(sock, terminator, limit, deadline, timeout)
    if unread:
        _recv_exactly(sock, unread)
    return data


def peek_until(sock: socket.socket, terminator: bytes, limit: int, deadline: float | None,
               timeout: float) -> tuple[bytes, int, int]:
    """read_until that leaves the end of what it found in the socket: (found, unread, spare).

    `found` ends with `terminator`; its last `unread` bytes are still to be consumed, and `spare` more
    bytes after it had already arrived. A request head and its body usually come in one packet: the
    caller consumes both with one recv instead of three more system calls for the body (each one
    gives up the GIL and waits to get it back).
    """
    buf = bytearray()
    keep = len(terminator) - 1
    while True:
        wait = timeout if deadline is None else deadline - time.monotonic()
        if wait <= 0:
            raise TimeoutError("request head timeout")
        sock.settimeout(wait)
        data = sock.recv(limit + len(terminator) - len(buf), socket.MSG_PEEK)
        if not data:
            if buf:
                raise ConnectionError("connection closed in the middle of a request")
            return b"", 0, 0
        tail = bytes(buf[-keep:]) if buf else b""
        at = (tail + data).find(terminator)
        if at >= 0:
            take = at + len(terminator) - len(tail)
            return bytes(buf) + data[:take], take, len(data) - take
        buf += sock.recv(len(data))  # consume exactly what was peeked, then wait for more
        if len(buf) > limit:
            raise BadRequest("request head too large", 431) if limit == MAX_HEAD else BadRequest("line too long")
        if _BROKEN_LINE_END.search(buf):  # a CR at the very end is not yet known to be bare
            # Found early so a client ending lines with a bare LF is told at once, not after the timeout.
            raise BadRequest("bare CR, bare LF or NUL in the request head")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n, socket.MSG_WAITALL)
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise ConnectionError("connection closed in the middle of a request")
        data += more
    return data


class Body:
    """`wsgi.input`: exactly the request's body, Content-Length or chunked, never a byte more.

    `read(n)` returns n bytes unless the body ends first. A malformed chunk raises BadRequest (a
    ValueError), a client that stops sending raises an OSError; either way `failed` is set and the
    server closes the connection after the response.
    """

    def __init__(self, sock: socket.socket, request: Request, timeout: float,
                 on_first_read: Callable[[], None] | None = None, whole: bytes | None = None) -> None:
        self._sock = sock
        self._timeout = timeout
        self._chunked = request.chunked
        self._left = 0 if request.chunked else request.length  # bytes left in the body or current chunk
        self._done = not request.chunked and request.length == 0
        self._on_first_read = on_first_read
        self._whole = whole
        self.failed = False

    @property
    def complete(self) -> bool:
        """Whether the socket is at the end of this request, so the connection may carry the next one.

        A body read with the head counts even if the app never read it (a 401 before the JSON).
        """
        return (self._done or self._whole is not None) and not self.failed

    def read(self, size: int | None = -1) -> bytes:
        if self._done or size == 0:
            return b""
        if self._whole is not None:
            out, self._whole = (self._whole, b"") if size is None or size < 0 else (
                self._whole[:size], self._whole[size:])
            self._left -= len(out)
            self._done = self._left == 0
            return out
        if self._on_first_read is not None:
            self._on_first_read()
            self._on_first_read = None
        out = bytearray()
        try:
            while not self._done and (size is None or size < 0 or len(out) < size):
                if self._left == 0:
                    self._next_chunk()
                    continue
                want = self._left if size is None or size < 0 else min(self._left, size - len(out))
                self._sock.settimeout(self._timeout)
                data = self._sock.recv(min(want, 256 * 1024))
                if not data:
                    raise ConnectionError("request body cut short")
                out += data
                self._left -= len(data)
                if self._left == 0:
                    if self._chunked:
                        if _recv_exactly(self._sock, 2) != b"\r\n":
                            raise BadRequest("malformed chunked body")
                    else:
                        self._done = True
        except (OSError, ValueError):
            self.failed = self._done = True
            raise
        return bytes(out)

    def _next_chunk(self) -> None:
        line = read_until(self._sock, b"\r\n", MAX_CHUNK_LINE, None, self._timeout)
        if not line:
            raise ConnectionError("request body cut short")
        size = check_chunk_line(line[:-2])
        if size:
            self._left = size
            return
        for _ in range(MAX_FIELDS + 1):  # trailer fields, read and dropped; then the empty line
            line = read_until(self._sock, b"\r\n", MAX_CHUNK_LINE, None, self._timeout)
            if line == b"\r\n":
                self._done = True
                return
            if not line:
                raise ConnectionError("request body cut short")
            if _FIELD.fullmatch(line[:-2]) is None:
                raise BadRequest("malformed chunked body trailer")
        raise BadRequest("too many trailer fields")

    def readline(self, size: int | None = -1) -> bytes:
        # Bodies here are JSON read whole; a line reader one byte at a time is enough for the rare caller.
        out = bytearray()
        while size is None or size < 0 or len(out) < size:
            byte = self.read(1)
            out += byte
            if not byte or byte == b"\n":
                break
        return bytes(out)

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self):
        return iter(self.readline, b"")


_date = (-1, "")


def http_date() -> str:
    """The Date header value for now; formatted once per second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True))
    return _date[1]


class _Environ(dict):
    """The WSGI environ; notices the moment the app takes the socket, so drain() stops counting it."""

    on_upgrade: Callable[[], None] = staticmethod(lambda: None)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if key == UPGRADED and value:
            self.on_upgrade()


class RequestHandler(BaseHTTPRequestHandler):
    """One client connection: reads heads, calls the WSGI app, writes its responses."""

    protocol_version = "HTTP/1.1"
    server_version = "wallet"
    server: Server

    def __init__(self, request: socket.socket, client_address: Any, server: Server) -> None:
        # Not BaseRequestHandler's constructor, which would serve the whole connection at once: a
        # connection is served in turns, on a new thread each time a request comes after a pause.
        self.request = self.connection = request
        self.client_address = client_address
        self.server = server
        self.wfile = request.makefile("wb")  # buffered: one send for a head and a small body
        self.close_connection = True
        self.request_version = "HTTP/1.1"
        self.command = ""
        self.requestline = ""

    def finish(self) -> None:
        try:
            self.wfile.close()
        except OSError:
            pass

    def serve(self, conn: _Conn) -> bool:
        """Answer requests on the connection while they come without a pause; True to keep it open.

        Runs on a connection thread once the connection has something to read; the head must be
        complete by `conn.deadline`.
        """
        server = self.server
        while True:
            try:
                head, unread, spare = peek_until(self.connection, b"\r\n\r\n", MAX_HEAD, conn.deadline, 0)
                if head.strip(b"\r\n") == b"" and head:
                    _recv_exactly(self.connection, unread)
                    continue  # empty lines before a request line (RFC 9112 2.2): keep the same deadline
            except BadRequest as exc:
                self._refuse(exc)
                return False
            except OSError:
                return False  # timed out, closed by the client or by drain(): nothing to answer
            if not head or not server._begin_request(conn):
                return False
            try:
                keep_alive = self._serve(head, unread, spare, conn)
            finally:
                server._end_request(conn)
            if not keep_alive:
                return False
            conn.deadline = time.monotonic() + server.head_timeout
            # A client that sends its next request right away keeps this thread; one that pauses
            # gives it back and waits in the server's poller, which holds no thread.
            if not _readable_within(self.connection, KEEP_THREAD):
                return True

    def _serve(self, head: bytes, unread: int, spare: int, conn: _Conn) -> bool:
        """Answer one request whose head's last `unread` bytes are still in the socket; whether the
        connection may carry another."""
        try:
            request = parse_head(head[:-4])
        except BadRequest as exc:
            self._refuse(exc)  # closes after draining the input, the head's unread bytes included
            return False
        self.command, self.request_version = request.method, request.version
        self.requestline = f"{request.method} {request.target} {request.version}"
        # Not for chunked bodies (framing to check) nor 100-continue (the client waits for our 100).
        whole = not request.chunked and not request.expect_continue and 0 < request.length <= spare
        try:
            data = _recv_exactly(self.connection, unread + (request.length if whole else 0))
        except OSError:
            return False
        body = Body(self.connection, request, self.server.head_timeout,
                    self._send_continue if request.expect_continue else None,
                    whole=data[unread:] if whole else None)
        environ = self._environ(request, body, conn)
        response: list[Any] = []
        written: list[bytes] = []  # the legacy write() callable's data, sent before the returned body

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
            response[:] = [status, headers]
            return written.append

        try:
            result = self.server.app(environ, start_response)
            try:
                returned = b"".join(result)
                payload = b"".join(written) + returned
            finally:
                if hasattr(result, "close"):
                    result.close()
        except Exception:
            if environ.get(UPGRADED):
                log.exception("unhandled error in the WSGI app after an upgrade")
                return False
            if body.failed:
                self._refuse(BadRequest("malformed request body"))
                return False
            log.exception("unhandled error in the WSGI app")
            response[:] = ["500 Internal Server Error", [("Content-Type", "application/json")]]
            payload = error_json("internal_error", "internal server error")
        if environ.get(UPGRADED):
            return False  # the socket belongs to the app's protocol, which has ended: close it
        status, headers = response
        close = not request.keep_alive or self.server.draining or not body.complete
        for name, value in headers:
            if name.lower() == "connection" and "close" in value.lower():
                close = True
        try:
            self._respond(status, headers, payload, close)
        except OSError:
            return False
        if close and not body.complete:
            self._linger()
        return not close

    def _environ(self, request: Request, body: Body, conn: _Conn) -> _Environ:
        target = request.target
        host = None
        if target.startswith("/"):
            path, _, query = target.partition("?")
        elif target == "*":
            path, query = "*", ""
        else:
            url = urlsplit(target)
            path, query, host = url.path or "/", url.query, url.netloc
        server_host, server_port = self.server.server_address[:2]
        environ = _Environ({
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": body,
            "wsgi.input_terminated": True,  # Body ends exactly where the request does
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "werkzeug.socket": self.connection,
            "SERVER_SOFTWARE": self.server_version,
            "REQUEST_METHOD": request.method,
            "SCRIPT_NAME": "",
            # PEP 3333: percent-decoded UTF-8 bytes carried as latin-1 text, as Werkzeug's server does.
            "PATH_INFO": unquote(path).encode().decode("latin-1"),
            "QUERY_STRING": query,
            "REQUEST_URI": target,
            "RAW_URI": target,
            "REMOTE_ADDR": self.client_address[0],
            "REMOTE_PORT": self.client_address[1],
            "SERVER_NAME": str(server_host),
            "SERVER_PORT": str(server_port),
            "SERVER_PROTOCOL": request.version,
        })
        for name, value in request.fields:
            if "_" in name:
                continue  # X_Forwarded_For would otherwise pose as X-Forwarded-For in the environ
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
                if key in environ:
                    value = environ[key] + ("; " if key == "HTTP_COOKIE" else ", ") + value
            environ[key] = value
        if request.length:
            environ["CONTENT_LENGTH"] = str(request.length)
        if host:
            environ["HTTP_HOST"] = host  # RFC 9112 3.2.2: the absolute-form authority wins over Host
        environ.on_upgrade = lambda: self.server._upgraded(conn)
        self.connection.settimeout(None)  # the app's own protocol, if it takes the socket, sets its own
        return environ

    def _send_continue(self) -> None:
        self.send_response_only(100)
        self.end_headers()
        self.connection.settimeout(self.server.head_timeout)
        self.wfile.flush()

    def _respond(self, status: str, headers: Iterable[tuple[str, str]], payload: bytes, close: bool) -> None:
        code_text, _, reason = status.partition(" ")
        code = int(code_text)
        self.send_response(code, reason or None)
        length = None
        for name, value in headers:
            lower = name.lower()
            if lower == "content-length":
                length = value
            elif lower not in _HOP_BY_HOP:
                self.send_header(name, value)
        bodyless = code in (204, 304) or code < 200
        if not bodyless:
            # HEAD: the app's length of the body it would send, which it did not; else the real length.
            head_length = self.command == "HEAD" and length is not None and length.isdigit()
            self.send_header("Content-Length", length if head_length else str(len(payload)))
        if close:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":
            self.send_header("Connection", "keep-alive")
        self.end_headers()
        if self.command != "HEAD" and not bodyless:
            self.wfile.write(payload)
        self.connection.settimeout(self.server.head_timeout)  # a client that never reads is dropped
        self.wfile.flush()

    def _refuse(self, exc: BadRequest) -> None:
        """Answer a malformed request with the contract's JSON error and close the connection."""
        payload = error_json(CODE_OF_STATUS.get(exc.status, "invalid_request"), exc.message)
        if exc.status not in (400, 413, 431, 505):
            exc.status = 400
        log.info("http - - %d malformed request from %s: %s", exc.status, self.client_address[0], exc.message)
        self.command = ""
        try:
            self._respond(str(exc.status), [("Content-Type", "application/json")], payload, True)
        except OSError:
            return
        self._linger()

    def _linger(self) -> None:
        """Close our side, then read and drop what the client still sends for a moment.

        Closing a socket with unread input makes the kernel send a reset, which can destroy the
        answer before the client reads it.
        """
        sock = self.connection
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER
            dropped = 0
            while dropped < 1 << 20:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                sock.settimeout(wait)
                data = sock.recv(65536)
                if not data:
                    break
                dropped += len(data)
        except OSError:
            pass

    # http.server hooks --------------------------------------------------------------------------

    def version_string(self) -> str:
        return self.server_version

    def date_time_string(self, timestamp: float | None = None) -> str:
        return http_date() if timestamp is None else email.utils.formatdate(timestamp, usegmt=True)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self._refuse(BadRequest(message or "malformed HTTP request", code))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # the app logs every request itself, with its request id

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def _readable_within(sock: socket.socket, seconds: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(seconds * 1000))


class _Conn:
    """What the server knows of one client connection."""

    __slots__ = ("sock", "address", "state", "deadline", "handler")

    def __init__(self, sock: socket.socket, address: Any, deadline: float) -> None:
        self.sock = sock
        self.address = address
        # waiting (for a request, in the poller, no thread) | reading (a head, on a thread) | busy (in the
        # app) | upgraded (the app owns the socket) | closed
        self.state = "waiting"
        self.deadline = deadline  # for the next request head
        self.handler: RequestHandler | None = None


class Server:
    """Serves a WSGI app on a listening socket bound by the caller (see bind()).

    One thread, in serve_forever(), accepts connections and watches every connection that waits for a
    request (new, or kept alive after a response) with one poller: such a connection holds no thread,
    and one that the client closes is closed there at once. When a request starts to arrive, a
    connection thread serves it (and those that follow without a pause).

    At most `max_connections` client connections at once, upgraded ones included; one more is answered
    503 by the accepting thread and closed. A request head must be complete within `head_timeout`
    seconds of the connection or of the previous response.

    Shutdown: `shutdown()` stops accepting, `server_close()` closes the listening socket and every
    connection waiting for a request, and `drain(timeout)` closes connections waiting for a request,
    waits for requests in flight to be answered (their connections close after the answer) and returns
    whether they all were. Upgraded connections belong to the app, which closes them.
    """

    def __init__(self, sock: socket.socket, app: Callable, *, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 head_timeout: float = HEAD_TIMEOUT) -> None:
        self.socket = sock
        self.server_address = sock.getsockname()
        self.app = app
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.draining = False
        self.shed = 0  # connections refused with 503 since start
        self._conns: dict[socket.socket, _Conn] = {}
        self._busy = 0
        self._lock = threading.Condition()
        self._returned: list[_Conn] = []  # connections handed back to the poller by their threads
        self._poller = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._running = False
        self._close_waiting_requested = False
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._shed_logged = 0.0

    # the accepting and polling thread ---------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and watch connections until shutdown(); poll_interval bounds how late a timeout is seen."""
        self.socket.setblocking(False)
        self._poller.register(self.socket, selectors.EVENT_READ, "listen")
        self._poller.register(self._wake_r, selectors.EVENT_READ, "wake")
        tick = min(poll_interval, self.head_timeout / 5)
        next_sweep = time.monotonic() + tick
        with self._lock:
            self._running = True
        self._stopped.clear()
        try:
            while not self._stop.is_set():
                for key, _ in self._poller.select(tick):
                    try:
                        if key.data == "listen":
                            self._accept()
                        elif key.data == "wake":
                            try:
                                while self._wake_r.recv(4096):
                                    pass
                            except BlockingIOError:
                                pass
                        else:
                            self._arrived(key.data)
                    except Exception:  # a bug with one connection must not stop the listener
                        log.exception("error in the HTTP accept loop")
                self._adopt_returned()
                if self._close_waiting_requested:
                    self._close_waiting()
                now = time.monotonic()
                if now >= next_sweep:
                    self._expire(now)
                    next_sweep = now + tick
        finally:
            with self._lock:
                self._running = False
            self._close_waiting()  # nobody watches them any more
            for sock in (self.socket, self._wake_r):
                try:
                    self._poller.unregister(sock)
                except (KeyError, ValueError):
                    pass
            self._stopped.set()

    def _accept(self) -> None:
        for _ in range(256):  # then let the other events have a turn
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the connection stays queued; pause so this loop does not spin.
                    time.sleep(0.05)
                return
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    conn = _Conn(sock, address, time.monotonic() + self.head_timeout)
                    self._conns[sock] = conn
            if full:
                self._shed(sock)
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                self._poller.register(sock, selectors.EVENT_READ, conn)
            except (OSError, ValueError):
                self._release(conn)

    def _arrived(self, conn: _Conn) -> None:
        """A waiting connection is readable: a request is coming, or the client closed it."""
        try:
            data = conn.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._poller.unregister(conn.sock)
        with self._lock:
            if conn.state != "waiting":
                return  # closed by close_idle() meanwhile
            conn.state = "reading" if data else "closed"
        if not data:
            self._release(conn)  # the client went away: no thread needed to find that out
            return
        try:
            threading.Thread(target=self._serve_connection, args=(conn,), name="http-conn", daemon=True).start()
        except RuntimeError:  # no thread to be had: the machine is over its limit
            self._release(conn)

    def _adopt_returned(self) -> None:
        with self._lock:
            returned, self._returned = self._returned, []
        for conn in returned:
            try:
                conn.sock.setblocking(False)
                self._poller.register(conn.sock, selectors.EVENT_READ, conn)
            except (OSError, ValueError, KeyError):
                self._release(conn)

    def _expire(self, now: float) -> None:
        """Close waiting connections whose request head is overdue."""
        with self._lock:
            late = [c for c in self._conns.values() if c.state == "waiting" and c.deadline <= now]
            for conn in late:
                conn.state = "closed"
        for conn in late:
            self._unwatch(conn)

    def _shed(self, sock: socket.socket) -> None:
        """503 from the accepting thread: never blocks, never starts a thread."""
        self.shed += 1
        payload = error_json("unavailable", "too many connections, try again later")
        head = (f"HTTP/1.1 503 Service Unavailable\r\nServer: {RequestHandler.server_version}\r\n"
                f"Date: {http_date()}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                f"Connection: close\r\n\r\n")
        try:
            sock.setblocking(False)
            # Whatever the client already sent is read first: closing over unread input sends a reset.
            try:
                while sock.recv(65536):
                    pass
            except BlockingIOError:
                pass
            sock.send(head.encode() + payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            sock.close()
        now = time.monotonic()
        if now - self._shed_logged > 5:
            self._shed_logged = now
            log.warning("connection limit %d reached: refusing new connections with 503 (%d so far)",
                        self.max_connections, self.shed)

    def _unwatch(self, conn: _Conn) -> None:
        """Stop watching a connection the poller held and close it."""
        try:
            self._poller.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        self._release(conn)

    def _wake(self) -> None:
        """Wake the poller thread so it sees returned connections and requests made of it."""
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # the poller is already awake: its wake-up socket is full

    # connection threads ---------------------------------------------------------------------------------

    def _serve_connection(self, conn: _Conn) -> None:
        keep = False
        try:
            if conn.handler is None:
                conn.handler = RequestHandler(conn.sock, conn.address, self)
            keep = conn.handler.serve(conn)
        except Exception:
            log.exception("error serving a connection from %s", conn.address)
        if keep:
            with self._lock:
                if conn.state == "reading" and self._running and not self.draining:
                    conn.state = "waiting"
                    self._returned.append(conn)
                    keep = True
                else:
                    keep = False
            if keep:
                self._wake()
                return
        self._release(conn)

    def _release(self, conn: _Conn) -> None:
        with self._lock:
            if conn.state == "busy":
                self._busy -= 1
                self._lock.notify_all()
            conn.state = "closed"
            self._conns.pop(conn.sock, None)
        if conn.handler is not None:
            conn.handler.finish()  # the socket's descriptor stays open while its file object is
        try:
            conn.sock.close()
        except OSError:
            pass

    def _begin_request(self, conn: _Conn) -> bool:
        """A head has arrived; False when close_idle() already closed this connection."""
        with self._lock:
            if conn.state != "reading":
                return False
            conn.state = "busy"
            self._busy += 1
            return True

    def _end_request(self, conn: _Conn) -> None:
        with self._lock:
            if conn.state == "busy":
                conn.state = "reading"
                self._busy -= 1
                self._lock.notify_all()

    def _upgraded(self, conn: _Conn) -> None:
        """The app took the socket (environ[UPGRADED]): drain() no longer waits for this connection."""
        with self._lock:
            if conn.state == "busy":
                conn.state = "upgraded"
                self._busy -= 1
                self._lock.notify_all()

    # shutdown ------------------------------------------------------------------------------------------

    def shutdown(self, timeout: float = SHUTDOWN_WAIT) -> bool:
        """Stop accepting now, and serve_forever() soon; whether it ended within `timeout` seconds.

        The listening socket refuses connections from this call on. The loop's thread may be slow to
        get the interpreter when thousands of threads are busy (WebSockets flooding pings): rather than
        wait for it, the caller goes on; the loop closes the connections it watched as it ends.
        """
        self._stop.set()
        try:
            # Linux: stops listening (queued connections are reset) and wakes the loop, which sees _stop.
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            self._wake()
        return self._stopped.wait(timeout)

    def server_close(self) -> None:
        """Close the listening socket, and every connection waiting for a request if serve_forever() ended."""
        self.socket.close()
        if self._stopped.is_set():
            self.close_idle()

    def connection_count(self) -> int:
        """Client connections being served now (HTTP and upgraded)."""
        with self._lock:
            return len(self._conns)

    def close_idle(self) -> int:
        """Close every connection waiting for a request or reading its head; how many were closed."""
        with self._lock:
            reading = [c for c in self._conns.values() if c.state == "reading"]
            for conn in reading:
                conn.state = "closed"
            running = self._running
            if running:
                self._close_waiting_requested = True  # the poller's connections are closed by the poller
        for conn in reading:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes its thread, which then releases it
            except OSError:
                pass
        if running:
            self._wake()
            return len(reading)
        return len(reading) + self._close_waiting()

    def _close_waiting(self) -> int:
        with self._lock:
            waiting = [c for c in self._conns.values() if c.state == "waiting"]
            for conn in waiting:
                conn.state = "closed"
            self._returned.clear()
            self._close_waiting_requested = False
        for conn in waiting:
            self._unwatch(conn)
        return len(waiting)

    def drain(self, timeout: float) -> bool:
        """Close idle connections, then wait up to `timeout` s for requests in flight; True if none is left.

        Call after shutdown(): every connection then closes after its current response.
        """
        self.draining = True
        self.close_idle()
        with self._lock:
            done = self._lock.wait_for(lambda: self._busy == 0, timeout)
        self.close_idle()  # connections that finished their last request meanwhile
        return done


def bind(host: str, port: int, what: str = "HTTP") -> socket.socket:
    """Bind and listen on a TCP socket; raise OSError with a clear message when that fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(ACCEPT_BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}") from None
    return sock
