"""Fuzzing a running ``python -m fastfib serve --workers 2`` with hypothesis (issue 6, part 1).

Random bodies (bytes, 1 MiB, non-ASCII digits, signs, whitespace), random
``accept`` values of every AMQP type, deadlines, extra headers, and odd
``reply_to`` / ``correlation_id`` values (absent, empty, 255 bytes long, not
UTF-8, names of queues that do not exist, the service queue itself, malformed
and well-formed-but-undeliverable Direct Reply-to names). The properties:

- every request with a usable ``reply_to`` gets exactly one reply, and it is
  the one protocol v1 prescribes (:func:`_fault_helpers.expected_outcome`, an
  oracle written from the protocol, not from the server's code): the right
  value in the right encoding, or the right error kind; never ``internal``;
- requests whose deadline has passed get no reply;
- the server stays up: the same worker processes at the end (no restart), no
  connection lost, no traceback, and every request acknowledged (the queue
  is empty, nothing unacknowledged).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass

import pika
import pytest
from _fault_helpers import (
    URL,
    Outcome,
    Pool,
    delete_queue,
    expected_outcome,
    learn_direct_reply_to,
    queue_depth,
    unacked,
    unique,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MAX_N = 30_000
ABSENT = object()  # a header or property that is not sent at all


class Collector:
    """One pika connection that sends requests and records every reply, keyed by correlation_id as received."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.connection = pika.BlockingConnection(pika.URLParameters(URL))
        self.channel = self.connection.channel()
        self.exclusive = self.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.channel.basic_consume("amq.rabbitmq.reply-to", self._on_reply, auto_ack=True)
        self.channel.basic_consume(self.exclusive, self._on_reply, auto_ack=True)
        self.replies: dict[object, list[tuple[pika.BasicProperties, bytes]]] = {}
        self.count = 0

    def _on_reply(self, channel, method, props, body) -> None:
        self.replies.setdefault(props.correlation_id, []).append((props, body))
        self.count += 1

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.connection.process_data_events(time_limit=min(0.05, remaining))

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:
            pass


@dataclass
class Spec:
    """One request: its body, headers and the odd property values hypothesis picked."""

    body: bytes
    accept: object
    deadline: object
    extra: dict
    reply_to: str  # a kind, resolved in _publish
    reply_to_value: object
    correlation: str  # a kind
    correlation_value: object


# --- strategies ------------------------------------------------------------------------------

_WS = st.sampled_from([b"", b" ", b"\t", b"\n", b"\r\n", b" \x0b\x0c "])
_valid_bodies = st.builds(
    lambda pre, sign, zeros, n, post: pre + sign + b"0" * zeros + str(n).encode() + post,
    _WS, st.sampled_from([b"", b"", b"-"]), st.integers(0, 3), st.integers(0, MAX_N + 100), _WS,
)
_non_ascii_digits = st.text(
    alphabet=st.sampled_from("٠١٢٣٤٥٦٧٨٩۱۲۳०१२३０１２３²³¹½ⅫⅦ𝟘𝟙"), min_size=1, max_size=8
).map(lambda s: s.encode("utf-8"))
_bodies = st.one_of(
    _valid_bodies,
    _valid_bodies,
    st.binary(max_size=80),
    st.text(max_size=20).map(lambda s: s.encode("utf-8")),
    _non_ascii_digits,
    st.sampled_from([b"", b"1e3", b"30.0", b"1_000", b"+5", b"0x10", b"-0", b" 7 \n", b"\xff\xfe", b"1 2",
                     b"\x00", b"12\x00", b"\xc2\xa012", b"\xe3\x80\x8012"]),
    st.builds(lambda k, c: c * k, st.sampled_from([64, 65, 100, 70_000, 1 << 20]), st.sampled_from([b"1", b" ", b"x"])),
)
_accepts = st.one_of(
    st.just(ABSENT), st.just(ABSENT), st.sampled_from(["text/plain", "application/octet-stream"]),
    st.just(None), st.text(max_size=30), st.binary(max_size=20),
    st.sampled_from([b"text/plain", b"application/octet-stream", "TEXT/PLAIN", "text/plain; charset=utf-8",
                     "application/json", "*/*", " text/plain"]),
    st.integers(-(2**63), 2**63 - 1), st.booleans(),
)
_deadlines = st.sampled_from([ABSENT, ABSENT, ABSENT, "future", "past", "garbage", True, False])
_extra_keys = st.text(min_size=1, max_size=12).filter(lambda k: k.lower() not in ("accept", "x-deadline-ms", "x-error"))
_extra_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=20), st.binary(max_size=20),
    st.lists(st.integers(0, 1000), max_size=3), st.dictionaries(st.text(min_size=1, max_size=5), st.integers(0, 9), max_size=2),
)
_extras = st.dictionaries(_extra_keys, _extra_values, max_size=3)

