"""``fastfib serve`` against the real broker: protocol v1, request by request.

One pool (2 workers, ``--max-n 5000``, ``--inline-max-n 1000`` so that both the
inline and the compute-thread paths are used) serves a queue of this module's
own; the fixture's teardown kills it whatever happens.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import gmpy2
import pytest
from _server_helpers import URL, WIRES, Pool, RpcClient, delete_queue

from fastfib import protocol
from fastfib.server.lifecycle import Worker
from fastfib.server.settings import WorkerConfig

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

MAX_N = 5000
BINARY = {"accept": "application/octet-stream"}


@pytest.fixture(scope="module", params=WIRES)
def pool(broker_url, request):
    queue = f"fastfib-test-serve-{uuid.uuid4().hex[:12]}"
    with Pool(queue, "--max-n", str(MAX_N), "--inline-max-n", "1000", "--log-level", "DEBUG",
              wire=request.param) as p:
        p.wait_ready()
        yield p
    delete_queue(queue)


@pytest.fixture
def direct(pool):
    with RpcClient(pool.queue, direct=True) as client:
        yield client


def fib(n: int) -> int:
    return int(gmpy2.fib(n))


@pytest.mark.parametrize("direct_reply_to", [False, True], ids=["tutorial-callback-queue", "direct-reply-to"])
def test_correct_answers_over_both_reply_styles(pool, direct_reply_to):
    with RpcClient(pool.queue, direct=direct_reply_to) as client:
        ns = [0, 1, 2, 30, 93, 94, 1000, 1001, 4999, 5000] + list(range(100, 140))
        cids = client.run([str(n).encode() for n in ns], window=16, timeout=30)
        for cid, body in cids.items():
            (props, reply), = client.replies[cid]
            assert props.correlation_id == cid
            assert props.content_type == "text/plain"
            assert props.headers is None
            assert reply == str(fib(int(body))).encode()


def test_the_tutorial_client_verbatim(pool):
    """The tutorial's FibonacciRpcClient, as written there: exclusive callback queue, call(30)."""
    import pika

    class FibonacciRpcClient:
        def __init__(self):
            self.connection = pika.BlockingConnection(pika.URLParameters(URL))
            self.channel = self.connection.channel()
            result = self.channel.queue_declare(queue="", exclusive=True)
            self.callback_queue = result.method.queue
            self.channel.basic_consume(queue=self.callback_queue, on_message_callback=self.on_response, auto_ack=True)
            self.response = None
            self.corr_id = None

        def on_response(self, ch, method, props, body):
            if self.corr_id == props.correlation_id:
                self.response = body

        def call(self, n):
            self.response = None
            self.corr_id = str(uuid.uuid4())
            self.channel.basic_publish(
                exchange="", routing_key=pool.queue,
                properties=pika.BasicProperties(reply_to=self.callback_queue, correlation_id=self.corr_id),
                body=str(n),
            )
            self.connection.process_data_events(time_limit=10)
            return int(self.response)

    client = FibonacciRpcClient()
    try:
        assert client.call(30) == 832040
        assert client.call(4321) == fib(4321)
    finally:
        client.connection.close()


