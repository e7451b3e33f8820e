"""The clients' fast wire (fastfib.pika_seam.ClientWire, AsyncioCoalescingConnection): its self-check
against the installed pika, the check noticing a pika that changed, and the clients on pika's public
API when the check fails (against the real broker)."""

from __future__ import annotations

import asyncio
import logging

import pika.adapters.base_connection
import pika.adapters.blocking_connection
import pika.connection
import pytest
from _client_helpers import FixtureServer, conformant_handler, fib, unique_queue

from fastfib import pika_seam, rpc_base
from fastfib.aio import AsyncFibonacciRpcClient
from fastfib.client import FibonacciRpcClient
from fastfib.errors import Unroutable


def test_the_client_self_check_passes_on_the_installed_pika():
    assert pika_seam.client_self_check() is None


def _bypass_input(monkeypatch):
    """pika's transport stops calling Connection._on_data_available."""
    monkeypatch.setattr(pika.adapters.base_connection.BaseConnection, "_proto_data_received",
                        lambda self, data: pika.connection.Connection._on_data_available(self, data))


def _ignore_impl_class(monkeypatch):
    """BlockingConnection no longer honours _impl_class."""
    create = pika.adapters.blocking_connection.BlockingConnection._create_connection
    monkeypatch.setattr(pika.adapters.blocking_connection.BlockingConnection, "_create_connection",
                        lambda self, configs, impl_class=None: create(self, configs, None))


def _renamed_dispatch_state(monkeypatch):
    """BlockingConnection keeps its pending channel dispatches under another name."""
    init = pika.adapters.blocking_connection.BlockingConnection.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        del self._channels_pending_dispatch

    monkeypatch.setattr(pika.adapters.blocking_connection.BlockingConnection, "__init__", patched)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("break_pika", [_bypass_input, _ignore_impl_class, _renamed_dispatch_state])
def test_the_client_self_check_notices_a_pika_that_changed(monkeypatch, break_pika):
    break_pika(monkeypatch)
    problem = pika_seam.client_self_check()
    assert problem is not None and problem.strip()


@pytest.mark.timeout(120)
def test_both_clients_run_on_the_fast_wire(broker_url, queue):
    """The check passes wherever a client first connects: in a thread, or inside a running event loop."""
    rpc_base.fast_wire_works.cache_clear()

    async def main():
        async with AsyncFibonacciRpcClient(broker_url, queue, timeout=30) as client:
            assert type(client._conn) is pika_seam.AsyncioCoalescingConnection and client._encoder is not None
            assert await client.call_many(range(300)) == [fib(n) for n in range(300)]

    with FixtureServer(queue, conformant_handler(), prefetch=100):
        asyncio.run(asyncio.wait_for(main(), 100))
        assert rpc_base.fast_wire_works()
        with FibonacciRpcClient(broker_url, queue, timeout=30) as client:
            assert type(client._conn._impl) is pika_seam.CoalescingConnection
            assert type(client._link) is pika_seam.ClientWire
            assert client.call_many(range(300)) == [fib(n) for n in range(300)]


@pytest.fixture
def public_api_only(monkeypatch, caplog):
    """The clients as they run when the seam's check fails."""
    monkeypatch.setattr(pika_seam, "client_self_check", lambda: "a pika that changed (simulated)")
    rpc_base.fast_wire_works.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fastfib"):
        yield caplog
    rpc_base.fast_wire_works.cache_clear()


def _one_warning(caplog) -> None:
    warnings = [r for r in caplog.records if "fast wire does not work" in r.getMessage()]
    assert len(warnings) == 1 and "public API" in warnings[0].getMessage()


@pytest.mark.timeout(120)
def test_a_failed_check_means_one_warning_and_the_public_api_blocking(broker_url, queue, public_api_only):
    with FixtureServer(queue, conformant_handler(), prefetch=100) as server:
        with FibonacciRpcClient(broker_url, queue, timeout=30) as client:
            assert type(client._conn._impl) is pika.SelectConnection  # not the seam's class
            assert client.call(20) == 6765
            ns = [(i * 7919) % 2000 for i in range(200)]
            assert client.call_many(ns, window=16) == [fib(n) for n in ns]
        with FibonacciRpcClient(broker_url, unique_queue("missing"), timeout=5) as client:
            with pytest.raises(Unroutable):
                client.call(3)
        with FibonacciRpcClient(broker_url, queue, timeout=30, format="decimal") as client:
            assert client.call(300) == fib(300)
    assert len(server.requests) >= 202
    _one_warning(public_api_only)


@pytest.mark.timeout(120)
def test_a_failed_check_means_one_warning_and_the_public_api_asyncio(broker_url, queue, public_api_only):
    async def main():
        async with AsyncFibonacciRpcClient(broker_url, queue, timeout=30) as client:
            assert type(client._conn) is pika.adapters.asyncio_connection.AsyncioConnection
            assert client._encoder is None
            ns = [(i * 7919) % 2000 for i in range(200)]
            assert await client.call_many(ns) == [fib(n) for n in ns]
        async with AsyncFibonacciRpcClient(broker_url, unique_queue("missing"), timeout=5) as client:
            with pytest.raises(Unroutable):
                await client.call(3)

    with FixtureServer(queue, conformant_handler(), prefetch=100):
        asyncio.run(asyncio.wait_for(main(), 100))
    _one_warning(public_api_only)


def test_fast_acks_at_every_split_and_nacks_through_pika():
    """basic.ack on the confirm channel is decoded by the connection, whole or split over reads;
    basic.nack, and acks on another channel, still reach pika's callbacks."""
    from pika import frame, spec

    loop = pika_seam.Loopback()
    try:
        loop.handshake()
        conn = loop.connection
        conn.server_capabilities.update(publisher_confirms=True, **{"basic.nack": True})  # as a broker says
        opened: list = []
        conn.channel(channel_number=1, on_open_callback=opened.append)
        loop.send_method(1, spec.Channel.OpenOk())
        loop.spin(lambda: opened)
        channel = opened[0]
        via_pika: list = []
        selected: list = []
        channel.confirm_delivery(lambda f: via_pika.append((type(f.method).__name__, f.method.delivery_tag)),
                                 callback=selected.append)
        loop.send_method(1, spec.Confirm.SelectOk())
        loop.spin(lambda: selected)
        fast: list = []
        conn.set_fast_acks(1, lambda tag, multiple: fast.append((tag, multiple)))
        data = b"".join(frame.Method(1, spec.Basic.Ack(delivery_tag=tag, multiple=tag % 2 == 0)).marshal()
                        for tag in range(1, 6))
        for split in range(1, len(data)):
            before = len(fast)
            start = conn.bytes_received + len(conn._frame_buffer)
            loop.send(data[:split])
            loop.spin(lambda: conn.bytes_received + len(conn._frame_buffer) == start + split)  # noqa: B023
            loop.send(data[split:])
            loop.spin(lambda: len(fast) == before + 5)  # noqa: B023 - used right here
            assert fast[before:] == [(tag, tag % 2 == 0) for tag in range(1, 6)]
            assert not conn._frame_buffer
        loop.send(frame.Method(1, spec.Basic.Nack(delivery_tag=7)).marshal())
        loop.spin(lambda: via_pika)
        assert via_pika == [("Nack", 7)] and len(fast) == 5 * (len(data) - 1)
    finally:
        loop.close()
