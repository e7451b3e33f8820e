"""Helpers for the operations tests (tests/test_ops_*.py): a pool started with any flags and
environment, its metrics endpoint, ``fastfib health`` as a subprocess, a port that refuses, and a
queue's row in ``rabbitmqctl list_queues``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from _server_helpers import ROOT, URL, Pool, rabbitmqctl


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without fastfib's own variables (a developer's shell settings must not
    change what a test sees), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTFIB_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(extra)
    return env


class ServePool(Pool):
    """``python -m fastfib serve ARGS`` with exactly ``args`` and ``env`` (no implicit --queue/--url)."""

    @classmethod
    def on(cls, queue: str, *args: str, workers: int = 2, url: str | None = URL,
           env: dict[str, str] | None = None) -> ServePool:
        """Like ``Pool(queue, *args, workers=...)``: the queue, the worker count and the test broker's URL."""
        argv = ["--queue", queue, "--workers", str(workers), *args] + (["--url", url] if url else [])
        return cls(argv, env or clean_env(), workers)

    def __init__(self, args: list[str], env: dict[str, str], workers: int) -> None:  # noqa: D107
        self.queue = None
        self.workers = workers
        self.log = tempfile.NamedTemporaryFile(prefix="fastfib-ops-", suffix=".log", delete=False)
        self.cmd = [sys.executable, "-m", "fastfib", "serve", *args]
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env,
        )

    def text(self) -> str:
        final = getattr(self, "_final_text", None)
        return final if final is not None else super().text()

    def kill(self) -> None:
        """Kill the whole process group; keep the log's text and remove its file.

        A supervisor killed with SIGKILL cannot remove its metrics directory: this does.
        """
        super().kill()
        self._final_text = text = super().text()
        Path(self.log.name).unlink(missing_ok=True)
        match = re.search(r"multiprocess files in (/[^)\s\"]+fastfib-metrics-[^)\s\"]+)\)", text)
        if match:
            shutil.rmtree(match.group(1), ignore_errors=True)

    def metrics_url(self, timeout: float = 30.0) -> str:
        text = self.wait_for("/metrics", timeout)
        match = re.search(r"metrics on (http://[^/\s\"]+)/metrics", text)
        assert match, text
        return match.group(1)

    def metrics_dir(self) -> str:
        match = re.search(r"multiprocess files in ([^)\s\"]+)\)", self.text())
        assert match, self.text()
        return match.group(1)


def queue_row(queue: str) -> list[str]:
    """The broker's ``list_queues`` row of ``queue``: name, durable, type, arguments."""
    for line in rabbitmqctl("list_queues", "name", "durable", "type", "arguments").splitlines():
        fields = line.split("\t")
        if fields[0] == queue:
            return fields
    raise AssertionError(f"queue {queue} not listed")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(base_url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``/metrics``: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(base_url + "/metrics")
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def healthz(base_url: str) -> tuple[int, dict]:
    status, body = http_get(base_url + "/healthz")
    return status, json.loads(body)


def run_health(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastfib", "health", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env or clean_env())


def run_serve(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """``fastfib serve`` expected to exit by itself (bad configuration)."""
    return subprocess.run([sys.executable, "-m", "fastfib", "serve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env or clean_env(), stdin=subprocess.DEVNULL)


class RefusingPort:
    """A loopback port bound but not listening: connecting to it is refused (ECONNREFUSED).

    Holding the socket keeps anybody else from listening there during the test.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def url(self, password: str = "guest") -> str:
        return f"amqp://guest:{password}@127.0.0.1:{self.port}/%2F"

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RefusingPort:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_until(predicate, timeout: float, interval: float = 0.1):
    """Poll ``predicate()`` until it returns something true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def blocked_prometheus_path(tmp: Path) -> str:
    """A directory whose ``prometheus_client`` package raises ImportError, to put first on PYTHONPATH."""
    package = tmp / "prometheus_client"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("prometheus_client blocked by the test")\n')
    return str(tmp)
