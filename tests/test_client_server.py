"""Both clients against the real server, ``python -m fastfib serve`` (one pool for the module)."""

from __future__ import annotations

import asyncio
import uuid

import pika
import pytest
from _client_helpers import FixtureServer, fib, naive_handler, real_server

from fastfib import protocol
from fastfib.aio import AsyncFibonacciRpcClient
from fastfib.client import FibonacciRpcClient
from fastfib.errors import OutOfRange, UnsupportedFormat

pytestmark = pytest.mark.broker

MAX_N = 1_000_000


@pytest.fixture(scope="module")
def served_queue(broker_url):
    queue = f"fastfib-test-real-{uuid.uuid4().hex[:12]}"
    with real_server(queue, workers=2, max_n=MAX_N):
        yield queue
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    conn.channel().queue_delete(queue)
    conn.close()


@pytest.mark.parametrize("fmt", ["binary", "decimal"])
def test_values(broker_url, served_queue, fmt):
    with FibonacciRpcClient(broker_url, served_queue, format=fmt) as client:
        assert client.call(0) == 0
        assert client.call(93) == 12200160415121876738
        assert client.call(94) == fib(94)
        assert client.call_many(range(300)) == [fib(n) for n in range(300)]


@pytest.mark.parametrize("fmt", ["binary", "decimal"])
def test_n_one_million(broker_url, served_queue, fmt):
    with FibonacciRpcClient(broker_url, served_queue, format=fmt) as client:
        assert client.call(10**6, timeout=60) == fib(10**6)


def test_out_of_range(broker_url, served_queue):
    with FibonacciRpcClient(broker_url, served_queue) as client:
        with pytest.raises(OutOfRange, match=str(MAX_N)) as info:
            client.call(MAX_N + 1)
        assert info.value.kind == protocol.KIND_OUT_OF_RANGE
        assert isinstance(info.value, ValueError)
        with pytest.raises(OutOfRange):
            client.call(10**63)


def test_unsupported_format(broker_url, served_queue):
    with FibonacciRpcClient(broker_url, served_queue) as client:
        # No public way to ask for it: the client only speaks the two formats.
        client._link.prepare(client.queue, client._reply_to, "text/html")
        with pytest.raises(UnsupportedFormat) as info:
            client.call(5)
        assert info.value.kind == protocol.KIND_UNSUPPORTED_FORMAT


def test_asyncio_1000_concurrent(broker_url, served_queue):
    async def main():
        async with AsyncFibonacciRpcClient(broker_url, served_queue) as client:
            ns = [(i * 7919) % 5000 for i in range(1000)]
            assert await asyncio.gather(*(client.call(n, timeout=60) for n in ns)) == [fib(n) for n in ns]
            with pytest.raises(OutOfRange):
                await client.call(MAX_N + 1)

    asyncio.run(main())


@pytest.mark.parametrize("fmt", ["binary", "decimal"])
def test_side_by_side_with_the_tutorial_server(broker_url, served_queue, fmt):
    """A tutorial server and fastfib serve on one queue: each reply is decoded by its own content type.

    The tutorial server declares the queue as the current tutorial's rpc_server.py does (durable, quorum:
    the same as fastfib's default, issue 14); the seed tutorial's transient declaration would get 406 here.
    """
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    conn.channel().queue_declare(queue=served_queue, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    with FixtureServer(served_queue, naive_handler, declare=False) as tutorial:
        with FibonacciRpcClient(broker_url, served_queue, format=fmt) as client:
            assert client.call_many(range(400), window=32) == [fib(n) for n in range(400)]
    assert tutorial.requests  # both servers took part
