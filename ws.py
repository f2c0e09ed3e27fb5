"""The /ws endpoint: CONTRACT.md section 4 (and the WebSocket parts of sections 3 and 8).

flask-sock routes and accepts the WebSocket: this module's blueprint owns the /ws routes, its
`before_request` does what must precede the 101 (origin rule, socket options, the serialized socket),
flask-sock builds simple-websocket's Server and calls `websocket(ws)`, which serves the connection.

Threads of one connection: the request's handler thread runs `Connection.run` (it reads client
messages and is the one writer of queued frames), simple-websocket's reader thread (it reassembles
messages, answers pings, sends ours, completes the closing handshake) and, shared by all, the hub's
dispatcher, which writes an event straight to a socket when the connection has nothing queued and the
kernel takes it at once (`Connection.deliver`), so connections that keep up cost no thread wake-up.
Every write goes through one lock per socket (`_SerialSocket`), which also finishes a partly written
frame before anything else is written.
"""

import logging
import re
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

import simple_websocket
from flask import Blueprint, Flask, Response, current_app, request
from flask_sock import Sock
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

import http_server
import origins
from errors import ServiceError, dumps, error_json
from events import TOPICS, Event, EventHub, Live
from logs import printable
from validation import ValidationError, parse_json, validate_user_id

log = logging.getLogger("wallet.ws")

UPGRADED: str = http_server.UPGRADED
MAX_MESSAGE_BYTES = 4096
QUEUE_SIZE = 1000  # outbound messages a client may have waiting before it is closed with 1013
PING_INTERVAL = 25
SEND_BUFFER = 64 * 1024  # kernel buffering per socket: a stalled client fills its queue soon, not after ~3 MB
STALL_TIMEOUT = 30  # a write that makes no progress for this long drops the connection without a close frame
NUDGE_DELAY = 0.05
# Later nudges (seconds after the first frames): a client slowed down enough to read the 101, the first
# frames and the first nudge in one recv() would otherwise hold them until the next 25 s ping.
NUDGE_AGAIN = (1.0, 5.0)
HANGUP_PARK = 10.0  # seconds a reader stays parked at shutdown before it ends
MAX_BATCH = 100  # client messages handled per pass, so a flooding client still gets flushed and cut off

_SINCE = re.compile(r"[0-9]{1,19}")


# -- frames --------------------------------------------------------------------------------------


