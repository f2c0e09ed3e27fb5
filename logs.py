"""Logging set-up: text or JSON lines on stderr, each tagged with the request id it belongs to."""

import contextvars
import json
import logging
import logging.handlers
import queue
import re
import sys
import time

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


class _RequestIdFilter(logging.Filter):
    def filter(self, record):
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class _TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record):
        line = super().format(record)
        if record.request_id:
            line += f" rid={record.request_id}"
        return _one_line(line)  # one record, one line: a traceback is folded, not split


class _JsonFormatter(logging.Formatter):
    # Fields a log shipper can index; anything passed as extra= beyond the standard attributes.
    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

    def format(self, record):
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD and value is not None:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)  # JSON escapes every control character: always one line


_listener = None


def setup(level="INFO", fmt="text", stream=None):
    """Log through a queue: request threads only enqueue records; one thread formats and writes them.

    Writing and flushing stderr under the handler's lock in every request thread made them queue on
    that lock under load. Call stop() before exiting so every queued line is written.
    """
    global _listener
    stop()
    writer = logging.StreamHandler(stream or sys.stderr)
    writer.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    records = queue.SimpleQueue()
    handler = logging.handlers.QueueHandler(records)
    handler.addFilter(_RequestIdFilter())  # runs in the logging thread, where the request id is known
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging._srcfile = None  # no caller file/line lookup per record: the formats do not use it
    # Werkzeug's own request lines would duplicate ours.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    _listener = logging.handlers.QueueListener(records, writer)
    _listener.start()


def stop():
    """Write out every queued record and stop the writer thread."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
