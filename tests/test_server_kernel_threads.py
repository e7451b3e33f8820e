"""`fastfib serve --kernel-threads K` (issue 8): large F(n) on two threads, same answers."""

from __future__ import annotations

import gmpy2
import pytest
from _server_helpers import Pool, RpcClient

import fastfib
from fastfib import config as cfg
from fastfib import protocol
from fastfib.cli import build_parser
from fastfib.server.lifecycle import Worker
from fastfib.server.settings import WorkerConfig

pytestmark = pytest.mark.broker


def _threads(argv: list[str], env: dict[str, str]) -> int:
    return cfg.serve_settings(build_parser().parse_args(["serve", *argv]), env).worker.kernel_threads


def test_kernel_threads_from_flag_env_and_default():
    assert _threads([], {}) == 1
    assert _threads([], {"FASTFIB_KERNEL_THREADS": "2"}) == 2
    assert _threads(["--kernel-threads", "4"], {"FASTFIB_KERNEL_THREADS": "2"}) == 4
    with pytest.raises(cfg.ConfigError, match="FASTFIB_KERNEL_THREADS"):
        _threads([], {"FASTFIB_KERNEL_THREADS": "0"})


def test_worker_passes_threads_to_the_kernel():
    worker = Worker(WorkerConfig(kernel_threads=2))
    assert worker.computer.compute.keywords == {"threads": 2}
    assert int.from_bytes(worker.computer.compute(10**6, "binary"), "big") == gmpy2.fib(10**6)
    assert Worker(WorkerConfig()).computer.compute is fastfib.fib_encoded  # threads=1: the plain call


def test_pool_with_two_kernel_threads_answers_large_n(broker_url, queue):
    with Pool(queue, "--kernel-threads", "2", "--cache-bytes", "0", workers=1) as pool:
        pool.wait_ready()
        with RpcClient(queue) as client:
            for n in (10**6, 999_999, 20, 0):
                props, body = client.call(str(n).encode(), headers={"accept": protocol.CONTENT_BINARY}, timeout=30)
                assert props.content_type == protocol.CONTENT_BINARY
                assert int.from_bytes(body, "big") == gmpy2.fib(n)
            props, body = client.call(b"500001", timeout=30)
            assert body == gmpy2.fib(500_001).digits().encode()
