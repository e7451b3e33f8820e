"""Helpers for the fault, bad-input, leak and security suite (tests/test_fault_*.py).

Builds on tests/_server_helpers.py (the ``fastfib serve`` subprocess
:class:`Pool`, the recording pika :class:`RpcClient`) and adds:

- an oracle for protocol v1 replies that does not use ``fastfib.protocol``
  (so that a parsing bug in the server cannot hide behind the same bug here);
- :func:`check_replies`: every reply of a :func:`_server_helpers.run_requests`
  load (requests with per-request headers) checked against the oracle;
- worker RSS sampling with psutil;
- broker-side fixtures built with ``rabbitmqctl``: users with given
  permissions, a TLS listener started at runtime, and the real shape of a
  Direct Reply-to name on this broker.

Everything a helper creates on the shared broker has a unique name and is
deleted in a ``finally``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gmpy2
import pika
import psutil
from _server_helpers import (  # noqa: F401 - re-exported
    URL,
    Pool,
    RpcClient,
    delete_queue,
    queue_depth,
    rabbitmqctl,
    run_requests,
)

log = logging.getLogger(__name__)

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672

DECIMAL = "text/plain"
BINARY = "application/octet-stream"
ERROR = "application/json"

#: What the protocol calls ASCII whitespace around a request body (Python's bytes.strip() set).
_ASCII_WS = b" \t\n\r\x0b\x0c"
_BODY = re.compile(rb"[ \t\n\r\x0b\x0c]*(-?)([0-9]+)[ \t\n\r\x0b\x0c]*\Z")


def unique(tag: str) -> str:
    """A name no other test (or engineer) uses: for queues, users, vhosts."""
    return f"fastfib-test-{tag}-{uuid.uuid4().hex[:12]}"


# ------------------------------------------------------------------------------- the oracle


def fib_body(n: int, fmt: str) -> bytes:
    """F(n) encoded as protocol v1 says, computed with gmpy2 (not the kernel under test)."""
    value = gmpy2.fib(n)
    if fmt == "decimal":
        return value.digits().encode("ascii")
    return int(value).to_bytes(max(1, (int(value).bit_length() + 7) // 8), "big")


@dataclass(frozen=True)
class Outcome:
    """What a request must get: a success reply (content type + body), one of some error kinds, or nothing."""

    content_type: str | None = None
    body: bytes | None = None
    error_kinds: frozenset[str] = frozenset()
    no_reply: bool = False

    def matches(self, content_type: str | None, headers: dict | None, body: bytes) -> bool:
        if self.no_reply:
            return False
        kind = (headers or {}).get("x-error")
        if isinstance(kind, bytes):
            kind = kind.decode("utf-8", "replace")
        if self.error_kinds:
            if kind not in self.error_kinds or content_type != ERROR:
                return False
            doc = json.loads(body)
            return doc.get("error") == kind and isinstance(doc.get("message"), str) and bool(doc["message"])
        return kind is None and content_type == self.content_type and body == self.body


def expected_outcome(body: bytes, headers: dict | None, max_n: int, now_ms: float | None = None) -> Outcome:
    """The reply protocol v1 prescribes for a request (written from docs/protocol.md, not from the code).

    When both the ``accept`` header and the body are wrong, either error is
    right: the protocol does not say which check comes first.
    """
    headers = headers or {}
    deadline = headers.get("x-deadline-ms")
    if isinstance(deadline, int) and not isinstance(deadline, bool):
        if (now_ms if now_ms is not None else time.time() * 1000) > deadline:
            return Outcome(no_reply=True)
    accept = headers.get("accept")
    if isinstance(accept, bytes):
        accept = accept.decode("utf-8", "replace")
    fmt = {None: "decimal", DECIMAL: "decimal", BINARY: "binary"}.get(accept) if (
        accept is None or isinstance(accept, str)) else None
    kinds: set[str] = set()
    if fmt is None:
        kinds.add("unsupported_format")
    m = _BODY.match(body) if len(body) <= 64 else None
    if m is None:
        kinds.add("invalid_argument")
    else:
        sign, digits = m.groups()
        n = int(digits)
        if (sign and n) or n > max_n:
            kinds.add("out_of_range")
        elif fmt is not None:
            return Outcome(content_type=DECIMAL if fmt == "decimal" else BINARY, body=fib_body(n, fmt))
    return Outcome(error_kinds=frozenset(kinds))


# ---------------------------------------------------------------------------------- load


def check_replies(client: RpcClient, sent: dict[str, tuple[bytes, dict | None]], max_n: int) -> int:
    """Every request got exactly the reply the oracle expects; returns how many got duplicates.

    Duplicates (the same correlation id answered twice, from a redelivery) are
    what protocol v1 allows and clients drop; each copy must still be right.
    """
    duplicates = 0
    for cid, (body, headers) in sent.items():
        replies = client.replies.get(cid)
        assert replies, f"request {cid} ({body[:30]!r}, {headers}) never answered"
        want = expected_outcome(body, headers, max_n, now_ms=0)
        for props, reply in replies:
            assert want.matches(props.content_type, props.headers, reply), (
                f"request {body[:30]!r} {headers}: got {props.content_type} {props.headers} {reply[:60]!r}, "
                f"want {want.content_type} {want.error_kinds} {(want.body or b'')[:60]!r}")
        duplicates += len(replies) > 1
    return duplicates


# -------------------------------------------------------------------------------- processes


def rss_mb(pids: list[int]) -> dict[int, float]:
    """Resident set size of each process, in MiB."""
    return {pid: psutil.Process(pid).memory_info().rss / 2**20 for pid in pids}


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


def consumers(queue: str) -> int:
    try:
        return queue_depth(queue)[1]
    except Exception:  # the queue does not exist (yet), or the broker is restarting
        return -1


def unacked(queue: str) -> int:
    """``messages_unacknowledged`` of ``queue`` (the broker's view), -1 if the queue is not listed."""
    for line in rabbitmqctl("list_queues", "name", "messages_unacknowledged").splitlines():
        name, _, count = line.rpartition("\t")
        if name == queue:
            return int(count)
    return -1


def free_port() -> int:
    with socket.socket() as s:
        s.bind((BROKER_HOST, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- the broker


def broker_await_startup(timeout: float = 120) -> None:
    """Block until the broker's app runs and port 5672 answers."""
    subprocess.run(["rabbitmqctl", "-q", "await_startup", "--timeout", str(int(timeout))],
                   capture_output=True, timeout=timeout + 10, check=False)
    wait_until(lambda: _port_answers(BROKER_HOST, BROKER_PORT), timeout, what="broker port 5672")


def _port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def broker_user(configure: str, write: str, read: str, vhost: str = "/", tag: str = "user") -> Iterator[tuple[str, str]]:
    """A broker user with exactly these permission regexes on ``vhost``; yields (name, password); deleted after."""
    user, password = unique(tag), uuid.uuid4().hex
    rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, user, configure, write, read)
        yield user, password
    finally:
        rabbitmqctl("delete_user", user, check=False)


def amqp_url(user: str, password: str, host: str = BROKER_HOST, port: int = BROKER_PORT, vhost: str = "%2F",
             scheme: str = "amqp", query: str = "") -> str:
    return f"{scheme}://{user}:{password}@{host}:{port}/{vhost}{'?' + query if query else ''}"


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1 signed by it (openssl).

    The files must be readable by the broker (user ``rabbitmq``): the
    directory is 0755 and the files 0644; the key is a test key that lives
    for the test only.
    """
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    files = {name: directory / f"{name}.pem" for name in ("ca", "ca_key", "server", "server_key")}
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=fastfib test CA",
            "-keyout", str(files["ca_key"]), "-out", str(files["ca"]))
    csr = directory / "server.csr"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", str(files["server_key"]), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(files["ca"]), "-CAkey", str(files["ca_key"]),
            "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(files["server"]))
    for path in directory.iterdir():
        os.chmod(path, 0o644)
    return files


def _erl_string(path: Path) -> str:
    return json.dumps(str(path))  # a JSON string of a plain path is a valid Erlang string literal


@contextlib.contextmanager
def tls_listener(port: int, files: dict[str, Path]) -> Iterator[None]:
    """A TLS listener on 127.0.0.1:``port`` of the running broker, started at runtime, stopped after.

    ``rabbit_networking:start_ssl_listener/3`` (RabbitMQ 3.10) adds a ranch
    listener to the running node; nothing is written to the broker's
    configuration, so a broker restart would drop it anyway, and
    ``stop_tcp_listener`` removes it.
    """
    listener = f'{{"127.0.0.1", {port}}}'
    opts = (f"[{{cacertfile, {_erl_string(files['ca'])}}}, {{certfile, {_erl_string(files['server'])}}}, "
            f"{{keyfile, {_erl_string(files['server_key'])}}}, {{verify, verify_none}}, "
            "{fail_if_no_peer_cert, false}]")
    out = rabbitmqctl("eval", f"{{ok, _}} = application:ensure_all_started(ssl), "
                              f"rabbit_networking:start_ssl_listener({listener}, {opts}, 1).")
    assert out.strip() == "ok", f"cannot start the TLS listener: {out}"
    try:
        wait_until(lambda: _port_answers(BROKER_HOST, port), 10, what=f"TLS listener on {port}")
        yield
    finally:
        rabbitmqctl("eval", f"rabbit_networking:stop_tcp_listener({listener}).", check=False)


# ------------------------------------------------------------------- Direct Reply-to names


@dataclass(frozen=True)
class DirectReplyTo:
    """The parts of a real Direct Reply-to name on this broker: ``amq.rabbitmq.reply-to.<pid>.<key>``.

    ``pid`` is the base64 of an Erlang external term (NEW_PID_EXT) whose node
    atom is ``reply@<hash of the node name>`` on RabbitMQ 3.10.
    """

    name: str
    pid_term: bytes
    key: str

    @property
    def node(self) -> bytes:
        tag = self.pid_term[2]
        if tag in (100, 118):
            return self.pid_term[5:5 + int.from_bytes(self.pid_term[3:5], "big")]
        return self.pid_term[4:4 + self.pid_term[3]]

    def with_node(self, node: bytes, tail: bytes | None = None) -> str:
        """The same name with another node atom (and optionally other id/serial/creation bytes)."""
        raw = self.pid_term
        tag = raw[2]
        if tag in (100, 118):
            alen, pos = int.from_bytes(raw[3:5], "big"), 5
        else:
            alen, pos = raw[3], 4
        atom = bytes((118,)) + len(node).to_bytes(2, "big") + node  # ATOM_UTF8_EXT
        term = raw[:2] + atom + (raw[pos + alen:] if tail is None else tail)
        return f"amq.rabbitmq.reply-to.{base64.b64encode(term).decode()}.{self.key}"


def learn_direct_reply_to(url: str = URL) -> DirectReplyTo:
    """Ask the broker for a real Direct Reply-to name (publish to a private queue, read the rewritten reply_to)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.basic_consume("amq.rabbitmq.reply-to", lambda *a: None, auto_ack=True)
        channel.basic_publish("", queue, b"", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to"))
        deadline = time.monotonic() + 10
        while True:
            method, props, _ = channel.basic_get(queue, auto_ack=True)
            if method is not None:
                break
            if time.monotonic() > deadline:
                raise AssertionError("the broker did not hand back the probe message")
            connection.process_data_events(0.02)
    finally:
        connection.close()
    pid_b64, _, key = props.reply_to[len("amq.rabbitmq.reply-to."):].partition(".")
    return DirectReplyTo(props.reply_to, base64.b64decode(pid_b64), key)


__all__ = [
    "Pool", "RpcClient", "delete_queue", "queue_depth", "rabbitmqctl", "URL",
    "unique", "fib_body", "Outcome", "expected_outcome", "run_requests", "check_replies", "rss_mb", "wait_until",
    "consumers", "unacked", "free_port", "broker_await_startup", "broker_user", "amqp_url", "make_tls_files",
    "tls_listener", "DirectReplyTo", "learn_direct_reply_to",
]