def text_frame(text: str) -> bytes:
    """A server-to-client text frame (FIN, unmasked)."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


def event_frame(event: Event) -> bytes:
    """The frame of an event, encoded once for every receiver (replay included) and kept on the event."""
    frame = event.encoded
    if frame is None:
        frame = event.encoded = text_frame(dumps({"type": event.kind, "seq": event.seq, "data": event.data}))
    return frame  # type: ignore[return-value]


def _close_frame(code: int, reason: str = "") -> bytes:
    payload = struct.pack("!H", code) + reason.encode()[:123]
    return struct.pack("!BB", 0x88, len(payload)) + payload


# -- the socket and the library ------------------------------------------------------------------


def _wait_writable(sock: socket.socket, timeout: float) -> None:
    # poll, not select: descriptors of a server with thousands of connections exceed select's 1024.
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    poller.poll(timeout * 1000)


class _SerialSocket:
    """The connection's socket with every write serialized, bounded in time, and never torn.

    The library writes (handshake, pongs, pings, its close frames) through send(); this module writes
    through write()/try_write(). A frame the kernel took only in part leaves `rest`, which goes out
    before anything else. Once our close frame is out, further writes are dropped: the library would
    otherwise answer the client's close reply with a second close frame.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.raw = sock
        self.lock = threading.Lock()
        self.rest = b""
        self.close_sent = False
        self.hangup = False  # shutting down: stop reading and stop waiting to write
        self.parked = threading.Event()
        self.reads_after_hangup = 0

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self.hangup:
            # Shutting down: one more small read, enough for the client's answer to our close frame,
            # then the library's reader parks here instead of parsing more input. A client flooding
            # pings would otherwise keep a thread busy and starve the closing thread of the GIL; ending
            # the reader instead would close the socket before our close frame is out. The process
            # exits long before the park ends (it only matters to an app that lives on).
            if self.reads_after_hangup:
                self.parked.wait(HANGUP_PARK)
                return b""
            self.reads_after_hangup += 1
            size = min(size, 128)
        return self.raw.recv(size, flags)

    def send(self, data: bytes, flags: int = 0) -> int:
        with self.lock:
            if not self.close_sent:
                self.write_locked(data)
        return len(data)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        self.send(data)

    def __getattr__(self, name: str):
        return getattr(self.raw, name)

    def write_locked(self, data: bytes, give_up: Callable[[], bool] | None = None) -> None:
        """Write `rest` then `data` (the lock is held); OSError when the client stalls or floods meanwhile."""
        view = memoryview(self.rest + data if self.rest else data)
        self.rest = b""
        deadline = time.monotonic() + STALL_TIMEOUT
        while view:
            try:
                view = view[self.raw.send(view, socket.MSG_DONTWAIT):]
            except BlockingIOError:
                if self.hangup:
                    raise OSError("shutting down") from None
                if time.monotonic() > deadline or (give_up is not None and give_up()):
                    self.abort()
                    raise OSError("client stopped reading") from None
                _wait_writable(self.raw, 1.0)

    def try_write(self, data: bytes, queue: deque) -> bool | None:
        """One non-blocking attempt unless `queue` holds earlier messages: True (all sent), False (part sent:
        `rest` holds the remainder), None (nothing sent)."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            if queue or self.rest or self.close_sent:
                return None
            try:
                sent = self.raw.send(data, socket.MSG_DONTWAIT)
            except OSError:  # EAGAIN: the client is behind; other errors: its handler thread will find out
                return None
            if sent < len(data):
                self.rest = data[sent:]
                return False
            return True
        finally:
            self.lock.release()

    def close_now(self, code: int, reason: str) -> bool:
        """Shutdown: send a close frame without waiting, then hang up; False if a writer held the socket.

        A writer holding the socket is stuck on a client that does not read: it gives up at once.
        """
        self.hangup = True
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if not self.close_sent:
                data = self.rest + _close_frame(code, reason)
                self.rest = b""
                try:
                    self.raw.send(data, socket.MSG_DONTWAIT)  # a client too far behind to take it gets nothing
                except OSError:
                    pass
                self.close_sent = True
            return True
        finally:
            self.lock.release()

    def abort(self) -> None:
        try:
            self.raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class HandshakeError(Exception):
    pass


class Adapter:
    """One upgraded connection; the only code that knows simple-websocket (1.1) beyond its public API.

    flask-sock builds the library's `Server` from the request's environ and hands it to the handler;
    `prepare` runs before that, so the library finds a `_SerialSocket` where it looks for the socket
    (`environ["werkzeug.socket"]`) and does all its reading and writing through it: writes are
    serialized there, and at shutdown its reads stop there. Used internals of the `Server` (`ws`): its
    `sock`, `event` (its reader sets it on every input and state change, so one wait covers client
    messages and our own wake-ups), `input_buffer` (messages are taken without the blocking receive(),
    which clears `event` and could swallow a wake-up; its length shows a flooder), `connected` and
    `thread`. Event frames bypass the library: they are encoded once per event and written to the
    socket directly.
    """

    # What the library's Server raises for a request it cannot upgrade (nothing has been written yet).
    HANDSHAKE_ERRORS: tuple[type[Exception], ...] = (
        HandshakeError, simple_websocket.ConnectionError, RemoteProtocolError, LocalProtocolError)

    @staticmethod
    def server_options() -> dict:
        """flask-sock's SOCK_SERVER_OPTIONS. The library's own size limit counts characters, not bytes:
        `Connection.run` checks the 4 KiB in bytes as well."""
        return {"ping_interval": PING_INTERVAL, "max_message_size": MAX_MESSAGE_BYTES}

    @staticmethod
    def prepare(environ: dict) -> None:
        """Before flask-sock constructs the Server: the socket options of a WebSocket, one writer lock."""
        raw = environ.get("werkzeug.socket")
        if raw is None:
            raise HandshakeError("this server does not hand over its sockets")
        raw.settimeout(None)  # a WebSocket may stay idle as long as it likes; pings watch it
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        environ["werkzeug.socket"] = _SerialSocket(raw)
        # We write frames ourselves, so no extension (per-message deflate) may be negotiated.
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)

    def __init__(self, ws: simple_websocket.Server) -> None:
        if not isinstance(ws.sock, _SerialSocket):
            raise RuntimeError("the WebSocket's socket was not prepared (Adapter.prepare)")
        self._ws = ws
        self.sock: _SerialSocket = ws.sock

    @property
    def connected(self) -> bool:
        return self._ws.connected and not self.sock.close_sent

    @property
    def close_sent(self) -> bool:
        return self.sock.close_sent

    def wait(self, timeout: float) -> None:
        self._ws.event.wait(timeout)
        self._ws.event.clear()  # everything is re-checked after this, so no wake-up is lost

    def wake(self) -> None:
        self._ws.event.set()

    def next_message(self) -> str | bytes | None:
        buffer = self._ws.input_buffer
        return buffer.pop(0) if buffer else None

    def flooded(self) -> bool:
        return len(self._ws.input_buffer) > QUEUE_SIZE

    def write(self, take: Callable[[], bytes]) -> None:
        """Write what `take()` returns, taken under the socket's lock so no fast-path frame overtakes it."""
        sock = self.sock
        with sock.lock:
            data = take()
            if sock.close_sent:
                return
            if data or sock.rest:
                sock.write_locked(data, self.flooded)

    def try_write(self, frame: bytes, queue: deque) -> bool | None:
        return self.sock.try_write(frame, queue)

    def ping(self) -> None:
        self.sock.send(b"\x89\x00")

    def close(self, code: int, reason: str) -> None:
        """Close through the library (so it knows), then give the client a moment to answer."""
        try:
            self._ws.close(reason=code, message=reason)
        except (simple_websocket.ConnectionClosed, OSError, LocalProtocolError):
            pass
        self.sock.close_sent = True
        self._ws.thread.join(timeout=1.0)

    def hang_up(self) -> None:
        """Shutdown: stop taking input and stop waiting on writes (see _SerialSocket.recv)."""
        self.sock.hangup = True

    def close_now(self, code: int, reason: str) -> bool:
        return self.sock.close_now(code, reason)

    def end(self) -> None:
        """The handler is done: nothing more goes out. flask-sock calls `ws.close()` after the handler,
        which would otherwise wait up to STALL_TIMEOUT on a client that stopped reading."""
        self.sock.close_sent = True


