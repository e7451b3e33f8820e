"""The Direct Reply-to guard: never publish a reply that would cost the worker its connection.

RabbitMQ before 3.9.26, 3.10.12, 3.11.4 and 3.12.0 closes the *publishing
connection* with 541 INTERNAL_ERROR when a message is published to an
``amq.rabbitmq.reply-to.<pid>.<key>`` name whose pid part it cannot decode,
or whose node is not a running cluster node (rabbitmq-server issue #6396).
A request carrying such a name would cost every worker it reaches its
connection, again at every redelivery. Later brokers drop such a reply (4.2+:
it is simply unroutable). See docs/compatibility.md.

What this module gives the worker:

- :func:`direct_reply_to_ok` ``(name) -> bool``: False for a malformed Direct
  Reply-to name (checked on every broker: such a name can never be delivered to).
- :func:`pid_of` ``(name) -> str | None``: the ``<base64 pid>`` part of a name.
- :func:`broker_version` ``(server_properties) -> tuple | None`` and
  :func:`needs_probe` ``(server_properties) -> bool``: whether the broker the
  worker is connected to has the 541 crash. The version is read from the
  server properties of the connection (``connection.server_properties`` on a
  pika ``SelectConnection``), never assumed; an unreadable version counts as
  affected.
- :class:`ReplyToProber` ``(index)``: ``submit(url, name, callback)``,
  ``stop()``, ``alive``: a thread with a connection of its own that asks the
  broker whether a name is safe (``callback(name, True | False | None)``;
  None: the probe could not tell).
- :class:`ReplyGuard`: what the request path uses. ``verdict(name)`` answers
  True (reply), False (drop) or None (hold the request: ``hold(name, item,
  resume, url)`` calls ``resume(item, ok)`` on the I/O thread once the broker has
  answered, or once the probe timed out or its thread died). Verdicts are
  kept per pid, not per name, so a flood of well-formed names with random
  keys costs one probe per pid. ``on_connected(server_properties)`` turns
  probing off on brokers without the crash; ``poll()`` (called from the
  worker's periodic tick) enforces the probe timeout and notices a dead
  prober thread; ``forget()`` is for a 541 close; ``stop()`` ends the prober.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import pika
import pika.exceptions

from .. import protocol
from .closes import describe as _describe

log = logging.getLogger(__name__)

PREFIX = protocol.DIRECT_REPLY_TO + "."

#: The first release of each series in which the 541 crash is fixed; 3.12.0 and later are fixed.
CRASH_FIXED_IN = {(3, 9): (3, 9, 26), (3, 10): (3, 10, 12), (3, 11): (3, 11, 4)}
FIRST_FIXED_SERIES = (3, 12)

#: Probe connection: heartbeat interval, and the limit on connecting, on a blocked
#: connection and on one probe (after which held requests get the fallback verdict).
PROBE_HEARTBEAT = 30
PROBE_TIMEOUT = 10.0
#: Verdicts kept (pids); the table is cleared when full.
MAX_VERDICTS = 4096

_VERSION_RE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
_KEY_RE = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def direct_reply_to_ok(reply_to: str) -> bool:
    """True unless ``reply_to`` is a malformed Direct Reply-to name.

    A real name is ``amq.rabbitmq.reply-to.<base64 pid>.<base64 key>``; this
    checks that shape (the pid term's structure, not that the pid exists).
    Names that are not Direct Reply-to names are not ours to judge: True.
    """
    if not reply_to.startswith(PREFIX):
        return True
    pid_part, dot, key = reply_to[len(PREFIX):].partition(".")
    if not dot or not key or _KEY_RE.fullmatch(key) is None:
        return False
    try:
        raw = base64.b64decode(pid_part, validate=True)
    except (ValueError, TypeError, binascii.Error):
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


def pid_of(reply_to: str) -> str | None:
    """The ``<base64 pid>`` part of a Direct Reply-to name, or None for any other name."""
    if not reply_to.startswith(PREFIX):
        return None
    return reply_to[len(PREFIX):].partition(".")[0]


def broker_version(server_properties: Mapping[str, Any] | None) -> tuple[int, int, int] | None:
    """RabbitMQ's version from a connection's server properties, or None if it is not RabbitMQ or unreadable."""
    if not server_properties:
        return None
    product, version = server_properties.get("product"), server_properties.get("version")
    if isinstance(product, bytes):
        product = product.decode("utf-8", "replace")
    if isinstance(version, bytes):
        version = version.decode("utf-8", "replace")
    if product != "RabbitMQ" or not isinstance(version, str):
        return None
    m = _VERSION_RE.match(version.strip())
    if m is None:
        return None
    return int(m[1]), int(m[2]), int(m[3] or 0)


def needs_probe(server_properties: Mapping[str, Any] | None) -> bool:
    """True when the broker may close a connection (541) for a reply to a well-formed Direct Reply-to name.

    Affected: RabbitMQ before 3.9.26, 3.10.0-3.10.11, 3.11.0-3.11.3, and any
    broker whose version cannot be read. 3.12.0 and later (4.x included) are not.
    """
    version = broker_version(server_properties)
    if version is None:
        return True
    if version[:2] >= FIRST_FIXED_SERIES:
        return False
    fixed = CRASH_FIXED_IN.get(version[:2])
    return fixed is None or version < fixed


class ReplyToProber:
    """Asks the broker whether replies to a Direct Reply-to name are safe, on a connection of its own.

    The thread publishes an empty message to the same pid with a random key,
    which the broker drops (a channel takes only replies with its own key),
    then does a ``basic.qos`` round trip on the same channel. ``qos-ok`` means
    the broker handled the publish: the name is safe. A 541 close means it is
    not, and only this probe connection paid for it. Verdicts go to
    ``callback(name, True | False | None)`` from the prober's thread (None:
    the probe itself failed). Probes run one at a time. The connection is
    kept, with heartbeats (serviced while idle) and connect, socket and
    blocked-connection timeouts, and reopened after a failure.

    ``connect(url) -> pika.BlockingConnection`` may be given instead of the
    default (a test seam for connections that fail or hang).
    """

    def __init__(self, index: int, *, heartbeat: int = PROBE_HEARTBEAT, timeout: float = PROBE_TIMEOUT,
                 connect: Callable[[str], Any] | None = None) -> None:
        self._index = index
        self._heartbeat = heartbeat
        self._timeout = timeout
        self._connect = connect or self._default_connect
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._connection = None
        self._channel = None
        self._url: str | None = None

    @property
    def alive(self) -> bool:
        """Whether the prober's thread is running (False before the first probe)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, url: str, name: str, callback: Callable[[str, bool | None], None]) -> None:
        """Probe ``name`` through the broker at ``url``; ``callback(name, verdict)`` runs on the prober's thread."""
        if self._thread is None or not self._thread.is_alive():
            self._jobs = queue.SimpleQueue()  # what a dead thread left behind is the guard's to answer
            self._thread = threading.Thread(target=self._run, args=(self._jobs,), daemon=True,
                                            name=f"fastfib-reply-to-probe-{self._index}")
            self._thread.start()
        self._jobs.put((url, name, callback))

    def stop(self) -> None:
        """End the thread after the probe under way (if any); its connection is closed."""
        if self._thread is not None:
            self._jobs.put(None)

    def abandon(self) -> None:
        """Give up on a thread stuck in a probe: the next :meth:`submit` starts a fresh one.

        The stuck thread ends when its probe returns (the connection's timeouts bound that).
        """
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _run(self, jobs: queue.SimpleQueue) -> None:
        idle = max(1.0, self._heartbeat / 2) if self._heartbeat else None
        while True:
            try:
                job = jobs.get(timeout=idle)
            except queue.Empty:
                self._service_heartbeats()
                continue
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

    def _service_heartbeats(self) -> None:
        connection = self._connection
        if connection is not None and connection.is_open:
            try:
                connection.process_data_events(0)
            except Exception as exc:  # noqa: BLE001 - a stale probe connection is reopened on the next probe
                log.debug("reply_to probe connection lost while idle: %s", _describe(exc))
                self._drop()

    def _probe(self, url: str, name: str) -> bool | None:
        probe = f"{PREFIX}{pid_of(name)}.{base64.b64encode(os.urandom(16)).decode()}"
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

    def _default_connect(self, url: str):
        params = pika.URLParameters(url)
        params.heartbeat = self._heartbeat
        params.socket_timeout = params.stack_timeout = params.blocked_connection_timeout = self._timeout
        params.connection_attempts = 1
        params.client_properties = {
            "connection_name": f"fastfib-worker-{self._index} reply-to probe pid={os.getpid()}"}
        return pika.BlockingConnection(params)

    def _open(self, url: str) -> None:
        self._drop()
        self._connection = self._connect(url)
        self._url = url
        self._channel = self._connection.channel()

    def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass


