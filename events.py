"""The event log: global sequence numbers, the retained history and its epoch, the topic index, ordered fan-out.

Whatever produces events (the in-process `MemoryEventLog`, or a Redis stream reader) numbers them and
hands them to `EventHub.feed` in seq order. One dispatcher thread owns everything else: it appends each
event to the history and delivers it to the subscribers whose subscription matches. Subscription changes
travel through the same queue as the events, so a change takes effect at an exact point of the stream:
the `Live` it produces names the last seq before it, any replay is taken from the history at that same
point, and every later event is delivered live. There is one ordering for replay and live delivery.

Nothing here knows sockets, frames or close codes: a subscriber is anything that implements `Subscriber`.
"""

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

log = logging.getLogger("wallet.events")

TOPICS = ("game_outcomes", "leaderboard", "balance")
HISTORY = 10_000  # events retained for recovery (CONTRACT.md section 4: at least the newest 10,000)
CATCH_UP = 2.0  # seconds a recovery waits for this hub to reach a `since` the client got from another process
EMPTY_BOARD = {"leaderboard": []}
# Events nobody can receive are taken into the history in batches of this many, or after this long.
_LAZY_BATCH = 64
_LAZY_WAIT = 0.05


def new_epoch() -> str:
    """A fresh name for a history that starts now (a new process, or a history that was lost)."""
    return secrets.token_hex(8)


class Event:
    """One published event. `encoded` is free for a consumer to cache its wire form once for all receivers."""

    __slots__ = ("seq", "kind", "data", "user_id", "encoded")

    def __init__(self, seq: int, kind: str, data: dict, user_id: str | None) -> None:
        self.seq = seq
        self.kind = kind
        self.data = data
        self.user_id = user_id
        self.encoded: object = None

    def __repr__(self) -> str:
        return f"Event({self.seq}, {self.kind!r}, user_id={self.user_id!r})"


class Subscriber(Protocol):
    """What the hub needs of a subscriber. Both methods are called on the dispatcher thread: never block."""

    def deliver(self, event: Event) -> bool:
        """Take one live event; False means "overflowed, drop me" (the hub forgets the subscriber)."""
        ...

    def cancel(self, reason: str) -> None:
        """The hub has dropped this subscriber; `reason` is "resync" (the history was reset)."""
        ...


class Live(NamedTuple):
    """A subscription change as it took effect.

    `seq` is the last event before the change (every later matching event is delivered live); `recovered`
    is None unless recovery was asked; `replay` holds the retained matching events after `since` when
    recovered; `board` is the current leaderboard when a snapshot is due (subscribe with `leaderboard`,
    not recovered) and the hub knows it, else None.
    """

    events: tuple[str, ...]
    user_id: str | None
    seq: int
    epoch: str
    recovered: bool | None = None
    replay: tuple[Event, ...] = ()
    board: dict | None = None
    snapshot: bool = False


OnLive = Callable[[Live], None]


def matches(event: Event, topics: Iterable[str], user_id: str | None) -> bool:
    """Whether a subscription to `topics` (filtered by `user_id`) receives `event` (CONTRACT.md section 4)."""
    if event.kind == "game_outcome":
        return "game_outcomes" in topics and (user_id is None or event.user_id == user_id)
    if event.kind == "balance":
        return "balance" in topics and user_id is not None and event.user_id == user_id
    if event.kind == "leaderboard":
        return "leaderboard" in topics
    return False


class _State:
    """The hub's view of one subscriber; touched by the dispatcher thread only."""

    __slots__ = ("events", "user_id", "dropped")

    def __init__(self) -> None:
        self.events: set[str] = set()
        self.user_id: str | None = None
        self.dropped = False


class _Command:
    __slots__ = ("action", "sub", "args", "on_live", "done", "result", "deadline")

    def __init__(self, action: str, sub: Subscriber | None, args: tuple, on_live: OnLive | None = None) -> None:
        self.action, self.sub, self.args, self.on_live = action, sub, args, on_live
        self.done = threading.Event()
        self.result: Live | None = None
        self.deadline: float | None = None  # of a recovery waiting for its `since` to arrive


