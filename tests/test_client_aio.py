"""The asyncio client (fastfib.aio.AsyncFibonacciRpcClient) against the real broker.

No pytest-asyncio: each test runs its coroutine with asyncio.run.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from _client_helpers import (
    ERROR_CLASS_BY_KIND,
    ERROR_KINDS_BY_N,
    INTERNAL_ERROR_N,
    FixtureServer,
    close_broker_connection,
    close_when_received,
    conformant_handler,
    declare,
    drop_first_handler,
    error_kinds_handler,
    fib,
    naive_handler,
    queue_counts,
    silent_handler,
    twice_handler,
    unique_name,
)
from _net import TcpProxy

from fastfib import protocol
from fastfib.aio import AsyncFibonacciRpcClient
from fastfib.errors import (
    ConnectionLost,
    InternalServerError,
    OutOfRange,
    RemoteError,
    RpcError,
    RpcTimeout,
    Unroutable,
)

pytestmark = pytest.mark.broker

FORMATS = ["binary", "decimal"]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.mark.parametrize("reply_queue", ["direct", "exclusive"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_tutorial_server(broker_url, queue, fmt, reply_queue):
    async def main():
        async with AsyncFibonacciRpcClient(broker_url, queue, format=fmt, reply_queue=reply_queue) as client:
            assert await client.call(30) == 832040
            assert await client.call(0) == 0
            assert await asyncio.gather(*(client.call(n) for n in range(100))) == [fib(n) for n in range(100)]
            assert await client.call_many(range(50), window=8) == [fib(n) for n in range(50)]
            assert await client.call(5000) == fib(5000)

    with FixtureServer(queue, naive_handler):
        run(main())


@pytest.mark.parametrize("fmt", FORMATS)
def test_request_properties(broker_url, queue, fmt):
    async def main():
        async with AsyncFibonacciRpcClient(broker_url, queue, format=fmt, timeout=7) as client:
            assert await client.call(10) == 55
            assert await client.call(11, timeout=3) == 89

    with FixtureServer(queue, conformant_handler()) as server:
        before = time.time()
        run(main())
    accept = {"binary": protocol.CONTENT_BINARY, "decimal": protocol.CONTENT_DECIMAL}[fmt]
    for (props, _body), t in zip(server.requests, [7, 3], strict=True):
        assert props.headers[protocol.HEADER_ACCEPT] == accept
        deadline = props.headers[protocol.HEADER_DEADLINE]
        assert before * 1000 + t * 1000 - 1000 <= deadline <= (time.time() + t) * 1000
        # expiration = what is left of the timeout at publish time, so deadline - expiration is
        # the (wall-clock) publish time, which lies inside this test's window however slow the machine.
        assert 1 <= int(props.expiration) <= t * 1000
        assert before * 1000 - 5 <= deadline - int(props.expiration) <= time.time() * 1000 + 5
        assert len(props.correlation_id) == 32
    assert [body for _, body in server.requests] == [b"10", b"11"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_n_one_million(broker_url, queue, fmt):
    async def main():
        async with AsyncFibonacciRpcClient(broker_url, queue, format=fmt) as client:
            return await client.call(10**6, timeout=60)

    with FixtureServer(queue, conformant_handler()):
        assert run(main()) == fib(10**6)


def test_1000_concurrent_calls(broker_url, queue):
    name = unique_name()

    async def main():
        async with AsyncFibonacciRpcClient(broker_url, queue, connection_name=name) as client:
            ns = [(i * 37) % 1500 for i in range(1000)]
            results = await asyncio.gather(*(client.call(n, timeout=60) for n in ns))
            assert results == [fib(n) for n in ns]
            assert not client._pending
            assert client._generation == 1  # all of it over the one connection

    with FixtureServer(queue, conformant_handler(), prefetch=1000) as server:
        run(main())
    assert len(server.requests) == 1000


def test_validation(broker_url, queue):
    async def main():
        async with AsyncFibonacciRpcClient(broker_url, queue) as client:
            for bad in (1.0, "3", None, True):
                with pytest.raises(TypeError):
                    await client.call(bad)
                with pytest.raises(TypeError):
                    await client.call_many([1, bad])
            with pytest.raises(ValueError, match="negative"):
                await client.call(-3)
            with pytest.raises(ValueError):
                await client.call(1, timeout=0)
            with pytest.raises(ValueError):
                await client.call_many([1], window=0)
            assert await client.call(1) == 1

    with FixtureServer(queue, conformant_handler()) as server:
        run(main())
    assert [body for _, body in server.requests] == [b"1"]


@pytest.mark.parametrize("n", sorted(ERROR_KINDS_BY_N))
def test_each_remote_error_kind(broker_url, queue, n):
    kind = ERROR_KINDS_BY_N[n]
    expected = ERROR_CLASS_BY_KIND.get(kind, RemoteError)

    async def main():
        async with AsyncFibonacciRpcClient(broker_url, queue) as client:
            with pytest.raises(expected) as info:
                await client.call(n)
            assert type(info.value) is expected
            assert info.value.kind == kind
            assert info.value.message == f"fixture error {kind} for n={n}"
            assert await client.call(10) == 55

    with FixtureServer(queue, error_kinds_handler):
        run(main())


def test_call_many_errors(broker_url, queue):
    async def main():
        async with AsyncFibonacciRpcClient(broker_url, queue) as client:
            with pytest.raises(InternalServerError):
                await client.call_many([1, INTERNAL_ERROR_N, 3])
            results = await client.call_many([1, INTERNAL_ERROR_N, 3, 2_000_000], return_exceptions=True)
            assert results[0] == 1 and results[2] == 2
            assert isinstance(results[1], InternalServerError)
            assert isinstance(results[3], OutOfRange)
            assert await client.call_many(range(20)) == [fib(n) for n in range(20)]

    with FixtureServer(queue, conformant_handler()):
        run(main())


def test_unroutable_raised_at_once(broker_url, queue):
    async def main():
        # "At once": Unroutable, not the RpcTimeout that waiting out the 20 s timeout would raise.
        async with AsyncFibonacciRpcClient(broker_url, queue, timeout=20) as client:
            with pytest.raises(Unroutable, match=queue):
                await client.call(5)
            results = await asyncio.gather(*(client.call(n) for n in range(50)), return_exceptions=True)
            assert all(isinstance(r, Unroutable) for r in results)

    run(main())


def test_timeout_without_consumer_and_the_request_expires(broker_url, queue):
    declare(queue)

    async def main():
        async with AsyncFibonacciRpcClient(broker_url, queue) as client:
            start = time.monotonic()
            call = asyncio.ensure_future(client.call(5, timeout=2.0))
            await asyncio.sleep(0.7)
            assert await asyncio.to_thread(queue_counts, queue) == (1, 0)
            with pytest.raises(RpcTimeout, match="no consumer") as info:
                await call
            assert isinstance(info.value, TimeoutError)
            assert time.monotonic() - start >= 2.0  # not before its timeout (load can only lengthen it)

    run(main())
    end = time.monotonic() + 5
    while queue_counts(queue)[0] and time.monotonic() < end:
        time.sleep(0.1)
    assert queue_counts(queue) == (0, 0)


def test_many_concurrent_timeouts(broker_url, queue):
    async def main():
        async with AsyncFibonacciRpcClient(broker_url, queue) as client:
            calls = [asyncio.ensure_future(client.call(n, timeout=0.5)) for n in range(200)]
            # The 200 calls wait side by side, each with its own timer: all are in flight at once
            # (calls made one after the other would have one in flight at a time).
            for _ in range(100):
                await asyncio.sleep(0)
                if len(client._pending) == len(calls):
                    break
            assert len(client._pending) == len(calls)
            assert not any(c.done() for c in calls)
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, RpcTimeout) and "1 consumer" in str(r) for r in results)
            assert not client._pending

    with FixtureServer(queue, silent_handler):
        run(main())


def test_late_reply_dropped(broker_url, queue):
    server = FixtureServer(queue, conformant_handler(), delay=1.5)

    async def main():
        async with AsyncFibonacciRpcClient(broker_url, queue) as client:
            with pytest.raises(RpcTimeout):
                await client.call(10, timeout=0.5)
            server.delay = 0
            assert await client.call(11, timeout=10) == 89

    with server:
        run(main())


def test_duplicate_replies_dropped(broker_url, queue):
    async def main():
        async with AsyncFibonacciRpcClient(broker_url, queue) as client:
            for n in range(20):
                assert await client.call(n) == fib(n)
            assert await asyncio.gather(*(client.call(n) for n in range(300))) == [fib(n) for n in range(300)]

    with FixtureServer(queue, twice_handler(), prefetch=500) as server:
        run(main())
    assert server.replies_sent == 2 * len(server.requests)


def test_connection_closed_by_broker_mid_call(broker_url, queue):
    """100 calls in flight when rabbitmqctl closes the connection: all are resent and answered."""
    name = unique_name()

    async def main(server):
        async with AsyncFibonacciRpcClient(broker_url, queue, connection_name=name, timeout=30) as client:
            closer = asyncio.ensure_future(asyncio.to_thread(close_when_received, server, 100, name))
            results = await asyncio.gather(*(client.call(n) for n in range(100)))
            await closer
            assert results == [fib(n) for n in range(100)]
            assert client._generation == 2
            server.handler = conformant_handler()
            assert await client.call(31) == 1346269

    with FixtureServer(queue, drop_first_handler(conformant_handler()), prefetch=1000) as server:
        run(main(server))
    assert len(server.requests) == 201


def test_idle_connection_lost_is_restored_on_next_call(broker_url, queue):
    name = unique_name()

    async def main():
        async with AsyncFibonacciRpcClient(broker_url, queue, connection_name=name) as client:
            assert await client.call(3) == 2
            assert await asyncio.to_thread(close_broker_connection, name) == 1
            await asyncio.sleep(0.3)
            assert not client.is_open
            assert await client.call(4) == 3

    with FixtureServer(queue, conformant_handler()):
        run(main())


def test_connection_lost_and_not_restored_within_timeout(queue):
    async def main(server, proxy):
        async with AsyncFibonacciRpcClient(proxy.url, queue) as client:

            def cut_when_received():
                while len(server.requests) < 10:
                    time.sleep(0.01)
                proxy.stop()

            threading.Thread(target=cut_when_received).start()
            start = time.monotonic()
            results = await asyncio.gather(*(client.call(n, timeout=2) for n in range(10)), return_exceptions=True)
            assert all(isinstance(r, ConnectionLost) for r in results), results
            assert time.monotonic() - start > 1.9  # they kept trying to reconnect until the timeout
            # The broker comes back: the same client recovers on the next call.
            proxy.start()
            server.handler = conformant_handler()
            assert await client.call(6, timeout=10) == 8

    with FixtureServer(queue, drop_first_handler(conformant_handler())) as server:
        proxy = TcpProxy().start()
        try:
            run(main(server, proxy))
        finally:
            proxy.stop()


def test_refused_credentials_fail_fast(broker_url, queue):
    # "Fast": refused credentials are not retried; the proxy counts the connection attempts.
    async def main(proxy):
        url = proxy.url.replace("guest:guest@", "guest:wrong-password@")
        with pytest.raises(ConnectionLost, match="refused"):
            async with AsyncFibonacciRpcClient(url, queue, timeout=30):
                pass
        assert proxy.accepted == 1
        # A call on a client that never connected connects first, and is not retried either.
        client = AsyncFibonacciRpcClient(url, queue, timeout=30)
        with pytest.raises(ConnectionLost, match="refused"):
            await client.call(1)
        await client.close()
        assert proxy.accepted == 2

    with TcpProxy() as proxy:
        run(main(proxy))


def test_unreachable_broker(queue):
    with TcpProxy() as proxy:
        url = proxy.url

    async def main():
        with pytest.raises(ConnectionLost):
            await AsyncFibonacciRpcClient(url, queue).connect()
        client = AsyncFibonacciRpcClient(url, queue)
        with pytest.raises(ConnectionLost):  # within its timeout: RpcTimeout is not raised instead
            await client.call(1, timeout=1)
        await client.close()

    run(main())


def test_call_connects_lazily(broker_url, queue):
    async def main():
        client = AsyncFibonacciRpcClient(broker_url, queue)
        try:
            assert await asyncio.gather(*(client.call(n) for n in range(10))) == [fib(n) for n in range(10)]
        finally:
            await client.close()

    with FixtureServer(queue, conformant_handler()):
        run(main())


def test_close_fails_calls_in_flight(broker_url, queue):
    async def main():
        client = AsyncFibonacciRpcClient(broker_url, queue)
        await client.connect()
        calls = [asyncio.ensure_future(client.call(n, timeout=30)) for n in range(5)]
        await asyncio.sleep(0.2)
        await client.close()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, RpcError) and "closed" in str(r) for r in results)
        with pytest.raises(RpcError, match="closed"):
            await client.call(1)

    with FixtureServer(queue, silent_handler):
        run(main())


def test_other_event_loop_refused(broker_url, queue):
    client = AsyncFibonacciRpcClient(broker_url, queue)

    async def first():
        await client.connect()

    async def second():
        with pytest.raises(RuntimeError, match="another event loop"):
            await client.call(1)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(first())
        asyncio.run(second())
        loop.run_until_complete(client.close())
    finally:
        loop.close()
