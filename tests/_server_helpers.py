"""Helpers for the server pool tests (tests/test_server_*.py).

- :class:`Pool`: ``python -m fastfib serve --queue Q ...`` as a subprocess in a
  session of its own, its stderr in a file; the fixture teardown kills the
  whole process group, whatever happened.
- :class:`RpcClient`: a pika client that pipelines requests with a window,
  either over Direct Reply-to or over an exclusive callback queue (the
  tutorial's way), and keeps every reply it gets, duplicates included.
- ``tutorial-server``: the RabbitMQ tutorial's ``rpc_server.py`` (naive
  recursion, prefetch 1), run as ``python tests/_server_helpers.py
  tutorial-server --queue Q``.
- ``load``: a quick throughput check, ``python tests/_server_helpers.py load
  --queue Q --n 20 --window 32 --seconds 5``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pika

ROOT = Path(__file__).resolve().parent.parent
URL = os.environ.get("FASTFIB_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
READY_LINE = "workers consuming"
#: The worker's wires (``fastfib serve --wire``): the server tests run on each.
WIRES = ("fast", "pika")


class Pool:
    """A ``fastfib serve`` subprocess (supervisor + workers) in its own session."""

    def __init__(self, queue: str, *args: str, workers: int = 2, url: str | None = URL, env: dict | None = None,
                 wire: str | None = None) -> None:
        self.queue = queue
        self.workers = workers
        #: The --wire given, else FASTFIB_WIRE (of ``env``, then of this process), else the default.
        self.wire = wire or (env or {}).get("FASTFIB_WIRE") or os.environ.get("FASTFIB_WIRE") or "fast"
        self.log = tempfile.NamedTemporaryFile(prefix="fastfib-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "fastfib", "serve", "--queue", queue, "--workers", str(workers), *args]
        if wire is not None:
            cmd += ["--wire", wire]
        if url is not None:
            cmd += ["--url", url]
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, **(env or {})},
        )

    def text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 30.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if text.count(needle) >= count:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"fastfib serve exited with {self.proc.returncode} before {needle!r}:\n{text}")
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} (x{count}) within {timeout} s:\n{self.text()}")

    def wait_ready(self, timeout: float = 30.0, count: int = 1) -> None:
        self.wait_for(f"all {self.workers} {READY_LINE}", timeout, count)

    def worker_pids(self) -> list[int]:
        """The pids of the live workers (children of the supervisor)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        pids = []
        for pid in map(int, out.split()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
                pids.append(pid)
        return pids

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Kill the supervisor and every worker (the whole session's process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()


class RpcClient:
    """A pipelining pika RPC client that records every reply (duplicates too).

    ``direct=True`` uses Direct Reply-to; otherwise an exclusive, server-named
    callback queue, as the tutorial's ``rpc_client.py`` does.
    """

    def __init__(self, queue: str, url: str = URL, direct: bool = True) -> None:
        self.queue = queue
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        if direct:
            self.reply_to = "amq.rabbitmq.reply-to"
        else:
            self.reply_to = self.channel.queue_declare(queue="", exclusive=True).method.queue
        self.channel.basic_consume(self.reply_to, self._on_reply, auto_ack=True)
        self.replies: dict[str, list[tuple[pika.BasicProperties, bytes]]] = defaultdict(list)
        self.stray: list[tuple[pika.BasicProperties, bytes]] = []

    def _on_reply(self, ch, method, props, body) -> None:
        if props.correlation_id is None:
            self.stray.append((props, body))
        else:
            self.replies[props.correlation_id].append((props, body))

    def publish(self, body: bytes, *, headers: dict | None = None, correlation_id: str | None = None,
                reply_to: str | None | bool = True, expiration: str | None = None) -> str:
        cid = correlation_id or uuid.uuid4().hex
        props = pika.BasicProperties(
            reply_to=self.reply_to if reply_to is True else (reply_to or None),
            correlation_id=cid, headers=headers, expiration=expiration,
        )
        self.channel.basic_publish("", self.queue, body, props)
        return cid

    def call(self, body: bytes, timeout: float = 10.0, **kw: Any) -> tuple[pika.BasicProperties, bytes]:
        cid = self.publish(body, **kw)
        deadline = time.monotonic() + timeout
        while not self.replies.get(cid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to {body!r} within {timeout} s")
            self.connection.process_data_events(time_limit=0.05)
        return self.replies[cid][0]

    def run(self, bodies: list[bytes], window: int = 32, timeout: float = 60.0, headers: dict | None = None) -> dict[str, bytes]:
        """Send every body with at most ``window`` outstanding; wait for all answers; return cid -> body."""
        sent = run_requests(self, [(body, headers) for body in bodies], window, timeout)
        return {cid: body for cid, (body, _) in sent.items()}

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.05)

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:
            pass

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_requests(client: RpcClient, requests: list[tuple[bytes, dict | None]], window: int = 64,
                 timeout: float = 120.0) -> dict[str, tuple[bytes, dict | None]]:
    """Send every (body, headers) with at most ``window`` unanswered; wait for all; return cid -> request."""
    sent: dict[str, tuple[bytes, dict | None]] = {}
    pending: set[str] = set()
    it = iter(requests)
    exhausted = False
    deadline = time.monotonic() + timeout
    while True:
        while not exhausted and len(pending) < window:
            try:
                body, headers = next(it)
            except StopIteration:
                exhausted = True
                break
            cid = client.publish(body, headers=headers)
            sent[cid] = (body, headers)
            pending.add(cid)
        if exhausted and not pending:
            return sent
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} of {len(sent)} requests unanswered after {timeout} s")
        client.connection.process_data_events(time_limit=0.05)
        pending = {c for c in pending if not client.replies.get(c)}


def delete_queue(queue: str, url: str = URL) -> None:
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            connection.channel().queue_delete(queue)
        finally:
            connection.close()
    except Exception:
        pass


def queue_depth(queue: str, url: str = URL) -> tuple[int, int]:
    """(ready messages, consumers) of ``queue``."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ok = connection.channel().queue_declare(queue, passive=True).method
        return ok.message_count, ok.consumer_count
    finally:
        connection.close()


def rabbitmqctl(*args: str, check: bool = True) -> str:
    out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {out.stderr or out.stdout}")
    return out.stdout


def close_worker_connections(queue: str) -> int:
    """Make the broker close (CONNECTION_FORCED) every worker connection of the pool serving ``queue``."""
    closed = 0
    for line in rabbitmqctl("list_connections", "pid", "client_properties").splitlines():
        if f"queue={queue}" in line and "fastfib-worker" in line:
            pid = line.split("\t", 1)[0].strip()
            rabbitmqctl("close_connection", pid, "test: broker closes the connection", check=False)
            closed += 1
    return closed


# ---------------------------------------------------------------------------------- scripts


def _tutorial_server(queue: str, url: str) -> None:
    """The RabbitMQ tutorial's rpc_server.py, as it is (plus a clean exit on SIGTERM)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue=queue)

    def fib(n):
        if n == 0:
            return 0
        elif n == 1:
            return 1
        else:
            return fib(n - 1) + fib(n - 2)

    def on_request(ch, method, props, body):
        n = int(body)
        response = fib(n)
        ch.basic_publish(exchange="", routing_key=props.reply_to,
                         properties=pika.BasicProperties(correlation_id=props.correlation_id), body=str(response))
        ch.basic_ack(delivery_tag=method.delivery_tag)

    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(queue=queue, on_message_callback=on_request)
    signal.signal(signal.SIGTERM, lambda *a: connection.add_callback_threadsafe(channel.stop_consuming))
    print(" [x] Awaiting RPC requests", flush=True)
    channel.start_consuming()
    connection.close()


def _load(queue: str, url: str, n: int, window: int, seconds: float, accept: str | None) -> None:
    headers = {"accept": accept} if accept else None
    with RpcClient(queue, url) as client:
        client.run([str(n).encode()] * 200, window=window, headers=headers)  # warm up
        done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            client.run([str(n).encode()] * 2000, window=window, headers=headers)
            done += 2000
        elapsed = time.perf_counter() - start
    print(f"n={n} window={window}: {done / elapsed:.0f} req/s ({done} in {elapsed:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["tutorial-server", "load"])
    parser.add_argument("--queue", required=True)
    parser.add_argument("--url", default=URL)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--accept", default=None)
    args = parser.parse_args(argv)
    if args.command == "tutorial-server":
        _tutorial_server(args.queue, args.url)
    else:
        _load(args.queue, args.url, args.n, args.window, args.seconds, args.accept)
    return 0


if __name__ == "__main__":
    sys.exit(main())
