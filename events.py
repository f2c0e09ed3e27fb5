"""Event hub: numbers published events and fans them out to subscribers' bounded queues."""

import json
import logging
import threading
from collections import deque

log = logging.getLogger("wallet.events")

TOPICS = ("game_outcomes", "leaderboard", "balance")
# Event type on the wire -> the topic a client subscribes to.
_TOPIC_OF = {"game_outcome": "game_outcomes", "leaderboard": "leaderboard", "balance": "balance"}


def dumps(obj):
    # ASCII escapes: a client's text (an echoed id may hold a lone surrogate) always encodes.
    return json.dumps(obj, separators=(",", ":"))


class Message:
    """One outgoing text message; `frame` caches its WebSocket encoding, shared by all receivers."""

    __slots__ = ("text", "frame")

    def __init__(self, text):
        self.text = text
        self.frame = None


class Subscriber:
    """One connection's side of the hub: its subscription and its outbound queue.

    `wake` is called (from any thread) whenever something was queued or the
    subscriber was cut off or asked to close; it must not block.
    """

    def __init__(self, wake, queue_size=1000, on_cutoff=None, try_send=None, close_now=None):
        self.wake = wake
        self.queue_size = queue_size
        self.on_cutoff = on_cutoff
        # Optional fast path, called by the dispatcher: deliver a message at once without waking the
        # connection's thread; returns False when it could not (the message is then queued).
        self.try_send = try_send
        # Optional: close the connection from the caller's thread; returns False when it could not.
        self.close_now = close_now
        self.events = set()
        self.user_id = None
        self.cut_off = False  # queue overflowed: the connection must close with 1013
        self.close_code = None  # set by close_all() at shutdown
        self._queue = deque()

    def put(self, message):
        """Queue a reply of the connection itself (it counts toward the cap like any message)."""
        if len(self._queue) >= self.queue_size:
            self.cut_off = True  # a client that floods requests without reading the answers
        else:
            self._queue.append(message)
        self.wake()

    def has_pending(self):
        return bool(self._queue)

    def drain(self):
        """Take everything queued so far (the connection's writer calls this)."""
        out = []
        queue = self._queue
        while queue:
            out.append(queue.popleft())
        return out


