"""Issue 14 against real brokers: the reply size limit, a reply the broker refuses, the queue declaration,
and the reply guard under a flood of unheard Direct Reply-to names.

The shared broker (127.0.0.1:5672) serves most of them; the refused-reply test runs its own node with
max_message_size lowered to 1 MiB (tests/_private_broker.py), since the shared broker must not be changed.
"""

from __future__ import annotations

import base64
import json
import os

import pika
import pytest
from _fault_helpers import learn_direct_reply_to
from _private_broker import private_broker
from _server_helpers import URL, Pool, RpcClient, delete_queue

import fastfib
from fastfib import limits
from fastfib.protocol import DEFAULT_MAX_N


def _error(reply):
    props, body = reply
    assert props.content_type == "application/json", (props, body[:200])
    return props.headers["x-error"], json.loads(body)["message"]


@pytest.mark.timeout(60)
def test_a_reply_above_max_reply_bytes_is_out_of_range_before_computing(queue):
    with Pool(queue, "--max-reply-bytes", "1000", workers=1) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        kind, message = _error(client.call(b"5000"))  # 1045 decimal digits
        assert kind == "out_of_range"
        assert "1045 bytes" in message and "1000 bytes" in message and "ask for binary" in message
        props, body = client.call(b"5000", headers={"accept": "application/octet-stream"})  # 434 bytes: fits
        assert body == fastfib.fib_encoded(5000, "binary")
        assert client.call(b"4700")[1] == fastfib.fib_encoded(4700, "decimal")  # 983 digits
        text = pool.text()
        # The default --max-n (10^6) has replies of ~209 KB: the startup warning says so.
        assert "--max-n 1000000 allows replies larger than --max-reply-bytes 1000" in text


def test_the_default_limit_is_silent_for_the_default_max_n():
    assert limits.max_n_warning(DEFAULT_MAX_N, limits.DEFAULT_MAX_REPLY_BYTES) is None


@pytest.mark.timeout(180)
def test_a_reply_the_broker_refuses_ends_its_request_once():
    """Broker max_message_size 1 MiB, server --max-reply-bytes 128 MiB: F(5.1*10^6) in decimal (1.07 MB) is refused.

    Before issue 14 the worker read the 406 as "queue attributes differ" and reconnected in a loop,
    recomputing the redelivered request each time. Now: one refusal, the channel is reopened (no
    reconnection), and the redelivered request gets out_of_range without being computed again."""
    n = 5_100_000
    size = limits.reply_bytes(n, "decimal")
    assert size > 1 << 20
    with private_broker("max_message_size = 1048576") as url:
        queue = "compat-refused"
        with Pool(queue, "--max-reply-bytes", str(128 << 20), "--max-n", str(10**7), url=url,
                  workers=1) as pool, RpcClient(queue, url=url) as client:
            pool.wait_ready()
            big = client.publish(str(n).encode())
            kind, message = _error(_wait_reply(client, big, 60))
            assert kind == "out_of_range"
            assert f"{size} bytes" in message and "1048576 bytes" in message
            client.drain(2.0)
            assert len(client.replies[big]) == 1  # answered once
            assert client.call(b"30")[1] == b"832040"  # and the worker serves on
            assert client.call(str(n).encode(), headers={"accept": "application/octet-stream"},
                               timeout=30)[1] == fastfib.fib_encoded(n, "binary")  # 443 KB binary fits
            text = pool.text()
            assert text.count(f"the broker refused a reply of {size} bytes") == 1, text[-3000:]
            assert "reconnecting" not in text and "exists with other attributes" not in text, text[-3000:]


def _wait_reply(client, cid, timeout):
    import time

    deadline = time.monotonic() + timeout
    while not client.replies.get(cid):
        assert time.monotonic() < deadline, f"no reply within {timeout} s"
        client.connection.process_data_events(time_limit=0.05)
    return client.replies[cid][0]


def _queue_arguments(queue: str) -> tuple[bool, dict]:
    from _fault_helpers import rabbitmqctl

    out = rabbitmqctl("list_queues", "name", "durable", "arguments", "--no-table-headers", "--quiet")
    for line in out.splitlines():
        fields = line.split("\t")
        if fields[0] == queue:
            return fields[1] == "true", fields[2]
    raise AssertionError(f"queue {queue} not found:\n{out}")


@pytest.mark.timeout(60)
def test_a_fresh_queue_is_durable_quorum_like_the_current_tutorial(queue):
    with Pool(queue, workers=1) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        assert client.call(b"20")[1] == b"6765"
        durable, arguments = _queue_arguments(queue)
        assert durable and "quorum" in arguments
        assert "queue declared as durable quorum" in pool.text()


@pytest.mark.timeout(60)
def test_the_seed_tutorials_transient_queue_is_behind_an_explicit_option(queue):
    with Pool(queue, "--queue-type", "classic", "--no-queue-durable", workers=1) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        assert client.call(b"20")[1] == b"6765"
        durable, arguments = _queue_arguments(queue)
        assert not durable and "quorum" not in arguments


@pytest.mark.timeout(60)
def test_an_existing_transient_queue_is_served_as_it_is(queue):
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    connection.channel().queue_declare(queue)  # the seed tutorial's declaration
    connection.close()
    with Pool(queue, workers=1) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        assert client.call(b"21")[1] == b"10946"
        assert "exists with other attributes" in pool.text()
        assert not _queue_arguments(queue)[0]


@pytest.mark.timeout(120)
def test_a_flood_of_unheard_names_costs_one_probe_per_pid(broker_has_541_crash):
    """RabbitMQ < 3.10.12 (probes run): 2,000 requests whose reply_to is a real pid with random keys.

    The worker probes that pid once, replies to every one of them (the broker drops the replies: nobody
    listens on those keys), and a real client is answered meanwhile. Probes are counted in the worker's
    DEBUG log."""
    queue = "compat-flood-" + os.urandom(4).hex()
    direct = learn_direct_reply_to()
    pid = direct.name[len("amq.rabbitmq.reply-to."):].partition(".")[0]
    try:
        with Pool(queue, "--log-level", "DEBUG", workers=1) as pool, RpcClient(queue) as client:
            pool.wait_ready()
            for _ in range(2000):
                key = base64.b64encode(os.urandom(12)).decode()
                client.publish(b"20", reply_to=f"amq.rabbitmq.reply-to.{pid}.{key}")
            assert client.call(b"30", timeout=60)[1] == b"832040"
            client.drain(1.0)
            text = pool.text()
            # One probe for the flood's pid, one for the real client's: not one per name.
            assert text.count("probing the Direct Reply-to pid") == 2, text[-3000:]
            assert "reconnecting" not in text and "dropped" not in text
    finally:
        delete_queue(queue)