# -- one connection ------------------------------------------------------------------------------


class _BadMessage(Exception):
    def __init__(self, message: str, reply_id: object = None, code: str = "invalid_message") -> None:
        super().__init__(message)
        self.reply_id, self.code = reply_id, code


def _parse_events(value: object, where: str) -> list[str]:
    if where == "query events" and isinstance(value, str):  # the query's comma-separated form
        names = [n for n in value.split(",") if n]
    elif isinstance(value, list):
        names = value
    else:
        raise _BadMessage(f"{where} must be a list of event names")
    for name in names:
        if name not in TOPICS:
            raise _BadMessage(f"unknown event name {name!r} in {where}; known: {', '.join(TOPICS)}")
    return names


def _parse_since(since: object, epoch: object, in_query: bool) -> tuple[int | None, str | None]:
    """(since, epoch) when the client asks to recover, (None, None) when it does not; _BadMessage if malformed."""
    if since is None:
        return None, None
    if in_query:
        if not isinstance(since, str) or not _SINCE.fullmatch(since):
            raise _BadMessage("since must be a non-negative integer")
        since = int(since)
    elif isinstance(since, bool) or not isinstance(since, int) or since < 0:
        raise _BadMessage("since must be a non-negative integer")
    if epoch is None:
        raise _BadMessage("since needs the epoch it belongs to")
    if not isinstance(epoch, str) or not epoch:
        raise _BadMessage("epoch must be a non-empty string")
    return since, epoch


