"""Logging set-up: text or JSON lines on stderr, each tagged with the request id it belongs to."""

import contextvars
import json
import logging
import logging.handlers
import queue
import sys
import time

request_id = contextvars.ContextVar("request_id", default=None)

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
        return line


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
        return json.dumps(out, default=str)


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