#: reply_to kinds: observable ones get a reply we can see; the others must not disturb the server.
OBSERVABLE = ("direct", "exclusive")
_reply_to_kinds = st.sampled_from(OBSERVABLE * 4 + (
    "absent", "empty", "nowhere", "not-utf8", "long", "bare-direct", "service-queue",
    "direct-junk", "direct-node", "direct-hash", "direct-pid",
))
_correlation_kinds = st.sampled_from(["uuid", "uuid", "uuid", "absent", "empty", "long", "unicode", "not-utf8"])


@st.composite
def specs(draw) -> Spec:
    reply_to = draw(_reply_to_kinds)
    value: object = None
    if reply_to == "direct-junk":
        value = draw(st.text(max_size=40))
    elif reply_to == "direct-node":
        value = draw(st.binary(max_size=30))
    elif reply_to == "direct-hash":
        value = draw(st.integers(0, 2**32))
    elif reply_to == "direct-pid":
        value = draw(st.binary(min_size=12, max_size=12))
    return Spec(
        body=draw(_bodies), accept=draw(_accepts), deadline=draw(_deadlines), extra=draw(_extras),
        reply_to=reply_to, reply_to_value=value, correlation=draw(_correlation_kinds), correlation_value=None,
    )


# --- the test ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_pool(broker_url):
    queue = unique("fuzz")
    pool = Pool(queue, "--max-n", str(MAX_N), "--prefetch", "16")
    try:
        pool.wait_ready()
        yield pool
    finally:
        pool.kill()
        delete_queue(queue)


def _headers(spec: Spec) -> dict | None:
    headers = dict(spec.extra)
    if spec.accept is not ABSENT:
        headers["accept"] = spec.accept
    now_ms = int(time.time() * 1000)
    if spec.deadline == "future":
        headers["x-deadline-ms"] = now_ms + 600_000
    elif spec.deadline == "past":
        headers["x-deadline-ms"] = now_ms - 1_000
    elif spec.deadline == "garbage":
        headers["x-deadline-ms"] = "soon"
    elif spec.deadline is not ABSENT:
        headers["x-deadline-ms"] = spec.deadline  # a bool: not a number, ignored
    return headers or None


def _reply_to(spec: Spec, collector: Collector, direct) -> object:
    kind = spec.reply_to
    return {
        "direct": "amq.rabbitmq.reply-to",
        "exclusive": collector.exclusive,
        "absent": None,
        "empty": "",
        "nowhere": f"fastfib-test-nowhere-{uuid.uuid4().hex}",
        "not-utf8": b"\xff\xfe" + uuid.uuid4().bytes,
        "long": "r" * 255,
        "bare-direct": "amq.rabbitmq.reply-to",
        "service-queue": collector.queue,
        "direct-junk": ("amq.rabbitmq.reply-to." + str(spec.reply_to_value)).encode("utf-8")[:255].decode("utf-8", "ignore"),
        "direct-node": direct.with_node(spec.reply_to_value) if kind == "direct-node" else None,
        "direct-hash": direct.with_node(b"reply@%d" % spec.reply_to_value) if kind == "direct-hash" else None,
        "direct-pid": direct.with_node(direct.node, spec.reply_to_value) if kind == "direct-pid" else None,
    }[kind]


def _correlation_id(kind: str, taken: set) -> object:
    """A correlation id of the kind; the shared ones (absent, empty) at most once per batch, so replies are attributable."""
    if kind in ("absent", "empty") and kind in taken:
        kind = "uuid"
    taken.add(kind)
    tag = uuid.uuid4().hex
    return {
        "uuid": tag,
        "absent": None,
        "empty": "",
        "long": (tag + "c" * 255)[:255],
        "unicode": f"ключ-{tag}-✓",
        "not-utf8": b"\xff" + uuid.uuid4().bytes + os.urandom(4),
    }[kind]