class Connection:
    """One client: its subscription protocol, its outbound queue, and the writing of its frames.

    Implements events.Subscriber: deliver() and cancel() run on the hub's dispatcher thread.
    """

    def __init__(self, adapter: Adapter, hub: EventHub, store: object, principal: object, peer: str) -> None:
        self.adapter = adapter
        self.hub = hub
        self.store = store
        self.principal = principal
        self.peer = peer
        self.queue: deque[bytes | tuple[Event, ...]] = deque()
        self.events: tuple[str, ...] = ()
        self.user_id: str | None = None
        self.cut_off = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.sent_first = False
        self.nudges: list[float] = []  # monotonic times of the later nudges still to send

    # -- events.Subscriber (dispatcher thread) --

    def deliver(self, event: Event) -> bool:
        if self.cut_off or self.close_code:
            return True  # closing: the disconnect that follows removes it from the hub
        frame = event_frame(event)
        if not self.queue:
            sent = self.adapter.try_write(frame, self.queue)
            if sent is not None:
                if sent is False:
                    self.adapter.wake()  # the rest of the frame is this connection's to write
                return True
        return self._enqueue(frame)

    def cancel(self, reason: str) -> None:
        # The only reason today is "resync": the history was reset, the client must reconnect with since.
        self.request_close(1011, "event history reset: reconnect with since and epoch")

    # -- any thread --

    def _enqueue(self, item: bytes | tuple[Event, ...]) -> bool:
        if len(self.queue) >= QUEUE_SIZE:
            if not self.cut_off:
                self.cut_off = True
                log.warning("ws %s cut off: outbound queue full (%d messages)", self.peer, QUEUE_SIZE)
            self.adapter.wake()
            return False
        self.queue.append(item)
        self.adapter.wake()
        return True

    def request_close(self, code: int, reason: str) -> None:
        self.close_code, self.close_reason = code, reason
        self.adapter.wake()

    def hang_up(self) -> None:
        self.adapter.hang_up()

    def close_now(self, code: int, reason: str) -> bool:
        """Shutdown path: send the close frame from the caller's thread; this connection's thread stays asleep."""
        self.close_code, self.close_reason = code, reason
        if self.adapter.close_now(code, reason):
            return True
        self.adapter.wake()  # a writer holds the socket; this connection's thread closes when it is done
        return False

    def reply(self, obj: dict, reply_id: object = None) -> None:
        if reply_id is not None:
            obj["id"] = reply_id
        self._enqueue(text_frame(dumps(obj)))

    def error(self, code: str, message: str, reply_id: object = None) -> None:
        self.reply({"type": "error", "error": code, "message": message}, reply_id)

    def _on_live(self, reply_id: object, action: str) -> Callable[[Live], None]:
        """The reply to a subscription change, queued at the exact point of the event stream it took effect."""

        def on_live(live: Live) -> None:
            if action == "unsubscribe":
                self.reply({"type": "unsubscribed", "events": list(live.events)}, reply_id)
                return
            reply = {"type": "subscribed", "events": list(live.events), "user_id": live.user_id,
                     "seq": live.seq, "epoch": live.epoch}
            if live.recovered is not None:
                reply["recovered"] = live.recovered
            self.reply(reply, reply_id)
            if live.snapshot:
                board = live.board
                if board is None:  # the hub's history was reset and no board came with it: ask the store
                    try:
                        board = {"leaderboard": self.store.leaderboard()}
                    except Exception:  # noqa: BLE001 - a store outage: the client reconnects and tries again
                        log.warning("ws %s: no leaderboard for the snapshot; closing with 1011", self.peer)
                        self.request_close(1011, "leaderboard unavailable: reconnect")
                        return
                self._enqueue(text_frame(dumps({"type": "leaderboard", "seq": live.seq, "data": board})))
            if live.replay:
                self._enqueue(live.replay)  # one queue entry: encoded by the writer, not by the dispatcher

        return on_live

    # -- handler thread --

    def subscribe(self, events: list[str], user_id: str | None, since: int | None = None,
                  epoch: str | None = None, reply_id: object = None) -> None:
        new_user = user_id if user_id is not None else self.user_id
        if "balance" in events and new_user is None:
            raise _BadMessage("the balance event needs a user_id", reply_id)
        self.authorize(set(self.events) | set(events), new_user, reply_id)
        live = self.hub.subscribe(self, events, user_id, since=since, epoch=epoch,
                                  on_live=self._on_live(reply_id, "subscribe"))
        self._took_effect(live)
        log.info("ws %s subscribed events=%s user_id=%s%s", self.peer, ",".join(self.events), self.user_id,
                 "" if since is None else f" since={since} recovered={live.recovered if live else None}")

    def set_user(self, user_id: str) -> None:
        self.authorize(self.events, user_id)
        self._took_effect(self.hub.subscribe(self, [], user_id))

    def unsubscribe(self, events: list[str], reply_id: object = None) -> None:
        self._took_effect(self.hub.unsubscribe(self, events, on_live=self._on_live(reply_id, "unsubscribe")))
        log.info("ws %s unsubscribed events=%s", self.peer, ",".join(self.events))

    def _took_effect(self, live: Live | None) -> None:
        if live is None:
            if not (self.cut_off or self.close_code):
                log.error("ws %s: the event hub did not answer a subscription change", self.peer)
                self.request_close(1011, "internal error")
            return
        self.events, self.user_id = live.events, live.user_id

    def authorize(self, events: object, user_id: str | None, reply_id: object = None) -> None:
        """The credential must allow the whole subscription as it would be after the change (section 8)."""
        if self.principal is None:
            return
        try:
            self.principal.require_subscription(events, user_id)
        except ServiceError as exc:
            raise _BadMessage(exc.message, reply_id, exc.code) from None

    def handle(self, raw: str | bytes) -> None:
        """Apply one client message; a bad one gets an error reply and changes nothing."""
        if isinstance(raw, bytes):
            raise _BadMessage("binary frames are not accepted; send JSON text")
        try:
            msg = parse_json(raw)
        except (ValueError, RecursionError):
            raise _BadMessage("message is not valid JSON") from None
        if not isinstance(msg, dict):
            raise _BadMessage("message must be a JSON object")
        reply_id = msg.get("id")
        if reply_id is not None and (isinstance(reply_id, bool) or not isinstance(reply_id, str | int)):
            raise _BadMessage("id must be a string or an integer")
        action = msg.get("action")
        try:
            if action == "ping":
                self.reply({"type": "pong"}, reply_id)
            elif action == "subscribe":
                events = _parse_events(msg.get("events", []), "events")
                user_id = msg.get("user_id")
                if user_id is not None:
                    user_id = validate_user_id(user_id)
                since, epoch = _parse_since(msg.get("since"), msg.get("epoch"), in_query=False)
                self.subscribe(events, user_id, since, epoch, reply_id)
            elif action == "unsubscribe":
                self.unsubscribe(_parse_events(msg.get("events", []), "events"), reply_id)
            else:
                raise _BadMessage("action must be one of subscribe, unsubscribe, ping")
        except ValidationError as exc:
            raise _BadMessage(str(exc), reply_id) from None
        except _BadMessage as exc:
            if exc.reply_id is None and reply_id is not None:
                exc.reply_id = reply_id
            raise

    def flush(self) -> None:
        def take() -> bytes:
            queue, out = self.queue, []
            while queue:
                item = queue.popleft()
                out.append(item if isinstance(item, bytes) else b"".join(event_frame(e) for e in item))
            if self.cut_off:
                return b""  # the backlog is what the client could not take: drop it, close with 1013
            self.sent_first = self.sent_first or bool(out)
            return b"".join(out)

        self.adapter.write(take)

    def nudge(self) -> None:
        """Frames sent right with the handshake: make sure the client processes them.

        simple-websocket's client (1.1) reads the 101 response with one recv() and leaves any frame that
        came in the same read unprocessed until more data arrives (tests/test_ws.py
        test_simple_websocket_client_gets_the_frames_sent_with_the_handshake fails without this). A ping
        a moment later, which every client answers, makes it process them. Browsers, websocat and
        websocket-client do not need it; it costs one 50 ms pause of this connection's own thread.
        """
        time.sleep(NUDGE_DELAY)
        if self.adapter.connected:
            self.adapter.ping()
        now = time.monotonic()
        self.nudges = [now + delay for delay in NUDGE_AGAIN]

    def _nudge_again(self) -> None:
        if self.nudges and time.monotonic() >= self.nudges[0]:
            self.nudges.pop(0)
            if self.adapter.connected:
                self.adapter.ping()

    def _wait_timeout(self) -> float:
        timeout = 30.0  # a backstop: every state change wakes this thread
        expires = getattr(self.principal, "expires_at", None)
        if expires is not None:
            timeout = min(timeout, expires - time.time())
        if self.nudges:
            timeout = min(timeout, self.nudges[0] - time.monotonic())
        return max(0.0, timeout)

    def run(self) -> str:
        adapter = self.adapter
        self.flush()
        if self.sent_first:
            self.nudge()
        while True:
            adapter.wait(self._wait_timeout())
            self._nudge_again()
            if adapter.close_sent:
                return f"closed with {self.close_code}"  # close_now() sent the close frame already
            for _ in range(MAX_BATCH):
                raw = adapter.next_message()
                if raw is None:
                    break
                size = len(raw.encode()) if isinstance(raw, str) else len(raw)
                if size > MAX_MESSAGE_BYTES:
                    return self.close(1009, "message too big")
                try:
                    self.handle(raw)
                except _BadMessage as exc:
                    self.error(exc.code, str(exc), exc.reply_id)
                    log.info("ws %s refused message: %s", self.peer, printable(str(exc)))
                    if exc.code == "unauthorized":
                        self.request_close(1008, "credential expired")
            else:
                adapter.wake()  # more input is waiting
            self.flush()
            if self.cut_off:
                return self.close(1013, "too slow: outbound queue full")
            if self.close_code:
                return self.close(self.close_code, self.close_reason)
            if self.principal is not None and self.principal.expired():
                self.error("unauthorized", "the player token has expired")
                self.flush()
                return self.close(1008, "credential expired")
            if not adapter.connected:
                return "client closed"

    def close(self, code: int, reason: str) -> str:
        self.adapter.close(code, reason)
        return f"closed with {code}"