@pytest.mark.parametrize("n", [0, 1, 93, 94, 255, 256, 1000, 4096])
def test_binary_and_decimal_encodings(direct, n):
    props, body = direct.call(str(n).encode(), headers=BINARY)
    assert props.content_type == "application/octet-stream"
    assert int.from_bytes(body, "big") == fib(n)
    assert body == (b"\x00" if n == 0 else fib(n).to_bytes((fib(n).bit_length() + 7) // 8, "big"))
    props, body = direct.call(str(n).encode(), headers={"accept": "text/plain"})
    assert (props.content_type, body) == ("text/plain", str(fib(n)).encode())
    assert protocol.decode_reply(props.content_type, props.headers, body) == fib(n)


INVALID = [b"", b"abc", b"1e3", b"30.0", b"1_000", "١٢٣".encode(), "１２".encode(), b"1" * 65, b"\xff\xfe\xfd",
           b"+5", b"0x10", b"1 2", b"\x00"]


@pytest.mark.parametrize("body", INVALID, ids=repr)
def test_invalid_argument(direct, body):
    props, reply = direct.call(body)
    assert props.headers == {"x-error": "invalid_argument"}
    assert props.content_type == "application/json"
    doc = json.loads(reply)
    assert doc["error"] == "invalid_argument" and doc["message"]


def test_whitespace_and_64_bytes_are_fine(direct):
    assert direct.call(b"  \t42\r\n")[1] == b"267914296"
    assert direct.call(b"0" * 60 + b"4000")[1] == str(fib(4000)).encode()  # exactly 64 bytes


@pytest.mark.parametrize("body,needle", [(b"-1", "negative"), (b"-99999999999", "negative"),
                                         (str(MAX_N + 1).encode(), str(MAX_N)), (b"9" * 64, str(MAX_N))])
def test_out_of_range(direct, body, needle):
    props, reply = direct.call(body)
    assert props.headers == {"x-error": "out_of_range"}
    doc = json.loads(reply)
    assert doc["error"] == "out_of_range" and needle in doc["message"]


def test_minus_zero_is_zero(direct):
    assert direct.call(b"-0")[1] == b"0"


@pytest.mark.parametrize("accept", ["text/html", "application/json", "", "TEXT/PLAIN"])
def test_unsupported_format(direct, accept):
    props, reply = direct.call(b"10", headers={"accept": accept})
    assert props.headers == {"x-error": "unsupported_format"}
    assert json.loads(reply)["error"] == "unsupported_format"


def test_request_without_reply_to_is_acknowledged_and_dropped(pool, direct):
    direct.publish(b"10", reply_to=None, correlation_id="no-reply-to")
    # The queue empties (acknowledged, not requeued) and the pool keeps serving.
    assert direct.call(b"11")[1] == b"89"
    pool.wait_for("without reply_to", timeout=10)
    assert "no-reply-to" not in direct.replies


def test_request_past_its_deadline_gets_no_answer(pool, direct):
    past = int(time.time() * 1000) - 5000
    cid = direct.publish(b"12", headers={"x-deadline-ms": past})
    future = protocol.deadline_header(30)
    assert direct.call(b"13", headers={"x-deadline-ms": future})[1] == b"233"
    direct.drain(0.5)
    assert cid not in direct.replies
    pool.wait_for("past its deadline", timeout=10)


def test_correlation_id_echoed_even_when_absent_or_odd(pool, direct):
    import pika

    for cid in [None, "", "x" * 255, "ünïcödé"]:
        props = pika.BasicProperties(reply_to=direct.reply_to, correlation_id=cid)
        direct.channel.basic_publish("", pool.queue, b"7", props)
    deadline = time.monotonic() + 10
    while len(direct.stray) + sum(map(len, direct.replies.values())) < 4 and time.monotonic() < deadline:
        direct.connection.process_data_events(time_limit=0.1)
    got = {p.correlation_id for p, _ in direct.stray} | set(direct.replies)
    assert {"x" * 255, "ünïcödé"} <= got
    assert all(body == b"13" for p, body in direct.stray)


def test_unusable_reply_to_is_dropped_not_fatal(pool, direct):
    # RabbitMQ 3.10 closes a publisher's connection (541) for a reply to such a name;
    # a name that is not UTF-8 cannot be a queue's.
    for bad in ["amq.rabbitmq.reply-to.Z2FyYmFnZQ==.abc", "amq.rabbitmq.reply-to.!!!!.abc", b"\xff\xfe\xfd"]:
        direct.publish(b"10", reply_to=bad)
    assert direct.call(b"10")[1] == b"55"
    pool.wait_for("unusable reply_to", timeout=10)
    assert "lost" not in pool.text()


def test_large_n_on_the_compute_thread_and_from_the_cache(pool, direct):
    ns = [4000 + i for i in range(20)] * 3
    cids = direct.run([str(n).encode() for n in ns], window=32, headers=BINARY)
    for cid, body in cids.items():
        (props, reply), = direct.replies[cid]
        assert int.from_bytes(reply, "big") == fib(int(body))


def test_mixed_load_every_answer_exactly_once(pool, direct):
    bodies = [str(n).encode() for n in ([20] * 300 + [4500] * 20 + [1500, 3000] * 30)]
    bodies += [b"bad", b"-3"] * 10
    cids = direct.run(bodies, window=32)
    for cid, body in cids.items():
        assert len(direct.replies[cid]) == 1
        props, reply = direct.replies[cid][0]
        if body in (b"bad", b"-3"):
            assert props.headers["x-error"] in ("invalid_argument", "out_of_range")
        else:
            assert reply == str(fib(int(body))).encode()


@pytest.mark.parametrize("wire", WIRES)
def test_internal_error_reply_from_a_failing_kernel(broker_url, wire):
    """``internal``: a worker whose kernel fails (the compute function is a constructor
    argument; here one that raises for n = 13) replies ``internal`` over the real broker,
    acknowledges, and keeps serving, on both the inline and the compute-thread path."""
    import fastfib

    queue = f"fastfib-test-internal-{uuid.uuid4().hex[:12]}"

    def compute(n, fmt):
        if n in (13, 2013):
            raise RuntimeError("simulated kernel failure")
        return fastfib.fib_encoded(n, fmt)

    consuming = threading.Event()
    worker = Worker(WorkerConfig(urls=(URL,), queue=queue, inline_max_n=1000, wire=wire), compute=compute,
                    on_event=lambda name, detail: name == "consuming" and consuming.set())
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert consuming.wait(20)
        with RpcClient(queue) as client:
            for n in (13, 2013):
                props, body = client.call(str(n).encode())
                assert props.headers == {"x-error": "internal"}
                assert json.loads(body)["error"] == "internal"
                assert client.call(str(n + 1).encode())[1] == str(fib(n + 1)).encode()
        assert worker.stats.errors["internal"] == 2
        assert worker.wire == wire  # the fast wire passed its self-check: no fallback
    finally:
        worker.request_stop()
        thread.join(15)
        delete_queue(queue)
    assert not thread.is_alive() and worker.exit_code == 0


def _nested(depth: int) -> dict:
    headers: dict = {}
    inner = headers
    for _ in range(depth):
        inner["a"] = {}
        inner = inner["a"]
    return headers


def test_an_undecodable_request_gets_an_error_reply_and_is_not_redelivered(pool, direct):
    """Headers nested too deeply for any decoder (RecursionError in the worker): the request is
    answered invalid_argument and rejected without requeue; the workers keep their connections."""
    import sys

    if pool.wire == "pika":
        pytest.skip("--wire pika decodes with pika itself, which raises on such headers (docs/server.md)")

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)  # pika's encoder recurses too
    try:
        cid = direct.publish(b"10", headers=_nested(3000))
    finally:
        sys.setrecursionlimit(limit)
    assert direct.call(b"11")[1] == b"89"
    deadline = time.monotonic() + 10
    while not direct.replies.get(cid) and time.monotonic() < deadline:
        direct.connection.process_data_events(time_limit=0.05)
    (props, reply), = direct.replies[cid]
    assert props.headers == {"x-error": "invalid_argument"}
    assert "cannot be decoded" in json.loads(reply)["message"]
    pool.wait_for("undecodable request", timeout=10)
    direct.drain(0.5)
    assert len(direct.replies[cid]) == 1  # not redelivered
    assert "lost" not in pool.text() and "reconnecting" not in pool.text()
