"""Unit tests of the server's pieces that need no broker: the reply cache, the
worker's request path against a fake channel (error replies, the ``internal``
path, acknowledgement batching), URL masking and the Direct Reply-to check."""

from __future__ import annotations

import base64
import json
import struct
import time

import pytest
from pika.spec import BasicProperties

import fastfib
from fastfib import protocol
from fastfib.cache import ENTRY_OVERHEAD, ReplyCache
from fastfib.logs import mask_url
from fastfib.server.compute import Job
from fastfib.server.lifecycle import Worker
from fastfib.server.reply_guard import direct_reply_to_ok
from fastfib.server.settings import WorkerConfig

# ------------------------------------------------------------------------------ cache


def test_cache_is_lru_within_its_byte_budget():
    cache = ReplyCache(3 * (100 + ENTRY_OVERHEAD))
    for i in range(3):
        cache.put((i, "decimal"), bytes(100))
    assert len(cache) == 3 and cache.size == 3 * (100 + ENTRY_OVERHEAD)
    assert cache.get((0, "decimal")) is not None  # 0 is now the most recent
    cache.put((3, "decimal"), bytes(100))  # evicts 1, the least recently used
    assert (1, "decimal") not in cache
    assert all(k in cache for k in [(0, "decimal"), (2, "decimal"), (3, "decimal")])
    assert cache.size <= cache.max_bytes


def test_cache_keys_by_format_and_replaces_entries():
    cache = ReplyCache(10_000)
    cache.put((7, "decimal"), b"13")
    cache.put((7, "binary"), b"\x0d")
    assert cache.get((7, "decimal")) == b"13" and cache.get((7, "binary")) == b"\x0d"
    cache.put((7, "decimal"), b"13")
    assert len(cache) == 2 and cache.size == 2 * ENTRY_OVERHEAD + 3


def test_cache_zero_budget_is_off_and_oversized_values_are_skipped():
    off = ReplyCache(0)
    off.put((1, "decimal"), b"1")
    assert len(off) == 0 and off.get((1, "decimal")) is None
    small = ReplyCache(1000)
    small.put((1, "decimal"), bytes(2000))
    assert len(small) == 0 and small.size == 0
    with pytest.raises(ValueError):
        ReplyCache(-1)


# ------------------------------------------------------------------ helpers of the worker


def test_mask_url_hides_the_password_only():
    assert mask_url("amqp://guest:secret@host:5672/%2F") == "amqp://guest:***@host:5672/%2F"
    assert mask_url("amqps://u:p%40ss@h/v?heartbeat=5") == "amqps://u:***@h/v?heartbeat=5"
    assert mask_url("amqp://host/%2F") == "amqp://host/%2F"
    assert "secret" not in mask_url("amqp://user:secret@[::1]:5672/")


def _pid_term(node: bytes, new: bool = True) -> bytes:
    tail = b"\x00\x00\x03\x84\x00\x00\x00\x00" + (b"k\x08x-" if new else b"\x01")
    return b"\x83" + (b"X" if new else b"g") + b"v" + struct.pack(">H", len(node)) + node + tail


def test_direct_reply_to_shape_check():
    p = protocol.DIRECT_REPLY_TO + "."
    key = base64.b64encode(b"0123456789abcdef").decode()
    assert direct_reply_to_ok("amq.gen-abc")  # not Direct Reply-to: not ours to judge
    assert direct_reply_to_ok(p + base64.b64encode(_pid_term(b"reply@9248884")).decode() + "." + key)
    assert direct_reply_to_ok(p + base64.b64encode(_pid_term(b"rabbit@host", new=False)).decode() + "." + key)
    # Names that made RabbitMQ 3.10 close the publisher's connection with 541 INTERNAL_ERROR:
    assert not direct_reply_to_ok(p + base64.b64encode(b"garbage").decode() + ".abc")
    assert not direct_reply_to_ok(p + "!!!!.abc")
    assert not direct_reply_to_ok(p + base64.b64encode(b"\x83d\x00\x03foo").decode() + ".abc")
    assert not direct_reply_to_ok(p + base64.b64encode(_pid_term(b"nonode")).decode() + "." + key)
    assert not direct_reply_to_ok(p + base64.b64encode(_pid_term(b"reply@1")[:-1]).decode() + "." + key)
    assert not direct_reply_to_ok(p + base64.b64encode(_pid_term(b"reply@1")).decode())  # no key