# -- registry, route, registration ---------------------------------------------------------------


class Registry:
    """The open connections of one app, for shutdown."""

    def __init__(self) -> None:
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._closing: int | None = None

    def add(self, conn: Connection) -> bool:
        with self._lock:
            if self._closing is None:
                self._connections.add(conn)
                return True
        conn.close_now(self._closing, "server shutting down")  # accepted during the shutdown
        return False

    def discard(self, conn: Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    def close_all(self, code: int = 1001) -> int:
        """Send every connection a close frame with `code`, from this thread, without waking theirs.

        Each send is one non-blocking write; a connection whose socket is busy (a thread mid-write) is
        asked to close and does so when its write ends. Returns how many connections were asked.
        """
        started = time.monotonic()
        with self._lock:
            self._closing = code
            connections = list(self._connections)
        # First stop every connection's input (attribute stores only, no system call, so this loop is
        # not slowed by threads competing for the GIL); then send the close frames.
        for conn in connections:
            conn.hang_up()
        busy = sum(not conn.close_now(code, "server shutting down") for conn in connections)
        log.info("close frames (%d) sent to %d WebSockets in %.0f ms; %d busy ones close on their own thread",
                 code, len(connections) - busy, (time.monotonic() - started) * 1000, busy)
        return len(connections)

    def count(self) -> int:
        return len(self._connections)  # no lock: len() is atomic and thousands of closers contend for it


def _json(status: int, code: str, message: str) -> Response:
    return Response(error_json(code, message), status, mimetype="application/json")


def _principal(auth: object) -> object:
    """The credential of the handshake (Authorization header, else the `token` query parameter)."""
    if auth is None or not auth.enabled:
        return None
    header = request.headers.get("Authorization")
    credential = auth.bearer(header) if header is not None else request.args.get("token")
    return auth.authenticate(credential)


# flask-sock routes and accepts the WebSocket (examples/blueprints): this module owns the blueprint and
# its routes, `register` installs them. Endpoint names start with "websocket" (test_openapi skips them).
sock = Sock()
bp = Blueprint("websocket", __name__)


@bp.before_request
def _before_upgrade() -> Response | None:
    """What must happen before flask-sock answers 101: the origin rule, then the socket made ready."""
    rule = request.url_rule
    if rule is None or not rule.websocket:
        return None  # a plain request to /ws: plain_request answers it
    environ = request.environ
    if not origins.origin_allowed(environ, current_app.config.get("ALLOWED_ORIGINS", ())):
        log.info("ws refused: cross-origin handshake from %s", printable(environ.get("HTTP_ORIGIN", "")))
        return _json(403, "forbidden", "cross-origin WebSocket connections are not allowed from this origin")
    try:
        Adapter.prepare(environ)
    except HandshakeError as exc:
        return _handshake_failed(exc)
    return None


def _handshake_failed(exc: Exception) -> Response:
    """The library could not upgrade the request (raised from flask-sock's Server(...), nothing written)."""
    if request.environ.get(UPGRADED):  # raised after the upgrade: a bug, not a client's handshake
        log.error("ws: WebSocket protocol error after the upgrade", exc_info=exc)
        return Response(status=500)  # never written: the socket is no longer the HTTP server's
    log.info("ws refused: invalid WebSocket handshake: %s", printable(str(exc)))
    response = _json(400, "invalid_request", "invalid WebSocket handshake")
    response.headers["Connection"] = "close"  # the socket's options were already changed for a WebSocket
    return response


for _error in Adapter.HANDSHAKE_ERRORS:
    bp.register_error_handler(_error, _handshake_failed)


def plain_request() -> Response:
    return _json(400, "invalid_request", "this endpoint only accepts WebSocket upgrades")


def websocket(ws: simple_websocket.Server) -> None:
    """A WebSocket accepted by flask-sock: authenticate, apply the query's subscription, then serve it."""
    environ = request.environ
    # The 101 is out. flask-sock returns a plain response after this handler: with this mark the HTTP
    # server writes none of it and closes the socket (a failed handshake never gets here, so its 400 is
    # still written).
    environ[UPGRADED] = True
    extensions = current_app.extensions
    hub, registry = extensions["wallet.hub"], extensions["wallet.ws"]
    adapter = Adapter(ws)
    peer = f"{request.remote_addr}:{environ.get('REMOTE_PORT')}"
    conn = Connection(adapter, hub, extensions.get("wallet.store"), None, peer)
    outcome = "error"
    try:
        if registry.add(conn):
            outcome = _serve(conn, extensions.get("wallet.auth"))
        else:
            outcome = "refused: shutting down"
    except OSError:
        outcome = "connection lost"
    finally:
        adapter.end()
        registry.discard(conn)
        hub.disconnect(conn)
        log.info("ws %s disconnected (%s)", peer, outcome)


# Werkzeug routes upgrade requests only to rules marked websocket (flask-sock marks its own); a plain
# request to the same path gets the other rule. flask-sock makes a new view per route, hence an
# endpoint per path.
for _path, _endpoint in (("/ws", "connect"), ("/ws/", "connect_slash")):
    sock.route(_path, bp=bp, endpoint=_endpoint, methods=["GET"])(websocket)
    bp.add_url_rule(_path, "plain", plain_request, methods=["GET"])


def _serve(conn: Connection, auth: object) -> str:
    args = request.args
    try:
        conn.principal = _principal(auth)
    except ServiceError as exc:
        return _refuse(conn, "unauthorized", exc.message)
    try:
        events = _parse_events(args.get("events", ""), "query events")
        user_id = args.get("user_id")
        if user_id is not None:
            user_id = validate_user_id(user_id)
        since, epoch = _parse_since(args.get("since"), args.get("epoch"), in_query=True)
        if "balance" in events and user_id is None:
            raise _BadMessage("the balance event needs a user_id")
        conn.authorize(events, user_id)
    except (_BadMessage, ValidationError) as exc:
        return _refuse(conn, "invalid_request" if exc.code == "invalid_message" else exc.code, str(exc))
    log.info("ws %s connected events=%s user_id=%s%s as %s", conn.peer, ",".join(events), user_id,
             "" if since is None else f" since={since}", getattr(conn.principal, "name", "anonymous"))
    try:
        if events:
            conn.subscribe(events, user_id, since, epoch)
        elif user_id is not None:
            conn.set_user(user_id)
    except _BadMessage as exc:  # the credential expired since it was checked
        return _refuse(conn, exc.code, str(exc))
    return conn.run()


def _refuse(conn: Connection, code: str, message: str) -> str:
    """A refused handshake (section 4 and 8): one error message, then close 1008."""
    log.info("ws %s refused at connect: %s %s", conn.peer, code, printable(message))
    conn.error(code, message)
    conn.flush()
    time.sleep(NUDGE_DELAY)  # see Connection.nudge: the close frame then comes in a later read
    return conn.close(1008, code)


def register(app: Flask) -> Registry:
    """Install GET /ws and /ws/ on `app`; return the connection registry (also `app.extensions["wallet.ws"]`).

    At request time the hub and the store come from `app.extensions["wallet.hub"]` / `["wallet.store"]`,
    the authenticator from `["wallet.auth"]` (absent or disabled: authentication off), the allowed
    origins from `app.config["ALLOWED_ORIGINS"]` (normalized, see origins.parse_allowed), and flask-sock's
    options from `app.config["SOCK_SERVER_OPTIONS"]` (ours, unless the app set them first). At shutdown
    call `registry.close_all(1001)`, then poll `registry.count()` for as long as the budget allows.
    """
    registry = Registry()
    app.extensions["wallet.ws"] = registry
    app.config["SOCK_SERVER_OPTIONS"] = {**Adapter.server_options(), **app.config.get("SOCK_SERVER_OPTIONS", {})}
    sock.init_app(app)
    app.register_blueprint(bp)
    return registry
