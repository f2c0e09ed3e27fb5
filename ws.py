"""The /ws endpoint: the subscription protocol of the contract over flask-sock."""

import logging
import select
import socket
import struct
import threading
import time

from flask import request
from simple_websocket import ConnectionClosed

from events import TOPICS, Message, Subscriber, dumps
from validation import ValidationError, parse_json, validate_user_id

log = logging.getLogger("wallet.ws")

MAX_MESSAGE_BYTES = 4096
QUEUE_SIZE = 1000
PING_INTERVAL = 25
NUDGE_DELAY = 0.05
STALL_TIMEOUT = 30  # a cut-off client that still reads nothing after this long is dropped without a close frame

SERVER_OPTIONS = {"ping_interval": PING_INTERVAL, "max_message_size": MAX_MESSAGE_BYTES}


def frame_of(message):
    if message.frame is None:
        message.frame = encode_frame(message.text)  # once per event, whichever thread gets there first
    return message.frame


def encode_frame(text):
    """A server-to-client text frame (FIN, unmasked); computed once per event for all receivers."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


class _BadMessage(Exception):
    pass


class _TooBig(Exception):
    pass


def _parse_events(value, where):
    if isinstance(value, str):
        names = [n for n in value.split(",") if n] if value else []
    elif isinstance(value, list):
        names = value
    else:
        raise _BadMessage(f"{where} must be a list of event names")
    for name in names:
        if name not in TOPICS:
            raise _BadMessage(f"unknown event name {name!r} in {where}; known: {', '.join(TOPICS)}")
    return names


class Connection:
    """One WebSocket client: reads its messages and is the only writer to its socket."""

    def __init__(self, ws, hub, peer):
        self.ws = ws
        self.hub = hub
        self.peer = peer
        self.lock, self.raw = ws.sock.lock, ws.sock.raw  # see http_server.LockedSocket
        self.sub = Subscriber(ws.event.set, QUEUE_SIZE, on_cutoff=self._stall_watch, try_send=self.try_send,
                              close_now=self.close_now)
        self.finished = threading.Event()

    def _stall_watch(self):
        def abort():
            if not self.finished.is_set():
                log.warning("ws %s: cut-off client never read its backlog; dropping the connection", self.peer)
                try:
                    self.raw.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        timer = threading.Timer(STALL_TIMEOUT, abort)
        timer.daemon = True
        timer.start()

    def reply(self, obj, reply_id=None):
        if reply_id is not None:
            obj["id"] = reply_id
        self.sub.put(Message(dumps(obj)))

    def error(self, code, message, reply_id=None):
        self.reply({"type": "error", "error": code, "message": message}, reply_id)

    def subscribe(self, events, user_id, reply_id=None):
        # The hub has applied the change to self.sub by the time subscribe() returns.
        self.hub.subscribe(self.sub, events, user_id, reply_id)
        log.info("ws %s subscribed events=%s user_id=%s", self.peer, sorted(self.sub.events), self.sub.user_id)

    def handle(self, raw):
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
        if reply_id is not None and (isinstance(reply_id, bool) or not isinstance(reply_id, (str, int))):
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
                if "balance" in events and user_id is None and self.sub.user_id is None:
                    raise _BadMessage("the balance event needs a user_id")
                self.subscribe(events, user_id, reply_id)
            elif action == "unsubscribe":
                events = _parse_events(msg.get("events", []), "events")
                self.hub.unsubscribe(self.sub, events, reply_id)
                log.info("ws %s unsubscribed events=%s", self.peer, sorted(self.sub.events))
            else:
                raise _BadMessage("action must be one of subscribe, unsubscribe, ping")
        except (_BadMessage, ValidationError) as exc:
            raise _BadMessage(str(exc), reply_id) from None

    def nudge(self, send_ping=True):
        """Make sure frames sent right after the handshake are not left unread by the client.

        simple-websocket's client (1.1) reads the 101 response with one recv() and leaves any frame
        that arrived in the same read unprocessed until more data comes. Sending something a moment
        later (a ping, which every client answers, or the close frame) makes it process them.
        """
        time.sleep(NUDGE_DELAY)
        if send_ping and self.ws.connected:
            self.ws.sock.sendall(b"\x89\x00")  # an empty ping frame

    def run(self):
        ws, sub = self.ws, self.sub
        if sub.has_pending():
            self.flush()
            self.nudge()
        while True:
            if ws.connected:
                ws.event.wait(timeout=30.0)  # every state change sets the event; this is a backstop
            ws.event.clear()
            if sub.close_code and not ws.connected:  # close_now() already sent the close frame
                return f"closed with {sub.close_code}"
            try:
                # A bounded batch per pass, so a flooding client still gets flushed and cut off.
                for _ in range(100):
                    if (raw := ws.receive(timeout=0)) is None:
                        break
                    self._handle_safely(raw)
                else:
                    ws.event.set()  # more input is waiting
            except ConnectionClosed:
                return "client closed"
            self.flush()
            if sub.cut_off:
                return self.close(1013, "too slow: outbound queue full")
            if sub.close_code:
                return self.close(sub.close_code, "server shutting down")
            if not ws.connected:
                return "client closed"

    def _handle_safely(self, raw):
        size = len(raw.encode()) if isinstance(raw, str) else len(raw)
        if size > MAX_MESSAGE_BYTES:
            raise _TooBig()
        try:
            self.handle(raw)
        except _BadMessage as exc:
            self.error("invalid_message", exc.args[0], exc.args[1] if len(exc.args) > 1 else None)
            log.info("ws %s bad message: %s", self.peer, exc.args[0])

    def flush(self):
        # Under the lock, so the dispatcher's fast path cannot overtake messages taken from the queue.
        with self.lock:
            messages = self.sub.drain()
            if messages:
                self._send_all(b"".join(frame_of(m) for m in messages))

    def _send_all(self, data):
        """sendall that gives up on a client that reads nothing for STALL_TIMEOUT, or floods us meanwhile."""
        view, deadline = memoryview(data), time.monotonic() + STALL_TIMEOUT
        while view:
            try:
                view = view[self.raw.send(view, socket.MSG_DONTWAIT):]
            except BlockingIOError:
                if time.monotonic() > deadline or len(self.ws.input_buffer) > QUEUE_SIZE:
                    self.raw.shutdown(socket.SHUT_RDWR)
                    raise ConnectionClosed(1013, "client stopped reading") from None
                select.select([], [self.raw], [], 1.0)

    def try_send(self, message):
        """Dispatcher fast path: one non-blocking send; False (queue it) when busy, behind or blocked."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self.sub._queue or not self.ws.connected:
                return False
            frame = frame_of(message)
            try:
                sent = self.raw.send(frame, socket.MSG_DONTWAIT)
            except OSError:  # EAGAIN: the client is behind; other errors: its thread will find out
                return False
            if sent < len(frame):
                rest = Message(None)
                rest.frame = frame[sent:]
                self.sub._queue.append(rest)  # the rest of this frame must go out before anything else
                self.sub.wake()
            return True
        finally:
            self.lock.release()

    def close_now(self, code):
        """Shutdown path, from the main thread: send the close frame without waiting on this connection."""
        if not self.lock.acquire(timeout=0.05):
            return False  # its thread is mid-send; it will close when it wakes
        try:
            self.sub.drain()
            self.raw.send(struct.pack("!BBH", 0x88, 2, code), socket.MSG_DONTWAIT)
        except OSError:
            pass
        finally:
            self.lock.release()
        # The library will not send another close frame. This thread is not woken: with thousands of
        # connections, waking them all would starve the shutdown of the GIL; the client's close reply
        # (or EOF) wakes the reader, which wakes this connection's thread.
        self.ws.connected = False
        return True

    def close(self, code, reason):
        if self.sub.cut_off:
            self.sub.drain()  # the backlog is what the client could not take: drop it
        try:
            self.ws.close(reason=code, message=reason)
        except (ConnectionClosed, OSError):
            pass
        # Give the client a moment to answer the close, so the handshake completes cleanly.
        self.ws.thread.join(timeout=1.0)
        return f"closed with {code}"


