"""Logging for ``fastfib serve``: human-readable lines or JSON lines on stderr, never a password.

Two formats, chosen with ``--log-format`` (``FASTFIB_LOG_FORMAT``):

- ``text`` (default): ``2024-05-01 12:00:00,123 INFO worker-0[1234]: message``;
- ``json``: one JSON object per line, for log shippers::

    {"time": "2024-05-01T12:00:00.123Z", "level": "INFO", "logger": "fastfib.server.lifecycle",
     "message": "...", "process": "worker-0", "worker": 0, "pid": 1234}

  plus ``"exception"`` (the formatted traceback) when there is one.

Whatever the format, every ``amqp://user:password@`` (or ``amqps://``) in a
line, tracebacks included, has its password replaced by ``***``: the code logs
URLs through :func:`mask_url` already, and this catches what pika or an
exception message might repeat.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from urllib.parse import urlsplit, urlunsplit

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# user:password@ right after an amqp(s) scheme; the user part may be empty, the password anything but @ or space.
_URL_PASSWORD = re.compile(r"(amqps?://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for a log line."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def mask_secrets(text: str) -> str:
    """``text`` with the password of every AMQP URL in it replaced by ``***``."""
    if "://" not in text:
        return text
    return _URL_PASSWORD.sub(r"\1***@", text)


class TextFormatter(logging.Formatter):
    """``time level process: message``, with passwords masked."""

    def __init__(self, process: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {process.replace('%', '%%')}: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601, ms), level, logger, message, process, worker, pid."""

    def __init__(self, process: str, worker: int | None) -> None:
        super().__init__()
        self._process = process
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": mask_secrets(record.getMessage()),
            "process": self._process,
            "worker": self._worker,
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = mask_secrets(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = mask_secrets(record.exc_text)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, process: str, *, log_format: str = "text", worker: int | None = None) -> None:
    """Send the process's logs to stderr in ``log_format``; ``process`` names it in each line.

    ``process`` is ``"supervisor"`` or ``"worker-<i>"`` (``worker`` is then
    ``i``). pika speaks only at WARNING and above, and only in DEBUG: its own
    lines repeat ours, which say what happened and what is done about it.
    """
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        numeric = logging.INFO
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process, worker))
    else:
        handler.setFormatter(TextFormatter(f"{process}[{os.getpid()}]"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.getLogger("pika").setLevel(logging.WARNING if numeric <= logging.DEBUG else logging.CRITICAL)