class EventHub:
    """publish() is O(1) and never blocks on a subscriber: a dispatcher thread does the fan-out.

    The subscriber registry is touched only by the dispatcher thread, and
    subscribe/unsubscribe travel through the same queue as events, so a
    subscription change takes effect at a precise point of the event stream:
    once `subscribed` is queued, every later event reaches that subscriber.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._pending = deque()
        self._seq = 0
        self._connections = set()
        self._stopped = False
        self._thread = None
        # Owned by the dispatcher thread.
        self._all_outcomes = set()
        self._outcomes_by_user = {}
        self._balance_by_user = {}
        self._leaderboard_subs = set()
        self._last_seq = 0
        self._board = {"leaderboard": []}

    def start(self):
        self._thread = threading.Thread(target=self._run, name="event-dispatcher", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread:
            self._thread.join(timeout=5)

    # -- producers -----------------------------------------------------------

    def publish(self, kind, data, user_id=None):
        """Number the event and hand it to the dispatcher; called under the store's lock."""
        with self._cond:
            self._seq += 1
            self._pending.append(("event", self._seq, kind, data, user_id))
            self._cond.notify()

    def _command(self, *item):
        done = threading.Event()
        with self._cond:
            self._pending.append((*item, done))
            self._cond.notify()
        return done

    def connect(self, subscriber):
        with self._cond:
            self._connections.add(subscriber)
        return subscriber

    def subscribe(self, subscriber, events, user_id=None, reply_id=None, timeout=5.0, quiet=False):
        """Add topics (and set the connection's user id when given); wait until live.

        Queues `subscribed` (unless quiet) and the leaderboard snapshot when asked for.
        """
        action = "set_user" if quiet else "subscribe"
        return self._command(action, subscriber, tuple(events), user_id, reply_id).wait(timeout)

    def unsubscribe(self, subscriber, events, reply_id=None, timeout=5.0):
        return self._command("unsubscribe", subscriber, tuple(events), None, reply_id).wait(timeout)

    def disconnect(self, subscriber):
        with self._cond:
            self._connections.discard(subscriber)
        self._command("disconnect", subscriber, (), None, None)

    def close_all(self, code):
        """Ask every connection to close with `code` (1001 at shutdown)."""
        with self._cond:
            subscribers = list(self._connections)
        for sub in subscribers:
            sub.close_code = code
            if sub.close_now is None or not sub.close_now(code):
                sub.wake()
        return len(subscribers)

    def connection_count(self):
        # No lock: at shutdown thousands of closing connections contend for it, and len() is atomic.
        return len(self._connections)

    # -- dispatcher ----------------------------------------------------------

    def _run(self):
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                batch, self._pending = self._pending, deque()
            for item in batch:
                try:
                    if item[0] == "event":
                        self._dispatch(*item[1:])
                    else:
                        self._change(*item)
                except Exception:  # a bug here must not stop every other delivery
                    log.exception("event dispatch failed")

    def _dispatch(self, seq, kind, data, user_id):
        self._last_seq = seq
        if kind == "game_outcome":
            targets = self._all_outcomes | self._outcomes_by_user.get(user_id, set())
        elif kind == "balance":
            targets = self._balance_by_user.get(user_id, ())
        else:
            self._board = data
            targets = self._leaderboard_subs
        if not targets:
            return
        message = Message(dumps({"type": kind, "seq": seq, "data": data}))  # encoded once for all
        for sub in list(targets):
            # Most subscribers keep up: one non-blocking send from here, and their threads stay asleep.
            if not sub._queue and sub.try_send is not None and sub.try_send(message):
                continue
            if len(sub._queue) >= sub.queue_size:
                self._cut_off(sub)
            else:
                sub._queue.append(message)
                sub.wake()

    def _cut_off(self, sub):
        self._unindex(sub)
        sub.events = set()
        sub.cut_off = True
        log.warning("subscriber cut off: outbound queue full (%d messages)", sub.queue_size)
        sub.wake()
        if sub.on_cutoff:
            sub.on_cutoff()

    def _index(self, sub):
        uid = sub.user_id
        if "game_outcomes" in sub.events:
            if uid is None:
                self._all_outcomes.add(sub)
            else:
                self._outcomes_by_user.setdefault(uid, set()).add(sub)
        if "balance" in sub.events and uid is not None:
            self._balance_by_user.setdefault(uid, set()).add(sub)
        if "leaderboard" in sub.events:
            self._leaderboard_subs.add(sub)

    def _unindex(self, sub):
        self._all_outcomes.discard(sub)
        self._leaderboard_subs.discard(sub)
        for index in (self._outcomes_by_user, self._balance_by_user):
            members = index.get(sub.user_id)
            if members is not None:
                members.discard(sub)
                if not members:
                    del index[sub.user_id]

    def _change(self, action, sub, events, user_id, reply_id, done):
        try:
            if sub.cut_off:
                return
            self._unindex(sub)
            if action == "disconnect":
                sub.events = set()
                return
            if action in ("subscribe", "set_user"):
                sub.events |= set(events)
                if user_id is not None:
                    sub.user_id = user_id
                if action == "set_user":
                    self._index(sub)
                    return
                reply = {"type": "subscribed", "events": sorted(sub.events), "user_id": sub.user_id}
            else:
                sub.events -= set(events)
                reply = {"type": "unsubscribed", "events": sorted(sub.events)}
            self._index(sub)
            if reply_id is not None:
                reply["id"] = reply_id
            sub.put(Message(dumps(reply)))
            if action == "subscribe" and "leaderboard" in events:
                sub.put(Message(dumps({"type": "leaderboard", "seq": self._last_seq, "data": self._board})))
        finally:
            done.set()