def register(app, sock, hub):
    """Add the /ws route to a Flask app."""
    app.config["SOCK_SERVER_OPTIONS"] = SERVER_OPTIONS

    @sock.route("/ws")
    def websocket(ws):
        request.environ["wallet.websocket"] = True
        peer = f"{request.remote_addr}:{request.environ.get('REMOTE_PORT')}"
        conn = Connection(ws, hub, peer)
        hub.connect(conn.sub)
        log.info("ws %s connected query=%s", peer, request.query_string.decode("latin-1"))
        outcome = "error"
        try:
            try:
                events = _parse_events(request.args.get("events", ""), "query events")
                user_id = request.args.get("user_id")
                if user_id is not None:
                    user_id = validate_user_id(user_id, allow_int=False)
                if "balance" in events and user_id is None:
                    raise _BadMessage("the balance event needs a user_id")
            except (_BadMessage, ValidationError) as exc:
                conn.error("invalid_request", str(exc.args[0]))
                conn.flush()
                conn.nudge(send_ping=False)
                outcome = conn.close(1008, "invalid query")
                return
            if events:
                conn.subscribe(events, user_id)
            elif user_id is not None:
                hub.subscribe(conn.sub, [], user_id, quiet=True)
            outcome = conn.run()
        except _TooBig:
            outcome = conn.close(1009, "message too big")
        except ConnectionClosed:
            outcome = "client closed"
        except OSError:
            outcome = "connection lost"
        finally:
            conn.finished.set()
            hub.disconnect(conn.sub)
            log.info("ws %s disconnected (%s)", peer, outcome)

    return websocket

