"""Fixture servers and broker helpers for the client tests (tests/test_client_*.py).

Each fixture server is a pika consumer on its own connection, in a thread of
the test process (or, run as a script, in a process of its own):

- ``naive``: the RabbitMQ tutorial's ``rpc_server.py``: ``int(body)``, reply
  ``str(fib(n))`` with only ``correlation_id`` set (no content type, no error
  handling: a bad request gets no reply);
- ``conformant``: protocol v1 (``docs/protocol.md``): ``accept``, error
  replies with ``x-error``, ``x-deadline-ms``, a configurable maximum n;
- ``twice``: ``conformant``, but every reply is published twice;
- ``silent``: consumes and acknowledges requests, never replies.

Run as a script for manual checks and latency measurements::

    python tests/_client_helpers.py --queue Q --mode conformant
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gmpy2
import pika
from pika.spec import BasicProperties

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from fastfib import protocol  # noqa: E402
from fastfib.errors import (  # noqa: E402
    InternalServerError,
    InvalidArgument,
    OutOfRange,
    RemoteError,
    UnsupportedFormat,
)

URL = os.environ.get("FASTFIB_TEST_URL", protocol.DEFAULT_URL)

#: n for which the conformant fixture answers with an ``internal`` error.
INTERNAL_ERROR_N = 666_666


def unique_queue(tag: str = "q") -> str:
    return f"fastfib-test-{tag}-{uuid.uuid4().hex[:12]}"


def unique_name(tag: str = "client") -> str:
    return f"fastfib-test-{tag}-{uuid.uuid4().hex}"


def fib(n: int) -> int:
    return int(gmpy2.fib(n))


def decimal(n: int) -> str:
    """str(n) without CPython's 4300-digit limit."""
    return gmpy2.mpz(n).digits()


# --- request handlers: (properties, body) -> [(properties, body), ...] replies -------------

Reply = tuple[BasicProperties, bytes]
Handler = Callable[[BasicProperties, bytes], list[Reply]]


def naive_handler(props: BasicProperties, body: bytes) -> list[Reply]:
    """The tutorial server: ``response = fib(int(body))``, ``body=str(response)``."""
    n = int(body)
    response = fib(n)
    return [(BasicProperties(correlation_id=props.correlation_id), decimal(response).encode())]


def conformant_handler(max_n: int = protocol.DEFAULT_MAX_N) -> Handler:
    def handle(props: BasicProperties, body: bytes) -> list[Reply]:
        headers = props.headers or {}
        if protocol.deadline_passed(headers):
            return []
        try:
            fmt = protocol.reply_format(headers)
            n = protocol.parse_n(body, max_n)
            if n == INTERNAL_ERROR_N:
                raise RemoteError("the fixture server fails on purpose", protocol.KIND_INTERNAL)
            value = fib(n)
        except RemoteError as exc:
            return [
                (
                    BasicProperties(
                        correlation_id=props.correlation_id,
                        content_type=protocol.CONTENT_ERROR,
                        headers={protocol.HEADER_ERROR: exc.kind},
                    ),
                    protocol.error_body(exc.kind, exc.message),
                )
            ]
        if fmt == "binary":
            out = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
        else:
            out = decimal(value).encode()
        ctype = protocol.CONTENT_TYPES[fmt]
        return [(BasicProperties(correlation_id=props.correlation_id, content_type=ctype), out)]

    return handle


def twice_handler(max_n: int = protocol.DEFAULT_MAX_N) -> Handler:
    inner = conformant_handler(max_n)

    def handle(props: BasicProperties, body: bytes) -> list[Reply]:
        return inner(props, body) * 2

    return handle


def silent_handler(props: BasicProperties, body: bytes) -> list[Reply]:
    return []


def drop_first_handler(inner: Handler) -> Handler:
    """Ignore the first delivery of each correlation id; answer its redelivery or resend."""
    seen: set[str | None] = set()

    def handle(props: BasicProperties, body: bytes) -> list[Reply]:
        if props.correlation_id not in seen:
            seen.add(props.correlation_id)
            return []
        return inner(props, body)

    return handle


#: n -> the error kind the ``error_kinds`` fixture answers with (any other n: conformant).
ERROR_KINDS_BY_N = {
    1: protocol.KIND_INVALID_ARGUMENT,
    2: protocol.KIND_OUT_OF_RANGE,
    3: protocol.KIND_UNSUPPORTED_FORMAT,
    4: protocol.KIND_INTERNAL,
    5: "some_future_kind",
}

#: The exception a client must raise for each error kind (RemoteError itself for a kind it does not know).
ERROR_CLASS_BY_KIND = {
    protocol.KIND_INVALID_ARGUMENT: InvalidArgument,
    protocol.KIND_OUT_OF_RANGE: OutOfRange,
    protocol.KIND_UNSUPPORTED_FORMAT: UnsupportedFormat,
    protocol.KIND_INTERNAL: InternalServerError,
}


def error_kinds_handler(props: BasicProperties, body: bytes) -> list[Reply]:
    """Answer n in ERROR_KINDS_BY_N with a protocol-conformant error reply of that kind."""
    kind = ERROR_KINDS_BY_N.get(int(body))
    if kind is None:
        return conformant_handler()(props, body)
    message = f"fixture error {kind} for n={int(body)}"
    reply = BasicProperties(
        correlation_id=props.correlation_id,
        content_type=protocol.CONTENT_ERROR,
        headers={protocol.HEADER_ERROR: kind},
    )
    return [(reply, protocol.error_body(kind, message))]


HANDLERS: dict[str, Callable[[], Handler]] = {
    "naive": lambda: naive_handler,
    "conformant": conformant_handler,
    "twice": twice_handler,
    "silent": lambda: silent_handler,
}


