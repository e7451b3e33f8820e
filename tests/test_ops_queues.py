"""Queues for deployments that own them, against the local broker: a durable classic queue, and a
quorum queue with a dead-letter exchange and a delivery limit that quarantines a poison request.

The poison request stands for one that kills the worker computing it (the OOM killer on a huge n,
a crash): the test kills the worker with -9 each time the request reaches it. fastfib never
acknowledges what it has not answered, so the request comes back after each death; on a classic
queue it would come back forever, killing a worker each time. With ``x-delivery-limit`` the quorum
queue dead-letters it once the limit is spent.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pika
import pytest
from _ops_helpers import ServePool, queue_row
from _server_helpers import URL, RpcClient, queue_depth

pytestmark = [pytest.mark.broker]


@pytest.mark.timeout(60)
def test_durable_classic_queue(queue):
    with ServePool.on(queue, "--queue-durable", workers=1) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        assert "queue declared as durable classic" in pool.text()
        assert queue_row(queue)[1:] == ["true", "classic", "[]"]
        assert client.call(b"40")[1] == b"102334155"


@pytest.fixture
def dead_letters(broker_url):
    """A fanout exchange and a queue bound to it, both of this test's own; deleted afterwards."""
    name = f"fastfib-test-dlx-{uuid.uuid4().hex[:12]}"
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    channel.exchange_declare(name, "fanout")
    channel.queue_declare(name)
    channel.queue_bind(name, name)
    yield name, channel, connection
    try:
        channel.queue_delete(name)
        channel.exchange_delete(name)
        connection.close()
    except pika.exceptions.AMQPError:
        connection = pika.BlockingConnection(pika.URLParameters(URL))
        connection.channel().queue_delete(name)
        connection.channel().exchange_delete(name)
        connection.close()


@pytest.mark.timeout(120)
def test_quorum_queue_dead_letters_a_poison_request_after_the_delivery_limit(queue, dead_letters):
    dlx, channel, connection = dead_letters
    limit = 2
    args = ("--queue-type", "quorum", "--dead-letter-exchange", dlx, "--dead-letter-routing-key", "poisoned",
            "--delivery-limit", str(limit), "--max-n", str(3 * 10**8))
    with ServePool.on(queue, *args, workers=1) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        row = queue_row(queue)
        assert row[1:3] == ["true", "quorum"]
        assert f'"x-dead-letter-exchange","{dlx}"' in row[3] and '"x-delivery-limit",2' in row[3], row
        assert '"x-dead-letter-routing-key","poisoned"' in row[3], row

        # F(3*10^8) takes seconds: the worker is still computing it when the test kills it.
        client.publish(b"300000000", correlation_id="poison")
        for delivery in range(1, limit + 2):
            # Delivered (no longer ready) to the worker that consumes now: kill it.
            deadline = time.monotonic() + 20
            while queue_depth(queue)[0] != 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert queue_depth(queue)[0] == 0, f"delivery {delivery} did not happen:\n{pool.text()}"
            (pid,) = pool.worker_pids()
            os.kill(pid, signal.SIGKILL)
            # The supervisor restarts it; wait until the new one consumes.
            pool.wait_for("all 1 workers consuming again", count=delivery, timeout=30)

        dead = None
        deadline = time.monotonic() + 10
        while dead is None and time.monotonic() < deadline:
            method, props, body = channel.basic_get(dlx, auto_ack=True)
            if method is not None:
                dead = (props, body)
                assert method.routing_key == "poisoned"
            else:
                connection.process_data_events(time_limit=0.1)
        assert dead is not None, f"the poison request was not dead-lettered:\n{pool.text()}"
        props, body = dead
        assert body == b"300000000" and props.correlation_id == "poison"
        assert props.headers["x-first-death-reason"] == "delivery_limit"
        assert props.headers["x-death"][0]["queue"] == queue
        assert channel.basic_get(dlx, auto_ack=True)[0] is None  # only the poison request
        assert queue_depth(queue)[0] == 0 and "poison" not in client.replies
        assert pool.text().count("was killed by SIGKILL") == limit + 1

        # The pool serves what comes next; the poison is gone for good.
        cids = client.run([b"50"] * 100, window=16)
        assert all(client.replies[c][0][1] == b"12586269025" for c in cids)
        assert len(pool.worker_pids()) == 1 and pool.text().count("was killed by SIGKILL") == limit + 1