# --------------------------------------------------------------- the request path, faked


class FakeChannel:
    def __init__(self) -> None:
        self.is_open = True
        self.published: list[tuple[str, bytes, BasicProperties]] = []
        self.acks: list[tuple[int, bool]] = []
        self.rejects: list[int] = []

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False):
        assert exchange == ""
        self.published.append((routing_key, body, properties))

    def basic_ack(self, delivery_tag=0, multiple=False):
        self.acks.append((delivery_tag, multiple))

    def basic_reject(self, delivery_tag, requeue=True):
        self.rejects.append((delivery_tag, requeue))


class Method:
    def __init__(self, tag: int) -> None:
        self.delivery_tag = tag
        self.redelivered = False


def make_worker(compute=None, **config) -> tuple[Worker, FakeChannel]:
    worker = Worker(WorkerConfig(**config), compute=compute)
    channel = FakeChannel()
    worker._set_channel(channel)
    return worker, channel


def deliver(worker, channel, tag, body, reply_to="replies", cid=None, headers=None):
    props = BasicProperties(reply_to=reply_to, correlation_id=cid or f"c{tag}", headers=headers)
    worker.dispatcher.on_message(channel, Method(tag), props, body)


def acked_tags(channel, delivered: int) -> set[int]:
    """Which tags 1..delivered the acks cover, checking that none is acknowledged twice."""
    covered: set[int] = set()
    for tag, multiple in channel.acks:
        new = set(range(1, tag + 1)) - covered if multiple else {tag}
        assert tag not in covered, f"tag {tag} acknowledged twice"
        covered |= new
    assert covered <= set(range(1, delivered + 1))
    return covered


def test_replies_then_one_batched_ack_per_loop_turn():
    worker, channel = make_worker()
    for tag in range(1, 6):
        deliver(worker, channel, tag, str(tag * 10).encode())
    assert channel.acks == []  # not yet: at the end of this I/O loop turn
    assert [b for _, b, _ in channel.published] == [fastfib.fib_encoded(t * 10) for t in range(1, 6)]
    assert all(p.correlation_id == f"c{i + 1}" and p.content_type == "text/plain"
               for i, (_, _, p) in enumerate(channel.published))
    worker.acks.flush()
    assert channel.acks == [(5, True)]


def test_every_error_kind_is_replied_and_acknowledged_once():
    worker, channel = make_worker(max_n=1000)
    cases = [
        (b"", "invalid_argument"), (b"abc", "invalid_argument"), (b"1e3", "invalid_argument"),
        (b"30.0", "invalid_argument"), (b"1_000", "invalid_argument"), ("١٢".encode(), "invalid_argument"),
        (b"1" * 65, "invalid_argument"), (b"\xff\xfe", "invalid_argument"), (b"+5", "invalid_argument"),
        (b"-1", "out_of_range"), (b"1001", "out_of_range"),
    ]
    for tag, (body, _) in enumerate(cases, 1):
        deliver(worker, channel, tag, body)
    deliver(worker, channel, len(cases) + 1, b"5", headers={"accept": "text/html"})
    worker.acks.flush()
    kinds = [k for _, k in cases] + ["unsupported_format"]
    assert len(channel.published) == len(kinds)
    for (_, body, props), kind in zip(channel.published, kinds, strict=True):
        assert props.headers == {"x-error": kind}
        assert props.content_type == "application/json"
        doc = json.loads(body)
        assert doc["error"] == kind and doc["message"]
    assert "1000" in json.loads(channel.published[10][1])["message"]  # the maximum is named
    assert acked_tags(channel, len(kinds)) == set(range(1, len(kinds) + 1))
    assert channel.rejects == []


def test_an_unexpected_exception_replies_internal_acks_and_keeps_serving():
    def compute(n, fmt):
        if n == 13:
            raise RuntimeError("kernel exploded")
        return fastfib.fib_encoded(n, fmt)

    worker, channel = make_worker(compute=compute)
    deliver(worker, channel, 1, b"13")
    deliver(worker, channel, 2, b"12")
    worker.acks.flush()
    (_, body1, props1), (_, body2, props2) = channel.published
    assert props1.headers == {"x-error": "internal"} and json.loads(body1)["error"] == "internal"
    assert "kernel exploded" not in body1.decode()  # details stay in the server's log
    assert body2 == b"144" and props2.headers is None
    assert acked_tags(channel, 2) == {1, 2}
    assert worker.stats.errors["internal"] == 1


