"""A ``fastfib serve`` pool in a subprocess and a pipelined pika client, for the issue-14 benchmarks
(``python -m bench.queue_kinds``, ``python -m bench.reply_flood``).

Kept apart from the main harness (``python -m bench``): these measure one question each, as ratios
of runs interleaved in one process, and print medians.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pika

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
ROOT = Path(__file__).resolve().parent.parent


class ServePool:
    """``python -m fastfib serve --queue Q ...`` from ``root`` (another checkout: a before/after comparison)."""

    def __init__(self, queue: str, *args: str, url: str = DEFAULT_URL, workers: int = 2, root: Path = ROOT) -> None:
        self.queue = queue
        self.log = Path(tempfile.mkstemp(prefix="fastfib-bench-", suffix=".log")[1])
        self._out = self.log.open("wb")
        env = {**os.environ, "PYTHONPATH": str(root)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastfib", "serve", "--queue", queue, "--workers", str(workers), "--url", url, *args],
            cwd=root, stdout=self._out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.workers = workers

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while f"all {self.workers} workers consuming" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fastfib serve did not start:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self._out.close()


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM (a pool drains and exits), then SIGKILL after ``timeout`` seconds; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def delete_queue(queue: str, url: str = DEFAULT_URL) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_delete(queue)
    finally:
        connection.close()


def queue_depth(queue: str, url: str = DEFAULT_URL) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


class PipelinedClient:
    """Direct Reply-to client keeping ``window`` calls in flight; counts correct replies."""

    def __init__(self, queue: str, url: str = DEFAULT_URL) -> None:
        self.queue = queue
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.basic_consume("amq.rabbitmq.reply-to", self._on_reply, auto_ack=True)
        self._pending: dict[str, float] = {}
        self.latencies: list[float] = []
        self.wrong = 0
        self._expect = b""

    def _on_reply(self, ch, method, props, body) -> None:
        sent = self._pending.pop(props.correlation_id, None)
        if sent is None:
            return
        self.latencies.append(time.perf_counter() - sent)
        if body != self._expect:
            self.wrong += 1

    def _send(self, body: bytes) -> None:
        cid = uuid.uuid4().hex
        self._pending[cid] = time.perf_counter()
        self.channel.basic_publish("", self.queue, body, pika.BasicProperties(
            reply_to="amq.rabbitmq.reply-to", correlation_id=cid))

    def run(self, body: bytes, expect: bytes, seconds: float, window: int = 32) -> float:
        """Calls completed per second over ``seconds`` with ``window`` in flight (window 1: sequential)."""
        self._expect, self.latencies, self.wrong = expect, [], 0
        self._pending.clear()
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            while len(self._pending) < window:
                self._send(body)
            self.connection.process_data_events(time_limit=0.01 if window > 1 else 0.05)
        elapsed = time.perf_counter() - start
        done = len(self.latencies)
        deadline = time.monotonic() + 30
        while self._pending and time.monotonic() < deadline:  # let the stragglers in before the next run
            self.connection.process_data_events(time_limit=0.05)
        return done / elapsed

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:  # noqa: BLE001 - closing at the end of a benchmark
            pass


def median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
