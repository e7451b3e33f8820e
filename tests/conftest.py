"""Shared test fixtures.

Tests that need RabbitMQ use the ``broker_url`` fixture, which FAILS (never
skips) when 127.0.0.1:5672 does not answer: `make test` and CI start the broker
first, so a missing broker is a real failure.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672
BROKER_URL = os.environ.get("FASTFIB_TEST_URL", f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/%2F")


def pytest_report_header(config):
    import gmpy2

    lines = [f"gmpy2 {gmpy2.version()}, {gmpy2.mp_version()}"]
    try:
        import fastfib

        lines.append(fastfib.kernel_info())
    except ImportError as exc:
        lines.append(f"fastfib kernel NOT importable: {exc}")
    return lines


def broker_answers(host: str = BROKER_HOST, port: int = BROKER_PORT, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def broker_url() -> str:
    """The AMQP URL of the test broker; fails the test when no broker answers."""
    if not broker_answers():
        pytest.fail(
            f"RabbitMQ does not answer on {BROKER_HOST}:{BROKER_PORT}; start it (`make broker` or "
            "`rabbitmq-server -detached`). Broker tests fail rather than skip.",
            pytrace=False,
        )
    return BROKER_URL


@pytest.fixture
def queue_name() -> str:
    """A queue name of this test's own, so that concurrent tests never share a queue."""
    return f"fastfib-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def queue(broker_url, queue_name):
    """``queue_name`` for a test on the broker; the queue, if the test made one, is deleted afterwards."""
    from _server_helpers import delete_queue  # pika: imported only by the tests that use a broker

    yield queue_name
    delete_queue(queue_name, broker_url)


@pytest.fixture(scope="session")
def broker_properties(broker_url) -> dict:
    """The test broker's server properties (product, version, ...), read from a real connection.

    Version-specific tests select themselves with it (``pytest.skip`` only for a version that
    does not have the behaviour they test); a missing broker still FAILS, through ``broker_url``.
    """
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        return dict(connection._impl.server_properties)
    finally:
        connection.close()


@pytest.fixture
def broker_has_541_crash(broker_properties):
    """For tests of the Direct Reply-to 541 crash (RabbitMQ before 3.9.26, 3.10.12, 3.11.4, 3.12.0)."""
    from fastfib.server.reply_guard import broker_version, needs_probe

    if not needs_probe(broker_properties):
        pytest.skip(f"RabbitMQ {broker_version(broker_properties)} does not have the Direct Reply-to 541 crash "
                    "(fixed in 3.9.26, 3.10.12, 3.11.4, 3.12.0)")


@pytest.fixture
def broker_takes_128_mib(broker_properties):
    """For tests that send messages above 16 MiB: RabbitMQ 3.x's default max_message_size is 128 MiB, 4.x's 16 MiB."""
    from fastfib.server.reply_guard import broker_version

    version = broker_version(broker_properties)
    if version is None or version >= (4, 0, 0):
        pytest.skip(f"RabbitMQ {version}: the default max_message_size is 16 MiB from 4.0 (128 MiB on 3.x)")