class EventHub:
    """feed() is O(1) and never blocks on a subscriber: the dispatcher thread does the rest."""

    def __init__(self, epoch: str | None = None, *, history: int = HISTORY, catch_up: float = CATCH_UP) -> None:
        self._catch_up = catch_up
        self._head: Callable[[], int | None] | None = None  # the shared log's last seq (see follow)
        self._waiting: list[_Command] = []  # recoveries whose `since` this hub has not reached yet
        self._cond = threading.Condition()
        self._pending: deque = deque()
        self._stopped = False
        self._thread: threading.Thread | None = None
        # Owned by the dispatcher thread (read elsewhere only as single attribute loads).
        self._epoch = epoch or new_epoch()
        self._history: deque[Event] = deque(maxlen=history)
        self._last_seq = 0
        self._board: dict | None = EMPTY_BOARD
        self._states: dict[Subscriber, _State] = {}
        self._all_outcomes: set[Subscriber] = set()
        self._outcomes_by_user: dict[str, set[Subscriber]] = {}
        self._balance_by_user: dict[str, set[Subscriber]] = {}
        self._leaderboard_subs: set[Subscriber] = set()

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def seq(self) -> int:
        """The last seq the dispatcher has taken in (queued events are not counted: an event nobody
        subscribed to may wait up to `_LAZY_WAIT` seconds; `flush()` takes everything in)."""
        return self._last_seq

    def start(self) -> "EventHub":
        self._thread = threading.Thread(target=self._run, name="event-dispatcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread:
            self._thread.join(timeout)

    # -- producers -------------------------------------------------------------------------------

    def feed(self, seq: int, kind: str, data: dict, user_id: str | None = None) -> None:
        """Hand over one event that already has its global seq; call in seq order. O(1), never blocks."""
        with self._cond:
            pending = self._pending
            pending.append(Event(seq, kind, data, user_id))
            # Waking the dispatcher for every event cost a deposit 13 % of its GIL time (issue 15 profile),
            # mostly for balance events nobody subscribed to. Those only go into the history, so they may
            # wait for the next wake: a deliverable event, any command, a batch, or the idle timeout. An
            # index read here is current enough: the dispatcher takes this lock before it sleeps, after
            # indexing, so a subscriber it has indexed is seen here, and one it has not is indexed before
            # it next sleeps (it finds this event pending then).
            if kind == "balance":
                wake = user_id in self._balance_by_user
            elif kind == "game_outcome":
                wake = bool(self._all_outcomes) or user_id in self._outcomes_by_user
            else:
                wake = True
            if wake or self._waiting or len(pending) >= _LAZY_BATCH:  # a waiting recovery needs every seq
                self._cond.notify()

    def preload(self, events: Iterable[tuple[int, str, dict, str | None]], epoch: str, last_seq: int, *,
                board: dict | None = None) -> None:
        """Fill the history at start-up without delivering anything (the newest events of a shared log).

        `board` is the current leaderboard if known; otherwise the newest preloaded leaderboard event's.
        """
        self._apply(_Command("preload", None, (tuple(events), epoch, last_seq, board)))

    def reset(self, epoch: str, last_seq: int, *, board: dict | None = None) -> None:
        """The history was lost or replaced: drop it, adopt `epoch`, and cancel every subscriber ("resync")."""
        self._apply(_Command("reset", None, (epoch, last_seq, board)))

    # -- subscribers -----------------------------------------------------------------------------

    def subscribe(self, sub: Subscriber, events: Iterable[str], user_id: str | None = None, *,
                  since: int | None = None, epoch: str | None = None, on_live: OnLive | None = None,
                  timeout: float = 5.0) -> Live | None:
        """Add `events` (and set the subscriber's user id when given); return once the change is live.

        With `since` and `epoch`, the retained matching events after `since` come back in `Live.replay`
        when the history still holds all of them (`recovered`); replay considers the topics named here.
        A `since` of the current epoch beyond the last event taken in (the client saw it through another
        process sharing the log, whose events reach this hub a moment later) waits up to `catch_up`
        seconds for this hub to get there; then it is `recovered: false`.
        `on_live(live)` runs on the dispatcher thread at the exact point the change takes effect, before
        any later event reaches `sub`: the place to queue replies. None if the dispatcher did not answer.
        """
        command = _Command("subscribe", sub, (tuple(events), user_id, since, epoch, self._log_head()), on_live)
        return self._submit(command).wait(timeout)

    def follow(self, head: Callable[[], int | None]) -> None:
        """Events reach this hub from a log shared with other processes (Redis): `head()` gives the
        log's last seq. A subscription then goes live only once the hub has taken in every event the
        log held when it was asked for (up to `catch_up` seconds), so an event published before it,
        through any process, is never delivered after `subscribed` as if it were new."""
        self._head = head

    def _log_head(self) -> int | None:
        if self._head is None:
            return None
        try:
            return self._head()
        except Exception:  # the log is unreachable: go live with what this hub has
            return None

    def unsubscribe(self, sub: Subscriber, events: Iterable[str], *, on_live: OnLive | None = None,
                    timeout: float = 5.0) -> Live | None:
        return self._submit(_Command("unsubscribe", sub, (tuple(events),), on_live)).wait(timeout)

    def disconnect(self, sub: Subscriber) -> None:
        """Forget the subscriber; nothing is delivered to it once the dispatcher reaches this point."""
        self._submit(_Command("disconnect", sub, ()))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the dispatcher has handled everything submitted before this call."""
        return self._submit(_Command("flush", None, ())).done.wait(timeout)

    def subscriber_count(self) -> int:
        return len(self._states)

    def pending_recoveries(self) -> int:
        """Recoveries waiting for this hub to reach their `since` (see subscribe)."""
        return len(self._waiting)

    # -- dispatcher ------------------------------------------------------------------------------

    def _apply(self, command: _Command) -> None:
        if self._thread is None:
            self._command(command)  # before start(): nothing else touches the dispatcher's state yet
        else:
            self._submit(command).wait()

    def _submit(self, command: _Command) -> "_Waiter":
        with self._cond:
            self._pending.append(command)
            self._cond.notify()
        return _Waiter(command)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    if not self._waiting:
                        self._cond.wait(_LAZY_WAIT)  # takes in events fed without a wake (see feed)
                        continue
                    timeout = min(c.deadline for c in self._waiting) - time.monotonic()
                    if timeout <= 0:
                        break
                    self._cond.wait(timeout)
                if self._stopped:
                    for c in self._waiting:
                        c.done.set()
                    return
                batch, self._pending = self._pending, deque()
            for item in batch:
                try:
                    if type(item) is Event:
                        self._dispatch(item)
                    else:
                        self._command(item)
                except Exception:  # a bug here must not stop every other delivery
                    log.exception("event dispatch failed")
                    if type(item) is _Command:
                        item.done.set()
            if self._waiting:
                self._resume_waiting()

    def _resume_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for c in waiting:
            self._command(c)  # goes live now, or waits again until its deadline

    def _dispatch(self, event: Event) -> None:
        seq = event.seq
        if seq <= self._last_seq:
            log.warning("event seq %d ignored: seq %d was already taken in", seq, self._last_seq)
            return
        if seq != self._last_seq + 1 and self._last_seq:
            log.warning("event seq jumped from %d to %d: recovery across the gap is refused", self._last_seq, seq)
            self._history.clear()  # a client that saw an event before the gap cannot be replayed to exactly
        self._last_seq = seq
        self._history.append(event)
        kind = event.kind
        if kind == "game_outcome":
            targets = self._all_outcomes.union(self._outcomes_by_user.get(event.user_id, ()))
        elif kind == "balance":
            targets = self._balance_by_user.get(event.user_id, ())
        elif kind == "leaderboard":
            self._board = event.data
            targets = self._leaderboard_subs
        else:
            log.warning("event seq %d has unknown kind %r: retained, delivered to nobody", seq, kind)
            return
        for sub in tuple(targets):
            if not sub.deliver(event):
                self._drop(sub)

    def _floor(self) -> int:
        """The seq before the oldest retained event: recovery needs `since` at or above it."""
        return self._history[0].seq - 1 if self._history else self._last_seq

    def _command(self, c: _Command) -> None:
        deferred = False
        try:
            action = c.action
            if action == "flush":
                return
            if action == "preload":
                self._preload(*c.args)
            elif action == "reset":
                self._reset(*c.args)
            elif action == "disconnect":
                state = self._states.pop(c.sub, None)
                if state is not None:
                    self._unindex(c.sub, state)
                for w in [w for w in self._waiting if w.sub is c.sub]:
                    self._waiting.remove(w)
                    w.done.set()
            elif action == "subscribe" and self._must_wait(c):
                self._waiting.append(c)
                deferred = True
            else:
                c.result = self._change(c)
        finally:
            if not deferred:
                c.done.set()

    def _must_wait(self, c: _Command) -> bool:
        since, epoch, head = c.args[2], c.args[3], c.args[4]
        behind_head = head is not None and head > self._last_seq
        if not behind_head and (since is None or epoch != self._epoch or since <= self._last_seq):
            return False
        if c.deadline is None:
            c.deadline = time.monotonic() + self._catch_up
        return time.monotonic() < c.deadline

    def _change(self, c: _Command) -> Live | None:
        sub = c.sub
        state = self._states.get(sub)
        if state is None:
            state = self._states[sub] = _State()
        if state.dropped:
            return None
        self._unindex(sub, state)
        recovered, replay, board, snapshot = None, (), None, False
        if c.action == "subscribe":
            events, user_id, since, epoch, _ = c.args
            state.events.update(events)
            if user_id is not None:
                state.user_id = user_id
            if since is not None:
                recovered = epoch == self._epoch and self._floor() <= since <= self._last_seq
                if recovered:
                    replay = self._replay(since, events, state.user_id)
            snapshot = "leaderboard" in events and not recovered
            board = self._board if snapshot else None
        else:
            state.events.difference_update(c.args[0])
        self._index(sub, state)
        live = Live(tuple(sorted(state.events)), state.user_id, self._last_seq, self._epoch, recovered, replay,
                    board, snapshot)
        if c.on_live is not None:
            c.on_live(live)
        return live

    def _replay(self, since: int, topics: tuple[str, ...], user_id: str | None) -> tuple[Event, ...]:
        out = []
        for event in reversed(self._history):  # newest first: stop at `since`
            if event.seq <= since:
                break
            if matches(event, topics, user_id):
                out.append(event)
        out.reverse()
        return tuple(out)

    def _preload(self, events: tuple, epoch: str, last_seq: int, board: dict | None) -> None:
        self._epoch = epoch
        self._history.clear()
        newest_board = None
        for seq, kind, data, user_id in events:
            if seq > last_seq:
                break
            self._history.append(Event(seq, kind, data, user_id))
            if kind == "leaderboard":
                newest_board = data
        self._last_seq = last_seq
        self._board = board if board is not None else newest_board if newest_board is not None else self._board
        log.info("event history preloaded: %d events, last seq %d, epoch %s", len(self._history), last_seq, epoch)

    def _reset(self, epoch: str, last_seq: int, board: dict | None) -> None:
        self._epoch = epoch
        self._history.clear()
        self._last_seq = last_seq
        self._board = board  # None: unknown until the next leaderboard event
        subscribers = list(self._states)
        for sub in subscribers:
            self._drop(sub, cancel="resync")
        self._states.clear()
        self._resume_waiting()  # their epoch is gone: they go live now, not recovered
        log.warning("event history reset: epoch %s, last seq %d; %d subscribers told to resync",
                    epoch, last_seq, len(subscribers))

    def _drop(self, sub: Subscriber, cancel: str | None = None) -> None:
        state = self._states.get(sub)
        if state is not None:
            self._unindex(sub, state)
            state.events.clear()
            state.dropped = True
        if cancel is not None:
            sub.cancel(cancel)

    def _index(self, sub: Subscriber, state: _State) -> None:
        uid = state.user_id
        if "game_outcomes" in state.events:
            if uid is None:
                self._all_outcomes.add(sub)
            else:
                self._outcomes_by_user.setdefault(uid, set()).add(sub)
        if "balance" in state.events and uid is not None:
            self._balance_by_user.setdefault(uid, set()).add(sub)
        if "leaderboard" in state.events:
            self._leaderboard_subs.add(sub)

    def _unindex(self, sub: Subscriber, state: _State) -> None:
        self._all_outcomes.discard(sub)
        self._leaderboard_subs.discard(sub)
        for index in (self._outcomes_by_user, self._balance_by_user):
            members = index.get(state.user_id)
            if members is not None:
                members.discard(sub)
                if not members:
                    del index[state.user_id]


class _Waiter:
    __slots__ = ("command",)

    def __init__(self, command: _Command) -> None:
        self.command = command

    @property
    def done(self) -> threading.Event:
        return self.command.done

    def wait(self, timeout: float | None = None) -> Live | None:
        self.command.done.wait(timeout)
        return self.command.result


class MemoryEventLog:
    """The in-process EventSink: numbers each published event (seq from 1) and feeds it to the hub.

    The store calls publish() under its own lock, in apply order; the lock here keeps numbering and
    feeding one step, so the hub receives seqs in order even if another producer shares this log.
    """

    def __init__(self, hub: EventHub) -> None:
        self._hub = hub
        self._seq = 0
        self._lock = threading.Lock()

    def publish(self, kind: str, data: dict, user_id: str | None = None) -> None:
        with self._lock:
            self._seq += 1
            self._hub.feed(self._seq, kind, data, user_id)
