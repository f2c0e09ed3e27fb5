"""Logging set-up: text or JSON lines on stderr, each tagged with the request id it belongs to."""

import contextlib
import contextvars
import json
import logging
import re
import sys
import threading
import time
from collections import deque
from typing import TextIO

request_id = contextvars.ContextVar("request_id", default=None)

# Query parameters whose values are credentials (the WebSocket `token`): never written to a log.
_SECRET_PARAMS = re.compile(r"(?i)(^|&)((?:access_)?token=)[^&]*")
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """Client text made safe for one log line: every control or non-printable character escaped.

    CR, LF, ESC, NUL, other C0/C1 controls, Unicode line separators and lone surrogates become
    `\\r`, `\\n`, `\\x1b`, `\\u2028`...; a backslash is doubled so an escape written by a client reads
    differently from one written here. This is the one rule for HTTP, WebSocket and gRPC log lines.
    """
    if text.isprintable() and "\\" not in text:
        return text  # the common case costs one scan
    return "".join(_ESCAPES.get(ch) or (ch if ch.isprintable() else _escape_char(ch)) for ch in text)


def printable_query(query: str) -> str:
    """A query string for a log line: escaped, with credential values (`token=`) replaced by `***`."""
    return printable(_SECRET_PARAMS.sub(r"\1\2***", query))


def _one_line(text: str) -> str:
    # Last guard for text that did not come through printable(): library messages, tracebacks.
    # Backslashes are left alone so text already escaped by printable() is not escaped twice.
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else (_ESCAPES.get(ch) or _escape_char(ch)) for ch in text)


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")


# Argument types a record may carry to the writer thread as they are: they cannot change before it formats.
_IMMUTABLE = frozenset({str, int, float, bool, type(None)})


class _QueueHandler(logging.Handler):
    """Tags a record with the request id (known only in the caller's context) and enqueues it as it is.

    logging.handlers.QueueHandler formats every record in the caller's thread (and copies it) so that a
    mutable argument cannot change before the writer sees it; that cost gRPC a third of its calls/s.
    Here only records whose message could change (a non-string message, an argument of another type)
    or that carry a traceback are resolved in the caller; the access lines pass strings and numbers.
    """

    def __init__(self, records: "_Records") -> None:
        super().__init__()
        self._records = records

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: the queue is thread-safe, and taking a lock per record is what we avoid.
        if self.filters and not self.filter(record):
            return False
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        args = record.args
        if type(record.msg) is not str or (args and (type(args) is not tuple
                                                     or not _IMMUTABLE.issuperset(map(type, args)))):
            record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            # Frames and exception objects stay with their thread; the formatters use exc_text as given.
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        self._records.add(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)


_TRACEBACKS = logging.Formatter()


_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)
        self._second: int | None = None
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        # One strftime per second rather than per record: the writer thread shares the GIL with requests.
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime(self.default_time_format, self.converter(second))
        return f"{self._stamp},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        if rid:
            line += f" rid={rid}"
        return _one_line(line)  # one record, one line: a traceback is folded, not split

    def access_line(self, name: str, message: str, extra: dict, rid: str | None, created: float) -> str:
        """What format() writes for an INFO record of `name` made at `created` (an access() line)."""
        line = _TEXT_FORMAT % {"asctime": self.formatTime(_Moment(created)),  # type: ignore[arg-type]
                               "levelname": "INFO", "name": name, "message": message}
        return _one_line(f"{line} rid={rid}" if rid else line)