@pytest.mark.timeout(600)
def test_fuzzed_requests_get_exactly_the_protocol_reply_and_the_pool_stays_up(fuzz_pool):
    pool = fuzz_pool
    workers_before = sorted(pool.worker_pids())
    assert len(workers_before) == 2
    direct = learn_direct_reply_to()
    collector = Collector(pool.queue)
    totals = {"sent": 0, "observed": 0, "silent": 0}
    expected_replies: dict[object, int] = {}  # correlation id -> replies expected over the whole run
    started = time.monotonic()

    @settings(max_examples=150, deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(batch=st.lists(specs(), min_size=1, max_size=6))
    def check_batch(batch: list[Spec]) -> None:
        taken: set = set()
        waiting: dict[object, Outcome] = {}
        for key in (None, ""):  # the shared keys are attributable within one batch only
            collector.replies.pop(key, None)
        for spec in batch:
            cid = _correlation_id(spec.correlation, taken)
            headers = _headers(spec)
            reply_to = _reply_to(spec, collector, direct)
            props = pika.BasicProperties(reply_to=reply_to, correlation_id=cid, headers=headers)
            collector.channel.basic_publish("", pool.queue, spec.body, props)
            totals["sent"] += 1
            if spec.reply_to in OBSERVABLE:
                want = expected_outcome(spec.body, headers, MAX_N)
                waiting[props.correlation_id] = want
                if cid not in (None, ""):
                    expected_replies[cid] = 0 if want.no_reply else 1
                totals["observed"] += not want.no_reply
            else:
                totals["silent"] += 1
        deadline = time.monotonic() + 30
        while any(not w.no_reply and not collector.replies.get(k) for k, w in waiting.items()):
            assert time.monotonic() < deadline, (
                f"no reply within 30 s to {[(k, w) for k, w in waiting.items() if not collector.replies.get(k)]}")
            collector.pump(0.02)
        collector.pump(0.05)  # room for a duplicate to show up
        for key, want in waiting.items():
            got = collector.replies.get(key, [])
            assert len(got) == (0 if want.no_reply else 1), f"correlation id {key!r}: {len(got)} replies, want {want}"
            for props, body in got:
                assert want.matches(props.content_type, props.headers, body), (
                    f"correlation id {key!r}: got {props.content_type} {props.headers} {body[:80]!r}; want {want}")

    try:
        check_batch()
        collector.pump(1.0)  # late duplicates, or replies to requests that expired, would show now
        for cid, count in expected_replies.items():
            assert len(collector.replies.get(cid, [])) == count, f"correlation id {cid!r}: want {count} replies"
    finally:
        collector.close()
    elapsed = time.monotonic() - started
    print(f"\nfuzz: {totals['sent']} requests ({totals['observed']} answered and checked, "
          f"{totals['silent']} with an unusable reply_to) in {elapsed:.1f} s")

    # Everything was acknowledged; no worker restarted or lost its connection.
    wait_until(lambda: queue_depth(pool.queue)[0] == 0 and unacked(pool.queue) == 0, 20, what="queue empty")
    assert sorted(pool.worker_pids()) == workers_before
    log = pool.text()
    for bad in ("lost", "restarting", "Traceback", "internal error", "CRITICAL", "ERROR"):
        assert bad not in log, f"{bad!r} in the server log:\n{log[-3000:]}"


@pytest.mark.timeout(120)
def test_direct_reply_to_names_the_broker_cannot_deliver_to_cost_the_worker_nothing(broker_url, broker_has_541_crash):
    """RabbitMQ < 3.10.12 only (the 541 crash; the fixture reads the broker's version).

    Well-formed Direct Reply-to names that RabbitMQ 3.10 would answer by closing the publishing
    connection (541): an unknown node hash, a node atom that is not UTF-8, a pid id or serial out of
    Erlang's range. The worker vets each name with the broker first (on a probe connection of its own)
    and drops those requests; its own connection stays up, and a real client is served throughout."""
    queue = unique("reply-to")
    direct = learn_direct_reply_to()
    h = direct.node.partition(b"@")[2]
    creation = direct.pid_term[-4:]
    poison = [
        direct.with_node(b"reply@%d" % (int(h) + 1)),
        direct.with_node(b"nobody@nowhere"),
        direct.with_node(b"reply\xff@" + h),
        direct.with_node(direct.node, b"\x00\x00\x80\x00" + b"\x00" * 4 + creation),  # id 32768
        direct.with_node(direct.node, b"\x00" * 4 + b"\x00\x00\x20\x00" + creation),  # serial 8192
    ]
    harmless = direct.with_node(direct.node, b"\x00\x00\x00\x07" + b"\x00" * 4 + creation)  # a pid that is no channel
    try:
        with Pool(queue, workers=1) as pool:
            pool.wait_ready()
            (worker,) = pool.worker_pids()
            collector = Collector(queue)
            try:
                for round_ in range(3):  # again and again: the verdicts are cached
                    for name in [*poison, harmless]:
                        collector.channel.basic_publish("", queue, b"30", pika.BasicProperties(reply_to=name))
                    cid = f"ok-{round_}"
                    collector.channel.basic_publish("", queue, b"30", pika.BasicProperties(
                        reply_to="amq.rabbitmq.reply-to", correlation_id=cid))
                    deadline = time.monotonic() + 20
                    while not collector.replies.get(cid):
                        assert time.monotonic() < deadline, "the real client was not answered"
                        collector.pump(0.02)
                    assert collector.replies[cid][0][1] == b"832040"
            finally:
                collector.close()
            wait_until(lambda: queue_depth(queue)[0] == 0 and unacked(queue) == 0, 20, what="queue empty")
            text = pool.text()
            assert "lost" not in text and "reconnecting" not in text, text[-2000:]
            assert pool.worker_pids() == [worker]
            assert "the broker cannot deliver to the Direct Reply-to name" in text  # rate-limited: 1 line per 5 s
    finally:
        delete_queue(queue)