class _Pending:
    """A pid being probed: until when, through which broker, one of its names, the requests held for it."""

    __slots__ = ("deadline", "url", "name", "waiting")

    def __init__(self, deadline: float, url: str, name: str) -> None:
        self.deadline, self.url, self.name = deadline, url, name
        self.waiting: list[tuple[Any, Callable[[Any, bool], None]]] = []


class ReplyGuard:
    """Decides, per request, whether its Direct Reply-to name may be replied to (see the module docstring).

    Used on the worker's I/O thread only; ``call_threadsafe`` (the I/O loop's
    ``add_callback_threadsafe``) brings the prober's verdicts back to it.
    """

    def __init__(self, index: int, call_threadsafe: Callable[[Callable[[], None]], None], *,
                 prober: ReplyToProber | None = None, probe_timeout: float = PROBE_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._call_threadsafe = call_threadsafe
        self._prober = prober if prober is not None else ReplyToProber(index, timeout=probe_timeout)
        self._probe_timeout = probe_timeout
        self._clock = clock
        #: Probe the names? Until the broker's version is known: yes.
        self.probing = True
        self._verdicts: dict[str, bool] = {}  # pid -> safe to reply to
        self._names: set[str] = set()  # names already allowed: the hot path is one set lookup
        self._pending: dict[str, _Pending] = {}  # pid -> its probe and the requests held for it
        #: What a request gets when its name could not be vetted: replied to, until a 541 was seen.
        self._unvetted_ok = True
        self.probes = 0  # probes submitted (a test and a metric read it)
        self._last_log = 0.0
        self._suppressed = 0

    # ----------------------------------------------------------------- the decisions

    def on_connected(self, server_properties: Mapping[str, Any] | None) -> None:
        """Read the broker's version from a new connection's server properties; probe only if it needs it."""
        probing = needs_probe(server_properties)
        if probing and not self.probing:
            self._names.clear()  # allowed without a probe on the previous broker
        if probing != self.probing:
            version = broker_version(server_properties)
            shown = ".".join(map(str, version)) if version else "unknown"
            log.info("broker version %s: Direct Reply-to names are %s", shown,
                     "vetted with the broker before replying (541 crash)" if probing else "replied to without a probe")
        self.probing = probing

    def verdict(self, reply_to: Any) -> bool | None:
        """True: reply to it; False: drop the request (logged by the caller); None: :meth:`hold` it."""
        if reply_to in self._names:
            return True
        if type(reply_to) is not str:  # not UTF-8: pika hands it over as bytes
            return False
        if not reply_to.startswith(PREFIX):
            return True
        pid = reply_to[len(PREFIX):].partition(".")[0]
        known = self._verdicts.get(pid)
        if known is False:
            return False
        if not direct_reply_to_ok(reply_to):  # checked per name: the key is part of the shape
            return False
        if known or not self.probing:
            if len(self._names) >= MAX_VERDICTS:
                self._names.clear()
            self._names.add(reply_to)
            return True
        return None

    def hold(self, reply_to: str, item: Any, resume: Callable[[Any, bool], None], url: str) -> None:
        """Keep ``item`` until ``reply_to``'s pid is vetted; then ``resume(item, ok)`` runs on the I/O thread.

        ``url`` is the broker the probe asks: the one the worker is connected to.
        One probe per pid: requests for a pid already being probed join it.
        """
        pid = reply_to[len(PREFIX):].partition(".")[0]
        entry = self._pending.get(pid)
        if entry is None:
            entry = self._pending[pid] = _Pending(self._clock() + self._probe_timeout, url, reply_to)
            self._submit(entry)
        entry.waiting.append((item, resume))

    def _submit(self, entry: _Pending) -> None:
        self.probes += 1
        log.debug("probing the Direct Reply-to pid of %r with the broker", entry.name[:80])
        self._prober.submit(entry.url, entry.name, self._from_prober)

    @property
    def held(self) -> int:
        """Requests waiting for a verdict."""
        return sum(len(entry.waiting) for entry in self._pending.values())

    def poll(self) -> None:
        """Call periodically (the worker's tick): time out probes, and notice a dead prober thread."""
        if not self._pending:
            return
        if not self._prober.alive:
            log.warning("the Direct Reply-to prober thread died; %d request(s) get the fallback verdict", self.held)
            for pid in list(self._pending):
                self._resolve(pid, None)
            return
        now = self._clock()
        expired = [pid for pid, entry in self._pending.items() if entry.deadline <= now]
        if expired:
            log.warning("a Direct Reply-to probe took over %.0f s; starting a new prober", self._probe_timeout)
            self._prober.abandon()
            for pid in expired:
                self._resolve(pid, None)
            for entry in self._pending.values():  # queued behind the stuck probe: ask the new thread
                entry.deadline = now + self._probe_timeout
                self._submit(entry)

    def forget(self) -> None:
        """After a 541 close: vet every name again, and drop requests whose names cannot be vetted."""
        self._verdicts.clear()
        self._names.clear()
        self._unvetted_ok = False

    def stop(self) -> None:
        self._prober.stop()

    # ----------------------------------------------------------------- verdicts

    def _from_prober(self, name: str, ok: bool | None) -> None:  # on the prober's thread
        self._call_threadsafe(lambda: self._resolve(pid_of(name), ok))

    def _resolve(self, pid: str, ok: bool | None) -> None:
        if ok is None:
            decision = self._unvetted_ok
            self._log("cannot vet the Direct Reply-to pid %r with the broker; its requests are %s", pid[:40],
                      "replied to unvetted" if decision else "dropped (a 541 close was seen)")
        else:
            decision = ok
            if len(self._verdicts) >= MAX_VERDICTS:
                self._verdicts.clear()
            self._verdicts[pid] = ok
            if not ok:
                self._log("the broker cannot deliver to the Direct Reply-to name %r (unknown node or pid); "
                          "its requests are dropped", f"{PREFIX}{pid}"[:80])
        entry = self._pending.pop(pid, None)
        for item, resume in entry.waiting if entry is not None else ():
            resume(item, decision)

    def _log(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._last_log + 5.0:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" ({self._suppressed} more like it not logged)"
            self._suppressed = 0
        self._last_log = now
        log.warning(msg, *args)