def test_internal_error_on_the_compute_thread_path():
    worker, channel = make_worker(inline_max_n=0)
    job = Job(channel, 5, "decimal", 1, "replies", "c1")
    job.error = MemoryError()
    worker.acks.inflight.add(1)
    worker.dispatcher.on_computed(job)
    worker.acks.flush()
    assert channel.published[0][2].headers == {"x-error": "internal"}
    assert channel.acks == [(1, False)]


def test_unusable_reply_to_is_acked_without_reply():
    worker, channel = make_worker()
    deliver(worker, channel, 1, b"10", reply_to=b"\xff\xfe-not-utf8")  # pika hands such a name over as bytes
    deliver(worker, channel, 2, b"10", reply_to="amq.rabbitmq.reply-to.Z2FyYmFnZQ==.abc")
    deliver(worker, channel, 3, b"10")
    worker.acks.flush()
    assert [(rt, b) for rt, b, _ in channel.published] == [("replies", b"55")]
    assert channel.acks == [(3, True)] and worker.stats.no_reply_to == 2


def test_no_reply_to_and_past_deadline_are_acked_without_reply():
    worker, channel = make_worker()
    deliver(worker, channel, 1, b"10", reply_to=None)
    deliver(worker, channel, 2, b"10", headers={"x-deadline-ms": 1})
    deliver(worker, channel, 3, b"garbage", headers={"x-deadline-ms": 1})  # expired: not even parsed
    deliver(worker, channel, 4, b"10", headers={"x-deadline-ms": 2**62})
    worker.acks.flush()
    assert [b for _, b, _ in channel.published] == [b"55"]
    assert channel.acks == [(4, True)]
    assert worker.stats.no_reply_to == 1 and worker.stats.expired == 2


def test_acks_never_cover_a_request_still_being_computed():
    worker, channel = make_worker(inline_max_n=100)
    deliver(worker, channel, 1, b"5")
    deliver(worker, channel, 2, b"5000")  # offloaded: in flight
    deliver(worker, channel, 3, b"6")
    deliver(worker, channel, 4, b"7")
    worker.acks.flush()
    assert channel.acks == [(1, False), (3, False), (4, False)]
    job = worker.computer.jobs.get_nowait()
    assert [w[0] for w in job.waiters] == [2]
    job.body = fastfib.fib_encoded(5000)
    worker.dispatcher.on_computed(job)
    deliver(worker, channel, 5, b"8")
    worker.acks.flush()
    assert channel.acks[3:] == [(5, True)]
    assert acked_tags(channel, 5) == {1, 2, 3, 4, 5}
    assert (5000, "decimal") in worker.cache


def test_requests_for_an_n_being_computed_wait_for_that_computation():
    worker, channel = make_worker(inline_max_n=100)
    for tag in (1, 2, 3):
        deliver(worker, channel, tag, b"5000")
    deliver(worker, channel, 4, b"5000", headers={"accept": "application/octet-stream"})
    first, second = worker.computer.jobs.get_nowait(), worker.computer.jobs.get_nowait()
    assert worker.computer.jobs.empty()
    assert [w[0] for w in first.waiters] == [1, 2, 3] and [w[0] for w in second.waiters] == [4]
    first.body = fastfib.fib_encoded(5000)
    worker.dispatcher.on_computed(first)
    worker.acks.flush()
    assert [(p.correlation_id, b) for _, b, p in channel.published] == [(f"c{t}", first.body) for t in (1, 2, 3)]
    assert channel.acks == [] or max(t for t, _ in channel.acks) < 4
    deliver(worker, channel, 5, b"5000")  # now from the cache
    assert worker.computer.jobs.empty() and channel.published[-1][1] == first.body


def test_a_cached_large_n_is_served_without_the_compute_thread():
    worker, channel = make_worker(inline_max_n=100)
    worker.cache.put((5000, "binary"), b"cached")
    deliver(worker, channel, 1, b"5000", headers={"accept": "application/octet-stream"})
    assert channel.published[0][1] == b"cached"
    assert channel.published[0][2].content_type == "application/octet-stream"
    assert worker.computer.jobs.empty() and worker.stats.cache_hits == 1


