"""The blocking client (fastfib.client.FibonacciRpcClient) against the real broker.

Every test has its own queue. Servers are fixtures from _client_helpers: the
tutorial's naive server, a protocol-conformant one, one that replies twice,
one that never replies; the real ``fastfib serve`` is in test_client_server.py.
"""

from __future__ import annotations

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

import fastfib
from fastfib import protocol
from fastfib.client import FibonacciRpcClient
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


def test_exported_from_the_package():
    assert fastfib.FibonacciRpcClient is FibonacciRpcClient


# --- against the tutorial's server ------------------------------------------------------


@pytest.mark.parametrize("reply_queue", ["direct", "exclusive"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_tutorial_server(broker_url, queue, fmt, reply_queue):
    """The tutorial server ignores accept and sends bare decimal text without content_type."""
    with FixtureServer(queue, naive_handler) as server:
        with FibonacciRpcClient(broker_url, queue, format=fmt, reply_queue=reply_queue) as client:
            assert client.call(30) == 832040
            assert client.call(0) == 0
            assert client.call_many(range(100)) == [fib(n) for n in range(100)]
            assert client.call(5000) == fib(5000)  # more than 4300 digits: no int() limit in decoding
    props, body = server.requests[0]
    assert body == b"30"
    # The broker rewrites Direct Reply-to into a per-channel name.
    prefix = protocol.DIRECT_REPLY_TO + "." if reply_queue == "direct" else "amq.gen-"
    assert props.reply_to.startswith(prefix)


# --- against a conformant server ---------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_request_properties(broker_url, queue, fmt):
    with FixtureServer(queue, conformant_handler()) as server:
        with FibonacciRpcClient(broker_url, queue, format=fmt, timeout=7) as client:
            before = time.time()
            assert client.call(10) == 55
            assert client.call(11, timeout=3) == 89
            assert client.call_many([12, 13], timeout=5) == [144, 233]
    accept = {"binary": protocol.CONTENT_BINARY, "decimal": protocol.CONTENT_DECIMAL}[fmt]
    timeouts = [7, 3, 5, 5]
    corr_ids = set()
    for (props, _body), t in zip(server.requests, timeouts, strict=True):
        assert props.headers[protocol.HEADER_ACCEPT] == accept
        assert props.reply_to.startswith(protocol.DIRECT_REPLY_TO + ".")
        deadline = props.headers[protocol.HEADER_DEADLINE]
        assert before * 1000 + t * 1000 - 1000 <= deadline <= time.time() * 1000 + t * 1000
        # expiration = what is left of the timeout at publish time, so deadline - expiration is
        # the (wall-clock) publish time, which lies inside this test's window however slow the machine.
        assert 1 <= int(props.expiration) <= t * 1000
        assert before * 1000 - 5 <= deadline - int(props.expiration) <= time.time() * 1000 + 5
        assert len(props.correlation_id) == 32 and int(props.correlation_id, 16) >= 0  # uuid4 hex
        corr_ids.add(props.correlation_id)
    assert len(corr_ids) == 4
    assert [body for _, body in server.requests] == [b"10", b"11", b"12", b"13"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_n_one_million(broker_url, queue, fmt):
    expected = fib(10**6)
    with FixtureServer(queue, conformant_handler()):
        with FibonacciRpcClient(broker_url, queue, format=fmt) as client:
            assert client.call(10**6, timeout=60) == expected


def test_call_many_order_and_window(broker_url, queue):
    with FixtureServer(queue, conformant_handler(), prefetch=1000):
        with FibonacciRpcClient(broker_url, queue) as client:
            in_flight = []
            publish = client._link.publish

            def counting_publish(*args, **kwargs):
                in_flight.append(len(client._pending))
                return publish(*args, **kwargs)

            client._link.publish = counting_publish
            ns = [(i * 7919) % 3000 for i in range(300)]
            assert client.call_many(ns, window=7) == [fib(n) for n in ns]
            assert max(in_flight) <= 7
            assert client.call_many([]) == []
            assert client.call_many(iter([3, 4])) == [2, 3]
            assert client.call_many(range(5), window=1) == [0, 1, 1, 2, 3]


@pytest.mark.parametrize("bad", [1.0, "3", b"3", None, True, False, 3 + 0j])
def test_non_integer_rejected_before_sending(broker_url, queue, bad):
    with FixtureServer(queue, conformant_handler()) as server:
        with FibonacciRpcClient(broker_url, queue) as client:
            with pytest.raises(TypeError):
                client.call(bad)
            with pytest.raises(TypeError):
                client.call_many([1, 2, bad])
            assert client.call(1) == 1
    assert [body for _, body in server.requests] == [b"1"]  # nothing of the bad batch was sent


def test_index_objects_accepted_like_the_kernel(broker_url, queue):
    """Like fastfib.fib: objects with __index__ (gmpy2.mpz, numpy ints) are integers too."""
    import gmpy2

    with FixtureServer(queue, conformant_handler()) as server:
        with FibonacciRpcClient(broker_url, queue) as client:
            assert client.call(gmpy2.mpz(10)) == 55
            assert client.call_many([gmpy2.mpz(11), 12]) == [89, 144]
            with pytest.raises(ValueError, match="negative"):
                client.call(gmpy2.mpz(-1))
    assert [body for _, body in server.requests] == [b"10", b"11", b"12"]


def test_negative_and_oversized_rejected_before_sending(broker_url, queue):
    with FixtureServer(queue, conformant_handler()) as server:
        with FibonacciRpcClient(broker_url, queue) as client:
            with pytest.raises(ValueError, match="negative"):
                client.call(-1)
            with pytest.raises(ValueError, match="negative"):
                client.call_many([0, 1, -5])
            with pytest.raises(ValueError, match="64 digits"):
                client.call(10**64)
            with pytest.raises(ValueError):
                client.call(1, timeout=0)
            with pytest.raises(ValueError):
                client.call(1, timeout=-1)
            with pytest.raises(ValueError):
                client.call_many([1], window=0)
            assert client.call(2) == 1
    assert [body for _, body in server.requests] == [b"2"]


def test_bad_constructor_arguments(broker_url, queue):
    with pytest.raises(ValueError):
        FibonacciRpcClient(broker_url, queue, format="hex")
    with pytest.raises(ValueError):
        FibonacciRpcClient(broker_url, queue, reply_queue="shared")
    with pytest.raises(ValueError):
        FibonacciRpcClient(broker_url, queue, timeout=0)


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", sorted(ERROR_KINDS_BY_N))
def test_each_remote_error_kind(broker_url, queue, n):
    kind = ERROR_KINDS_BY_N[n]
    expected = ERROR_CLASS_BY_KIND.get(kind, RemoteError)
    with FixtureServer(queue, error_kinds_handler):
        with FibonacciRpcClient(broker_url, queue) as client:
            with pytest.raises(expected) as info:
                client.call(n)
            assert type(info.value) is expected
            assert info.value.kind == kind
            assert info.value.message == f"fixture error {kind} for n={n}"
            assert isinstance(info.value, RpcError)
            # The client is still usable after a remote error.
            assert client.call(10) == 55


def test_remote_errors_are_value_errors_where_it_helps(broker_url, queue):
    with FixtureServer(queue, conformant_handler(max_n=100)):
        with FibonacciRpcClient(broker_url, queue) as client:
            with pytest.raises(ValueError, match="at most 100"):
                client.call(101)


def test_call_many_errors(broker_url, queue):
    with FixtureServer(queue, conformant_handler()):
        with FibonacciRpcClient(broker_url, queue) as client:
            with pytest.raises(InternalServerError):
                client.call_many([1, INTERNAL_ERROR_N, 3])
            results = client.call_many([1, INTERNAL_ERROR_N, 3, 2_000_000], return_exceptions=True)
            assert results[0] == 1 and results[2] == 2
            assert isinstance(results[1], InternalServerError)
            assert isinstance(results[3], OutOfRange)
            # The abandoned replies of the failed batch do not leak into the next one.
            assert client.call_many(range(20)) == [fib(n) for n in range(20)]


def test_unroutable_raised_at_once(broker_url, queue):
    # `queue` was never declared: the mandatory publish comes back with NO_ROUTE.
    # "At once": Unroutable, not the RpcTimeout that waiting out the 20 s timeout would raise.
    with FibonacciRpcClient(broker_url, queue, timeout=20) as client:
        with pytest.raises(Unroutable, match=queue):
            client.call(5)
        with pytest.raises(Unroutable):
            client.call_many(range(10))
        results = client.call_many([1, 2], return_exceptions=True)
        assert all(isinstance(r, Unroutable) for r in results)
        # Once the queue exists, the same client works.
        with FixtureServer(queue, conformant_handler()):
            assert client.call(7) == 13


def test_timeout_without_consumer_and_the_request_expires(broker_url, queue):
    declare(queue)
    with FibonacciRpcClient(broker_url, queue) as client:
        outcome = {}

        def call():
            start = time.monotonic()
            try:
                client.call(5, timeout=2.0)
            except BaseException as exc:
                outcome["error"] = exc
            outcome["elapsed"] = time.monotonic() - start

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.7)
        assert queue_counts(queue) == (1, 0)  # the request waits in the queue...
        thread.join(10)
        error = outcome["error"]
        assert isinstance(error, RpcTimeout) and isinstance(error, TimeoutError)
        assert "no consumer" in str(error)
        assert outcome["elapsed"] >= 2.0  # not before its timeout (load can only lengthen it)
        # ...and expires from it (expiration = the timeout): nobody computes it late.
        end = time.monotonic() + 5
        while queue_counts(queue)[0] and time.monotonic() < end:
            time.sleep(0.1)
        assert queue_counts(queue) == (0, 0)


def test_timeout_with_a_slow_consumer_then_late_reply_dropped(broker_url, queue):
    server = FixtureServer(queue, conformant_handler(), delay=1.5)
    with server:
        with FibonacciRpcClient(broker_url, queue) as client:
            with pytest.raises(RpcTimeout) as info:
                client.call(10, timeout=0.5)
            assert "1 consumer" in str(info.value)
            assert "no consumer" not in str(info.value)
            # The late reply to 10 arrives during this call and is dropped, not taken for F(11).
            server.delay = 0
            assert client.call(11, timeout=10) == 89
            assert client.call_many([12, 13], timeout=10) == [144, 233]


def test_timeout_of_call_many_counts_unanswered(broker_url, queue):
    with FixtureServer(queue, silent_handler):
        with FibonacciRpcClient(broker_url, queue) as client:
            with pytest.raises(RpcTimeout, match="3 of 3 requests unanswered"):
                client.call_many([1, 2, 3], timeout=0.5)


def test_duplicate_replies_dropped(broker_url, queue):
    with FixtureServer(queue, twice_handler()) as server:
        with FibonacciRpcClient(broker_url, queue) as client:
            for n in range(30):
                assert client.call(n) == fib(n)
            assert client.call_many(range(200)) == [fib(n) for n in range(200)]
            assert client.call(1000) == fib(1000)
    assert server.replies_sent == 2 * len(server.requests)


# --- connections -------------------------------------------------------------------------


def test_connection_closed_by_broker_mid_call(broker_url, queue):
    """rabbitmqctl close_connection on this client's connection: it reconnects and resends."""
    name = unique_name()
    with FixtureServer(queue, drop_first_handler(conformant_handler())) as server:
        with FibonacciRpcClient(broker_url, queue, connection_name=name, timeout=30) as client:
            closer = threading.Thread(target=close_when_received, args=(server, 1, name))
            closer.start()
            assert client.call(30) == 832040  # within its 30 s timeout, or it would raise RpcTimeout
            closer.join()
            first, second = server.requests
            assert first[0].correlation_id == second[0].correlation_id
            assert first[0].headers[protocol.HEADER_DEADLINE] == second[0].headers[protocol.HEADER_DEADLINE]
            assert int(second[0].expiration) < int(first[0].expiration)
            server.handler = conformant_handler()
            assert client.call(31) == 1346269  # the new connection serves further calls


def test_connection_closed_by_broker_mid_call_many(broker_url, queue):
    name = unique_name()
    with FixtureServer(queue, drop_first_handler(conformant_handler()), prefetch=1000) as server:
        with FibonacciRpcClient(broker_url, queue, connection_name=name, timeout=30) as client:
            closer = threading.Thread(target=close_when_received, args=(server, 20, name))
            closer.start()
            assert client.call_many(range(20), window=64) == [fib(n) for n in range(20)]
            closer.join()
    assert len(server.requests) == 40


def test_idle_connection_lost_is_restored_on_next_call(broker_url, queue):
    name = unique_name()
    with FixtureServer(queue, conformant_handler()):
        with FibonacciRpcClient(broker_url, queue, connection_name=name) as client:
            assert client.call(3) == 2
            assert close_broker_connection(name) == 1
            time.sleep(0.3)
            assert client.call(4) == 3


def test_connection_lost_and_not_restored_within_timeout(queue):
    with FixtureServer(queue, drop_first_handler(conformant_handler())) as server:
        proxy = TcpProxy().start()
        client = FibonacciRpcClient(proxy.url, queue)
        try:
            outcome = {}

            def cut_when_received():
                while not server.requests:
                    time.sleep(0.01)
                proxy.stop()  # the broker is gone, and stays gone

            threading.Thread(target=cut_when_received).start()
            start = time.monotonic()
            with pytest.raises(ConnectionLost) as info:
                client.call(5, timeout=2)
            outcome["elapsed"] = time.monotonic() - start
            assert isinstance(info.value, ConnectionError)
            assert outcome["elapsed"] > 1.9  # it kept trying to reconnect until the timeout
            # The broker comes back: the same client recovers on the next call.
            proxy = TcpProxy(port=proxy.port).start()
            server.handler = conformant_handler()
            assert client.call(6, timeout=10) == 8
        finally:
            client.close()
            proxy.stop()


def test_broker_briefly_unreachable_call_still_succeeds(queue):
    with FixtureServer(queue, drop_first_handler(conformant_handler())) as server:
        proxy = TcpProxy().start()
        try:
            with FibonacciRpcClient(proxy.url, queue) as client:

                def bounce():
                    while not server.requests:
                        time.sleep(0.01)
                    proxy.stop()
                    time.sleep(1.0)
                    proxy.start()

                threading.Thread(target=bounce).start()
                start = time.monotonic()
                assert client.call(20, timeout=10) == 6765
                assert time.monotonic() - start >= 1.0  # the call spanned the outage
                assert len(server.requests) == 2  # answered on the resend over the new connection
        finally:
            proxy.stop()


def test_refused_credentials_fail_fast(broker_url, queue):
    # "Fast": refused credentials are not retried; the proxy counts the connection attempts.
    with TcpProxy() as proxy:
        url = proxy.url.replace("guest:guest@", "guest:wrong-password@")
        with pytest.raises(ConnectionLost, match="refused"):
            FibonacciRpcClient(url, queue, timeout=30)
        assert proxy.accepted == 1


def test_unreachable_broker(queue):
    with TcpProxy() as proxy:
        url = proxy.url
    with pytest.raises(ConnectionLost):
        FibonacciRpcClient(url, queue)


def test_closed_client(broker_url, queue):
    client = FibonacciRpcClient(broker_url, queue)
    assert client.is_open
    client.close()
    client.close()
    assert not client.is_open
    with pytest.raises(RpcError, match="closed"):
        client.call(1)


def test_connection_name_is_visible_to_the_broker(broker_url, queue):
    name = unique_name()
    with FibonacciRpcClient(broker_url, queue, connection_name=name) as client:
        assert client.connection_name == name
        assert close_broker_connection(name) == 1


# --- threads -----------------------------------------------------------------------------


def test_shared_between_threads(broker_url, queue):
    with FixtureServer(queue, conformant_handler()):
        with FibonacciRpcClient(broker_url, queue) as client:
            errors = []
            results = {}

            def work(k):
                try:
                    for i in range(40):
                        n = k * 100 + i
                        results[n] = client.call(n)
                    results[("many", k)] = client.call_many(range(k, k + 10))
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors
            for k in range(8):
                for i in range(40):
                    assert results[k * 100 + i] == fib(k * 100 + i)
                assert results[("many", k)] == [fib(n) for n in range(k, k + 10)]
