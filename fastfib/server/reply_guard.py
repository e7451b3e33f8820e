"""The Direct Reply-to guard: is a reply to this ``reply_to`` safe to publish?

RabbitMQ 3.10 closes the publishing connection (541) on some Direct Reply-to
names; :func:`direct_reply_to_ok` checks a name's shape, :class:`ReplyToProber`
asks the broker about the rest on a connection of its own.
"""

from __future__ import annotations

import base64
import logging
import os
import queue
import threading
from collections.abc import Callable

import pika
import pika.exceptions

from .. import protocol
from .closes import describe as _describe

log = logging.getLogger(__name__)

_DIRECT_REPLY_PREFIX = protocol.DIRECT_REPLY_TO + "."


def direct_reply_to_ok(reply_to: str) -> bool:
    """True unless ``reply_to`` is a malformed Direct Reply-to name.

    RabbitMQ (seen with 3.10) closes the publishing *connection* with
    541 INTERNAL_ERROR when a reply is published to an ``amq.rabbitmq.reply-to.X.Y``
    name whose X is not a base64 Erlang pid; a request carrying such a name
    would otherwise cost every worker it reaches its connection, again at every
    redelivery. A real name is ``amq.rabbitmq.reply-to.<base64 pid>.<base64 key>``;
    this checks that shape (the pid term's structure, not that the pid exists).
    """
    if not reply_to.startswith(_DIRECT_REPLY_PREFIX):
        return True
    pid_part, dot, key = reply_to[len(_DIRECT_REPLY_PREFIX):].partition(".")
    if not dot or not key:
        return False
    try:
        raw = base64.b64decode(pid_part, validate=True)
        base64.b64decode(key, validate=True)
    except (ValueError, TypeError):
        return False
    # External term format: 131, then PID_EXT (103) or NEW_PID_EXT (88): node atom, id, serial, creation.
    if len(raw) < 4 or raw[0] != 131 or raw[1] not in (88, 103):
        return False
    tag = raw[2]
    if tag in (100, 118):  # ATOM_EXT, ATOM_UTF8_EXT: 2-byte length
        alen, pos = int.from_bytes(raw[3:5], "big"), 5
    elif tag in (115, 119):  # SMALL_ATOM_EXT, SMALL_ATOM_UTF8_EXT: 1-byte length
        alen, pos = raw[3], 4
    else:
        return False
    node = raw[pos:pos + alen]
    if len(node) != alen or b"@" not in node:
        return False
    tail = 4 + 4 + (4 if raw[1] == 88 else 1)
    return len(raw) == pos + alen + tail


class ReplyToProber:
    """Asks the broker whether replies to a Direct Reply-to name are safe, on a connection of its own.

    A name can be well-formed and still cost the publisher its connection:
    RabbitMQ 3.10 decodes the pid part and crashes the publishing channel
    (connection closed, 541 INTERNAL_ERROR) when its node hash names no running
    cluster node (``reply@<hash>``), when the node atom is not valid UTF-8, or
    when the pid's id or serial is out of Erlang's range. Only the broker knows
    which hashes are valid, so the worker asks it (issue 6): this thread
    publishes an empty message to the same pid with a random key, which the
    broker drops (a channel takes only replies with its own key), then does a
    ``basic.qos`` round trip on the same channel. ``qos-ok`` means the broker
    handled the publish: the name is safe. A 541 close means it is not, and
    only this probe connection paid for it. Verdicts go to ``callback(name,
    True | False | None)`` (None: the probe itself failed). Probes run one at a
    time; the connection is kept (heartbeats off: it idles) and reopened after
    a failure.
    """

    def __init__(self, index: int) -> None:
        self._index = index
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._connection: pika.BlockingConnection | None = None
        self._channel = None
        self._url: str | None = None

    def submit(self, url: str, name: str, callback: Callable[[str, bool | None], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"fastfib-reply-to-probe-{self._index}",
                                            daemon=True)
            self._thread.start()
        self._jobs.put((url, name, callback))

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._drop()
                return
            url, name, callback = job
            verdict = self._probe(url, name)
            try:
                callback(name, verdict)
            except Exception:  # the I/O loop is closed: the worker is exiting
                self._drop()
                return

    def _probe(self, url: str, name: str) -> bool | None:
        pid_part = name[len(_DIRECT_REPLY_PREFIX):].partition(".")[0]
        probe = f"{_DIRECT_REPLY_PREFIX}{pid_part}.{base64.b64encode(os.urandom(16)).decode()}"
        for _ in range(2):  # a connection that went stale while idle gets one fresh retry
            try:
                if self._connection is None or not self._connection.is_open or url != self._url:
                    self._open(url)
                self._channel.basic_publish("", probe, b"")
                self._channel.basic_qos(prefetch_count=0)
                return True
            except pika.exceptions.ConnectionClosedByBroker as exc:
                self._drop()
                if exc.reply_code == 541:
                    return False
            except Exception as exc:  # noqa: BLE001 - any failure of the probe is "cannot tell"
                log.debug("reply_to probe failed: %s", _describe(exc))
                self._drop()
        return None

    def _open(self, url: str) -> None:
        self._drop()
        params = pika.URLParameters(url)
        params.heartbeat = 0
        params.socket_timeout = params.stack_timeout = params.blocked_connection_timeout = 10.0
        params.connection_attempts = 1
        params.client_properties = {"connection_name": f"fastfib-worker-{self._index} reply-to probe pid={os.getpid()}"}
        self._connection = pika.BlockingConnection(params)
        self._url = url
        self._channel = self._connection.channel()

    def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

