"""RabbitMQ restarted under load (issue 6, part 3).

``rabbitmqctl stop_app`` then ``start_app`` while a blocking and an asyncio
client pipeline requests: every connection drops and the non-durable service
queue vanishes with everything in it. The pool must reconnect and declare the
queue again by itself (same worker processes, no restart), and the clients,
through their reconnect and resend, must get every answer. The recovery time
(from ``start_app`` returning to a fresh client's first answer) must be under
15 s.

CAUTION: this restarts the shared broker's app; every other connection to it
drops too. The app is started again in a ``finally``, and the test waits for
the broker to answer before it ends.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import threading
import time
import uuid

import gmpy2
import pika
import pytest
from _client_helpers import close_broker_connection
from _fault_helpers import (
    URL,
    Pool,
    broker_await_startup,
    consumers,
    delete_queue,
    queue_depth,
    unique,
    wait_until,
)

from fastfib import FibonacciRpcClient
from fastfib.aio import AsyncFibonacciRpcClient
from fastfib.errors import RpcError

pytestmark = [pytest.mark.broker, pytest.mark.slow]

WORKERS = 2
RECOVERY_TARGET = 15.0


def _ctl(*args: str) -> None:
    out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"rabbitmqctl {' '.join(args)}: {out.stderr or out.stdout}"


def _ns(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(0, 2000) for _ in range(count)]


def _blocking_load(url: str, queue: str, stop: threading.Event, out: dict) -> None:
    """call_many in batches of 250 until ``stop``; every value checked; out["blocking"] = calls or the exception."""
    rng, calls = random.Random(1), 0
    try:
        with FibonacciRpcClient(url, queue, timeout=60) as client:
            while not stop.is_set():
                ns = _ns(rng, 250)
                assert client.call_many(ns, window=32) == [int(gmpy2.fib(n)) for n in ns]
                calls += len(ns)
        out["blocking"] = calls
    except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
        out["blocking"] = exc


def _aio_load(url: str, queue: str, stop: threading.Event, out: dict) -> None:
    """100 concurrent calls at a time until ``stop``; every value checked; out["aio"] = calls or the exception."""
    async def run() -> int:
        rng, calls = random.Random(2), 0
        async with AsyncFibonacciRpcClient(url, queue, timeout=60) as client:
            while not stop.is_set():
                ns = _ns(rng, 100)
                assert await asyncio.gather(*(client.call(n) for n in ns)) == [int(gmpy2.fib(n)) for n in ns]
                calls += len(ns)
        return calls

    try:
        out["aio"] = asyncio.run(run())
    except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
        out["aio"] = exc


def _result(value) -> int:
    if isinstance(value, BaseException):
        raise value
    return value


@pytest.mark.timeout(400)
def test_broker_restart_under_load_loses_nothing_and_recovers_within_15_s(broker_url):
    queue = unique("restart")
    stop = threading.Event()
    out: dict = {}
    try:
        with Pool(queue, workers=WORKERS) as pool:
            pool.wait_ready()
            workers = sorted(pool.worker_pids())
            loads = [threading.Thread(target=_blocking_load, args=(broker_url, queue, stop, out), daemon=True),
                     threading.Thread(target=_aio_load, args=(broker_url, queue, stop, out), daemon=True)]
            for thread in loads:
                thread.start()
            time.sleep(1.0)
            assert all(t.is_alive() for t in loads), f"a load failed before the restart: {out}"
            stopped_at = time.monotonic()
            try:
                _ctl("stop_app")
                down_for = time.monotonic() - stopped_at
                time.sleep(1.0)
            finally:
                _ctl("start_app")
                back_at = time.monotonic()
                broker_await_startup()

            # Recovery: the pool consumes again, and a fresh client gets an answer.
            pool.wait_for("workers consuming again", timeout=60)
            pool_back = time.monotonic() - back_at

            def served() -> bool:
                try:
                    with FibonacciRpcClient(broker_url, queue, timeout=1) as client:
                        return client.call(10) == 55
                except RpcError:  # ConnectionLost, Unroutable (queue not declared yet), RpcTimeout
                    return False

            wait_until(served, 60, interval=0.05, what="serving again")
            serving_back = time.monotonic() - back_at

            time.sleep(2.0)  # the load goes on a while on the recovered pool
            stop.set()
            for thread in loads:
                thread.join(120)
                assert not thread.is_alive(), "a client did not finish"
            calls = _result(out["blocking"]) + _result(out["aio"])
            wait_until(lambda: consumers(queue) == WORKERS + 1, 30,  # + worker 0's idle consumer
                       what="both workers on the redeclared queue")
            assert sorted(pool.worker_pids()) == workers, "a worker was restarted: it should have reconnected"
            text = pool.text()
            assert text.count("lost:") >= WORKERS and "reconnecting to" in text
            assert pool.proc.poll() is None
    finally:
        stop.set()
        # Whatever happened: the shared broker's app runs again (start_app is a no-op when it runs).
        subprocess.run(["rabbitmqctl", "-q", "start_app"], capture_output=True, timeout=120, check=False)
        broker_await_startup()
        delete_queue(queue)
    print(f"\nbroker restart: stop_app took {down_for:.1f} s, app down {back_at - stopped_at:.1f} s; "
          f"pool consuming again {pool_back:.1f} s and serving {serving_back:.1f} s after start_app; "
          f"{calls} calls (blocking + asyncio client), every one answered and right")
    assert serving_back < RECOVERY_TARGET, f"serving again only {serving_back:.1f} s after the broker came back"


# --- without restarting the broker: what the restart does to a client, one piece at a time -------------


def _declare(queue: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        connection.channel().queue_declare(queue)
    finally:
        connection.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["blocking", "asyncio"])
def test_a_client_whose_connection_and_queue_vanished_waits_for_the_queue_then_resends(broker_url, kind):
    """The client's connection is closed by the broker while its request waits in a queue that is then
    deleted (as a broker restart does to a non-durable queue); the servers declare it again 2 s later.
    The client reconnects at once, but must not resend into the void (Unroutable): it waits for the
    queue, resends, and gets its answer."""
    queue = unique("vanish")
    name = f"fastfib-test-vanish-{uuid.uuid4().hex}"
    out: dict = {}

    def call() -> None:
        try:
            if kind == "blocking":
                with FibonacciRpcClient(broker_url, queue, timeout=30, connection_name=name) as client:
                    out["value"] = client.call(90)
            else:
                async def run() -> int:
                    async with AsyncFibonacciRpcClient(broker_url, queue, timeout=30, connection_name=name) as client:
                        return await client.call(90)
                out["value"] = asyncio.run(run())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            out["value"] = exc

    _declare(queue)  # no consumer yet: the request waits in it
    try:
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        wait_until(lambda: queue_depth(queue)[0] == 1, 10, what="the request in the queue")
        delete_queue(queue)
        assert close_broker_connection(name) == 1
        time.sleep(2.0)
        assert thread.is_alive(), f"the call ended before the queue came back: {out}"
        with Pool(queue, workers=1) as pool:  # declares the queue again, like a pool after a broker restart
            pool.wait_ready()
            thread.join(30)
        assert not thread.is_alive()
        value = out["value"]
        if isinstance(value, BaseException):
            raise value
        assert value == int(gmpy2.fib(90))
    finally:
        delete_queue(queue)