class _JsonFormatter(logging.Formatter):
    # Fields a log shipper can index; anything passed as extra= beyond the standard attributes.
    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

    def format(self, record):
        out = {
            "time": _json_time(record.created, record.msecs),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD and value is not None:
                out[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, default=str)  # JSON escapes every control character: always one line

    def access_line(self, name: str, message: str, extra: dict, rid: str | None, created: float) -> str:
        """What format() writes for an INFO record of `name` made at `created` with `extra` (an access() line)."""
        out = {"time": _json_time(created, _Moment(created).msecs), "level": "INFO", "logger": name,
               "message": message}
        out.update((key, value) for key, value in extra.items() if value is not None)
        if rid is not None:
            out["request_id"] = rid
        return json.dumps(out, default=str)


def _json_time(created: float, msecs: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(msecs):03d}Z"


class _Moment:
    """The two time fields a formatter reads, for lines that never became a LogRecord."""

    __slots__ = ("created", "msecs")

    def __init__(self, created: float) -> None:
        self.created = created
        self.msecs = int((created - int(created)) * 1000)  # as LogRecord computes it


_STOP = object()
# While lines keep coming, the writer takes them in batches this often instead of being woken per record.
_WRITE_INTERVAL = 0.01


class _Records:
    """The records between the request threads and the writer: a deque, and a wake-up only after idleness.

    Waking the writer for every record (a SimpleQueue put) cost a deposit 12 % of its GIL time in the
    profile (a futex wake on this VM). A caller now wakes the writer only when it sleeps, after a quiet
    spell; while records keep coming the writer polls every `_WRITE_INTERVAL` on its own, so a line
    reaches the stream at most that late.
    """

    def __init__(self) -> None:
        self.queue: deque = deque()  # append and popleft are atomic: no lock
        self.wake = threading.Event()
        self.idle = False

    def add(self, record: object) -> None:
        self.queue.append(record)
        # The writer sets `idle` before its last look at the queue: a record appended after that look
        # finds `idle` set here, one appended before it is found there.
        if self.idle:
            self.wake.set()

    def wait(self, busy: bool) -> None:
        """Return when there may be records: after `_WRITE_INTERVAL` if the last look found some, else on a wake."""
        if busy:
            time.sleep(_WRITE_INTERVAL)  # let a batch gather (sleeping releases the GIL)
            return
        self.wake.clear()
        self.idle = True
        if not self.queue:
            self.wake.wait()
        self.idle = False


_writer: tuple[threading.Thread, _Records, _QueueHandler] | None = None


def access(logger: logging.Logger, msg: str, args: tuple, extra: dict) -> None:
    """Log one INFO access line (an HTTP request, a gRPC call) from the thread that served it.

    With setup()'s writer running, the caller only enqueues the line's parts (and its time and request
    id) and the writer formats them as it would the LogRecord, without making one. Making it here
    (logging's LogRecord constructor, handler dispatch) was 8 us per line of a gRPC worker's time, and
    the line a fifth of the calls/s (issue 15, BENCHMARKS.md). Without the writer (tests, a caller that
    set up logging its own way), the line goes through `logger.info` as usual. Arguments must be str or
    numbers: they are formatted later.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    writer = _writer
    # The short way only where the record would reach setup()'s handler alone, unfiltered: anything else
    # (pytest's caplog, an operator's own handler or filter) gets the real record.
    if (writer is None or logger.handlers or logger.filters or not logger.propagate
            or (logger.parent is not logging.root and logger.parent.handlers)
            or len(logging.root.handlers) != 1 or logging.root.handlers[0] is not writer[2] or writer[2].filters):
        logger.info(msg, *args, extra=extra)
        return
    writer[1].add((logger, msg, args, extra, request_id.get(), time.time()))


def _as_record(item: tuple) -> logging.LogRecord:
    """The LogRecord logger.info would have made for an access() line (for the rare line that fails to format)."""
    logger, msg, args, extra, rid, created = item
    record = logger.makeRecord(logger.name, logging.INFO, "(unknown file)", 0, msg, args, None, extra=extra)
    record.created, record.msecs = created, _Moment(created).msecs
    record.request_id = rid
    return record


def _write(records: _Records, stream: TextIO, formatter: logging.Formatter) -> None:
    """The writer thread: everything queued since it last looked is formatted and written with one flush."""
    pending = records.queue
    batch: list = []
    while True:
        records.wait(busy=bool(batch))
        batch = []
        with contextlib.suppress(IndexError):
            while True:
                batch.append(pending.popleft())
        lines = []
        stop = False
        for record in batch:
            if record is _STOP:
                stop = True
                continue
            try:
                if type(record) is tuple:
                    logger, msg, args, extra, rid, created = record
                    lines.append(formatter.access_line(logger.name, msg % args, extra, rid, created))
                else:
                    lines.append(formatter.format(record))
            except Exception as exc:  # a message whose arguments do not fit: say so, in the same format
                if type(record) is tuple:
                    record = _as_record(record)
                record.msg = f"log record not formatted ({type(exc).__name__}: {exc}): {record.msg!r}"
                record.args = None
                with contextlib.suppress(Exception):
                    lines.append(formatter.format(record))
        if lines:
            with contextlib.suppress(OSError, ValueError):  # stderr closed or gone: nowhere left to say so
                stream.write("\n".join(lines) + "\n")
                stream.flush()
        if stop:
            return


def setup(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Log through a queue: request threads only enqueue records; one thread formats and writes them.

    Writing and flushing stderr under the handler's lock in every request thread made them queue on
    that lock under load; formatting in the caller (logging.handlers.QueueHandler) cost gRPC a third
    of its calls/s. Call stop() before exiting so every queued line is written.
    """
    global _writer
    stop()
    formatter = _JsonFormatter() if fmt == "json" else _TextFormatter()
    records = _Records()
    root = logging.getLogger()
    handler = _QueueHandler(records)
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Record fields neither format writes, each looked up per record otherwise: the caller's file and
    # line (a stack walk), the process name and id, the thread.
    logging._srcfile = None
    logging.logMultiprocessing = logging.logProcesses = logging.logThreads = False
    # Werkzeug's own request lines would duplicate ours.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    thread = threading.Thread(target=_write, args=(records, stream or sys.stderr, formatter), name="log-writer",
                              daemon=True)
    thread.start()
    _writer = (thread, records, handler)


def stop() -> None:
    """Write out every queued record and stop the writer thread."""
    global _writer
    if _writer is not None:
        thread, records, _ = _writer
        _writer = None
        records.add(_STOP)
        records.wake.set()
        thread.join()
