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