def test_jobs_skipped_on_stop_are_rejected_back_to_the_queue():
    worker, channel = make_worker(inline_max_n=0)
    deliver(worker, channel, 1, b"5")
    job = worker.computer.jobs.get_nowait()
    job.skipped = True
    worker.dispatcher.on_computed(job)
    worker.acks.flush()
    assert channel.rejects == [(1, True)] and channel.acks == [] and channel.published == []


def test_results_for_a_closed_channel_are_dropped():
    worker, channel = make_worker(inline_max_n=0)
    deliver(worker, channel, 1, b"5")
    job = worker.computer.jobs.get_nowait()
    job.body = b"5"
    worker._set_channel(FakeChannel())  # reconnected meanwhile: tag 1 means nothing on the new channel
    worker.dispatcher.on_computed(job)
    worker.acks.flush()
    assert channel.published == [] and channel.acks == []
    assert worker.cache.get((5, "decimal")) == b"5"  # cached all the same: its redelivery costs a lookup


def test_the_compute_thread_drops_a_job_whose_deadline_passed_in_the_queue():
    computed = []

    def compute(n, fmt):
        computed.append(n)
        return fastfib.fib_encoded(n, fmt)

    worker, channel = make_worker(compute=compute, inline_max_n=100)
    soon = int(time.time() * 1000) + 30  # not passed when the requests arrive
    deliver(worker, channel, 1, b"5000", headers={"x-deadline-ms": soon})
    deliver(worker, channel, 2, b"5000", headers={"x-deadline-ms": soon + 1})  # joins the same job
    deliver(worker, channel, 3, b"6000", headers={"x-deadline-ms": soon})
    deliver(worker, channel, 4, b"6000")  # no deadline: the job must be computed for it
    assert worker.stats.expired == 0 and worker.stats.offloaded == 2
    while time.time() * 1000 <= soon + 1:  # a backlog: the deadlines pass while the jobs wait
        time.sleep(0.01)
    worker.computer.start(worker.dispatcher.on_computed)
    deadline = time.monotonic() + 10
    while len(channel.published) + worker.stats.expired < 4 and time.monotonic() < deadline:
        worker._ioloop.process_timeouts()  # the results come back through the I/O loop
        time.sleep(0.005)
    worker.computer.stop()
    worker.acks.flush()
    assert computed == [6000]
    assert worker.stats.expired == 2
    assert [(p.correlation_id, b) for _, b, p in channel.published] == [(c, fastfib.fib_encoded(6000))
                                                                         for c in ("c3", "c4")]
    assert acked_tags(channel, 4) == {1, 2, 3, 4}


# ------------------------------------------------------------- the reply frames, hand-encoded


def _pika_frames(channel_number, body_max, reply_to, content_type, correlation_id, body) -> bytes:
    """What pika's basic_publish marshals (Connection._send_message), frame by frame."""
    from pika import frame, spec

    props = BasicProperties(content_type=content_type, correlation_id=correlation_id)
    out = [frame.Method(channel_number, spec.Basic.Publish(exchange="", routing_key=reply_to)).marshal(),
           frame.Header(channel_number, len(body), props).marshal()]
    for start in range(0, len(body), body_max):
        out.append(frame.Body(channel_number, body[start:start + body_max]).marshal())
    return b"".join(out)


@pytest.mark.parametrize("correlation_id", [None, "", "abc", "x" * 255, "ünïcödé", b"\xff\xfe"])
@pytest.mark.parametrize("size", [0, 1, 5, 131064, 131065, 400_000])
@pytest.mark.parametrize("fmt", ["decimal", "binary"])
def test_reply_encoder_matches_pika_byte_for_byte(correlation_id, size, fmt):
    from fastfib.wire import CONTENT_TYPE_SHORTSTR, ReplyEncoder

    body = bytes(range(256)) * (size // 256) + b"7" * (size % 256)
    encoder = ReplyEncoder(channel_number=3, body_max=131064)
    for reply_to in ["amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAADhAAAAABrCHgt.+QAWJ9JBGRnE0cfA3+gTxQ==",
                     "amq.gen-Xy_z", "amq.gen-Xy_z"]:  # the second time from the method frame cache
        pieces = encoder.frames(reply_to, CONTENT_TYPE_SHORTSTR[fmt], correlation_id, body)
        expected = _pika_frames(3, 131064, reply_to, protocol.CONTENT_TYPES[fmt], correlation_id, body)
        assert b"".join(bytes(p) for p in pieces) == expected