class FixtureServer:
    """A pika consumer on ``queue`` in a background thread.

    ``declare`` declares the queue as the tutorial does. Every request is
    recorded in ``requests`` as (properties, body). ``delay`` seconds are
    slept before each reply (in the consumer thread).
    """

    def __init__(
        self,
        queue: str,
        handler: Handler,
        *,
        url: str = URL,
        declare: bool = True,
        prefetch: int = 100,
        delay: float = 0.0,
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.url = url
        self.declare = declare
        self.prefetch = prefetch
        self.delay = delay
        self.requests: list[tuple[BasicProperties, bytes]] = []
        self.replies_sent = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._conn: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._thread = threading.Thread(target=self._run, name=f"fixture-server-{queue}", daemon=True)

    def start(self) -> FixtureServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fixture server did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            self._conn = pika.BlockingConnection(pika.URLParameters(self.url))
            ch = self._channel = self._conn.channel()
            if self.declare:
                ch.queue_declare(queue=self.queue)
            ch.basic_qos(prefetch_count=self.prefetch)
            ch.basic_consume(queue=self.queue, on_message_callback=self._on_request)
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            ch.start_consuming()
        except Exception as exc:  # connection closed under us at teardown
            self._error = exc
        finally:
            try:
                if self._conn.is_open:
                    self._conn.close()
            except Exception:
                pass

    def _on_request(self, ch: Any, method: Any, props: BasicProperties, body: bytes) -> None:
        self.requests.append((props, body))
        try:
            replies = self.handler(props, body)
        except Exception:
            replies = []  # the tutorial server would crash; we drop the request
        if self.delay:
            time.sleep(self.delay)
        for reply_props, reply_body in replies:
            if props.reply_to:
                ch.basic_publish(exchange="", routing_key=props.reply_to, properties=reply_props, body=reply_body)
                self.replies_sent += 1
        ch.basic_ack(delivery_tag=method.delivery_tag)

    def stop(self) -> None:
        conn = self._conn
        if conn is not None and self._thread.is_alive():
            try:
                conn.add_callback_threadsafe(self._channel.stop_consuming)
            except Exception:
                pass
        self._thread.join(10)

    def __enter__(self) -> FixtureServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- broker helpers ------------------------------------------------------------------------


def declare(queue: str, **kwargs: Any) -> None:
    """Declare a queue as the tutorial does (not durable, no arguments)."""
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        conn.channel().queue_declare(queue=queue, **kwargs)
    finally:
        conn.close()


def delete_queue(queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        conn.channel().queue_delete(queue=queue)
    finally:
        conn.close()


def queue_counts(queue: str) -> tuple[int, int]:
    """(message_count, consumer_count) of an existing queue, by a passive declare."""
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        frame = conn.channel().queue_declare(queue=queue, passive=True)
        return frame.method.message_count, frame.method.consumer_count
    finally:
        conn.close()


@contextmanager
def temp_queue(tag: str = "q") -> Iterator[str]:
    """A unique queue name; the queue (if any was declared) is deleted afterwards."""
    name = unique_queue(tag)
    try:
        yield name
    finally:
        try:
            delete_queue(name)
        except Exception:
            pass


def _rabbitmqctl(*args: str, timeout: float = 60) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=timeout
    ).stdout


def broker_connection_pids(connection_name: str) -> list[str]:
    """The broker's pids of the connections whose client property connection_name matches."""
    # Each line: "<pid>\t[{...,{"connection_name","the name"},...}]"
    out = _rabbitmqctl("list_connections", "pid", "client_properties")
    return [line.split("\t", 1)[0] for line in out.splitlines() if f'"{connection_name}"' in line]


def close_broker_connection(connection_name: str, reason: str = "closed by a fastfib test", wait: float = 10) -> int:
    """Close, from the broker side, every connection named ``connection_name``.

    Waits up to ``wait`` seconds for the connection to show up (the management
    listing lags the AMQP handshake by a little). Returns how many were closed.
    """
    end = time.monotonic() + wait
    while True:
        pids = broker_connection_pids(connection_name)
        if pids or time.monotonic() > end:
            break
        time.sleep(0.1)
    for pid in pids:
        _rabbitmqctl("close_connection", pid, reason)
    return len(pids)


def close_when_received(server: FixtureServer, count: int, name: str) -> None:
    """Once ``server`` has ``count`` requests (or after 10 s), close the connection named ``name`` from the broker."""
    end = time.monotonic() + 10
    while len(server.requests) < count and time.monotonic() < end:
        time.sleep(0.02)
    assert close_broker_connection(name) == 1


# --- the real server: python -m fastfib serve ----------------------------------------------


@contextmanager
def real_server(queue: str, workers: int = 1, max_n: int = protocol.DEFAULT_MAX_N) -> Iterator[list[str]]:
    """Run ``python -m fastfib serve`` on ``queue`` until the block ends; yields its log lines."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastfib", "serve", "--queue", queue, "--workers", str(workers),
         "--max-n", str(max_n)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line.rstrip())
            if "workers consuming" in line or "worker consuming" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(30):
            raise RuntimeError("fastfib serve did not get ready:\n" + "\n".join(lines))
        yield lines
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run a fixture RPC server")
    parser.add_argument("--queue", default=protocol.DEFAULT_QUEUE)
    parser.add_argument("--mode", choices=sorted(HANDLERS), default="conformant")
    parser.add_argument("--url", default=URL)
    parser.add_argument("--prefetch", type=int, default=100)
    args = parser.parse_args(argv)
    server = FixtureServer(args.queue, HANDLERS[args.mode](), url=args.url, prefetch=args.prefetch).start()
    print(f"serving {args.queue!r} ({args.mode}); Ctrl-C stops", flush=True)
    try:
        while server._thread.is_alive():
            server._thread.join(1)
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
