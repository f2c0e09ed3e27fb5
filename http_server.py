"""In-process threaded HTTP/1.1 server for the WSGI app: keep-alive, WebSocket hand-off, graceful drain.

Built on Werkzeug's threaded server (one thread per connection, so a long-lived
WebSocket never starves HTTP), with the parts a production listener needs and
the development server lacks: persistent connections, JSON errors for
malformed requests, quiet logs, and a drain that lets requests in flight finish.
"""

import json
import logging
import socket
import threading

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

log = logging.getLogger("wallet.http")

IDLE_TIMEOUT = 75  # seconds a keep-alive connection may sit idle between requests
WS_SEND_BUFFER = 64 * 1024  # caps kernel buffering so a stalled WebSocket client fills its app queue soon

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Content Too Large", 422: "Unprocessable Content",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


class LockedSocket:
    """The connection socket with every write serialized.

    simple-websocket writes pongs and pings from its reader thread while our
    handler thread and the event dispatcher write events; unserialized, frames
    could interleave. Hold `lock` and use `raw` to write several frames at once.
    """

    def __init__(self, sock):
        self._sock = self.raw = sock
        self.lock = threading.Lock()

    def send(self, data):
        with self.lock:
            self._sock.sendall(data)
        return len(data)

    def sendall(self, data):
        with self.lock:
            self._sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _CountingInput:
    """Counts body bytes the app read, to know whether the connection can be reused."""

    def __init__(self, stream):
        self._stream = stream
        self.count = 0

    def read(self, size=-1):
        data = self._stream.read(size)
        self.count += len(data)
        return data

    def readline(self, size=-1):
        data = self._stream.readline(size)
        self.count += len(data)
        return data

    def __iter__(self):
        return iter(self.readline, b"")


def error_body(code, message):
    return json.dumps({"error": code, "message": message}).encode()


class RequestHandler(WSGIRequestHandler):
    """One client connection: parses requests with http.server and calls the WSGI app."""

    server_version = "wallet"
    sys_version = ""

    def setup(self):
        super().setup()
        self.connection.settimeout(IDLE_TIMEOUT)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self):
        try:
            super().handle()
        except (OSError, ValueError):
            pass  # the client went away or the drain shut the socket: nothing to answer

    def send_error(self, code, message=None, explain=None):
        """Malformed request lines and headers get the contract's JSON error, not an HTML page."""
        status = 400 if code not in (413, 414, 431, 501, 505) else code
        kind = "payload_too_large" if code == 413 else "invalid_request"
        body = error_body(kind, message or "malformed HTTP request")
        self.close_connection = True
        try:
            self.wfile.write(self._head(status, [("Content-Type", "application/json")], len(body), False) + body)
        except OSError:
            pass
        log.info("http - - %d malformed request from %s: %s", status, self.client_address[0], message)

    def log_request(self, code="-", size="-"):
        pass  # the app logs every request itself, with its request id

    def log_error(self, format, *args):
        log.debug("connection: " + format, *args)

    def log_message(self, format, *args):
        log.debug(format, *args)

    def _head(self, status, headers, length, keep_alive):
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() not in ("content-length", "connection")]
        lines.append(f"Content-Length: {length}")
        if not keep_alive:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def run_wsgi(self):
        server = self.server
        lengths = set(self.headers.get_all("Content-Length") or ())
        if len(lengths) > 1 or any(not v.strip().isdigit() for v in lengths):
            self.send_error(400, "invalid Content-Length header")
            return
        environ = self.make_environ()
        counter = None
        if environ.get("wsgi.input_terminated"):
            self.close_connection = True  # chunked: simplest to not reuse the connection
        elif environ.get("CONTENT_LENGTH"):
            counter = environ["wsgi.input"] = _CountingInput(environ["wsgi.input"])
        websocket = environ.get("HTTP_UPGRADE", "").lower() == "websocket" and environ["PATH_INFO"] == "/ws"
        if websocket:
            conn = self.connection
            conn.settimeout(None)  # a WebSocket may be idle for as long as it likes; pings watch it
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WS_SEND_BUFFER)
            environ["werkzeug.socket"] = LockedSocket(conn)
            # Per-message deflate would compress each event once per connection; events are small.
            environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)

        status_headers = []

        def start_response(status, headers, exc_info=None):
            status_headers[:] = [status, headers]

        # WebSockets are closed by the hub at shutdown; the drain waits only for plain requests.
        if not websocket:
            server.request_started()
        try:
            try:
                result = server.app(environ, start_response)
                try:
                    body = b"".join(result)
                finally:
                    if hasattr(result, "close"):
                        result.close()
            except Exception:
                log.exception("unhandled error in the WSGI app")
                body = error_body("internal_error", "internal server error")
                status_headers[:] = ["500 INTERNAL SERVER ERROR", [("Content-Type", "application/json")]]
            if environ.get("wallet.websocket"):
                self.close_connection = True  # the socket now belongs to the finished WebSocket
                return
            length = int(environ.get("CONTENT_LENGTH") or 0)
            if environ.get("wallet.close_connection") or (counter is not None and counter.count < length):
                self.close_connection = True  # unread body bytes would be parsed as the next request
            keep_alive = not self.close_connection and not server.draining
            status = int(status_headers[0].split(None, 1)[0])
            head = self._head(status, status_headers[1], len(body), keep_alive)
            self.wfile.write(head if self.command == "HEAD" else head + body)
            self.close_connection = not keep_alive
        finally:
            if not websocket:
                server.request_finished()


class Server(ThreadedWSGIServer):
    """Threaded server over a socket bound by the caller, counting requests in flight for the drain."""

    block_on_close = False  # shutdown is handled by drain(), which bounds the wait
    daemon_threads = True

    def __init__(self, sock, app):
        host, port = sock.getsockname()[:2]
        super().__init__(host, port, app, handler=RequestHandler, fd=sock.fileno())
        sock.close()  # Werkzeug duplicated the descriptor
        self.draining = False
        self._lock = threading.Condition()
        self._in_flight = 0

    def request_started(self):
        with self._lock:
            self._in_flight += 1

    def request_finished(self):
        with self._lock:
            self._in_flight -= 1
            self._lock.notify_all()

    def drain(self, timeout):
        """Wait for requests in flight (WebSockets excluded by the caller closing them first)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._in_flight == 0, timeout)


def bind(host, port, what="HTTP"):
    """Bind and listen on a TCP socket; raise OSError with a clear message when that fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}") from None
    return sock
