"""Load-generator processes.

A load process holds one pika ``BlockingConnection`` and consumes from
Direct Reply-to (``amq.rabbitmq.reply-to``). The harness runs it as
``python -m bench.load --url URL`` and drives it over its standard input and
output, one JSON document a line:

    harness -> load   {"cmd": "prepare", "cell": {...}}      load -> harness  {"ready": true}
    harness -> load   {"cmd": "go"}                          load -> harness  {"result": {...}}
    harness -> load   {"cmd": "quit"}

``prepare`` computes the expected replies (so that no verification work falls
into the measurement), ``go`` runs the cell. Splitting the two lets the harness
start all the clients of one cell at the same moment.

Two modes:

- ``seq``: one request at a time; the latency of a round trip.
- ``pipe``: ``window`` requests in flight, a new one sent as each reply comes
  in; the throughput.

Every reply is checked against ``gmpy2.fib`` (or, for the echo server, against
the request body). A wrong reply, an error reply, a reply in a format the cell
forbids, or a reply that never comes (``lost_timeout``) ends the cell at once
with ``{"result": {"ok": false, "error": "..."}}``; the harness then fails the
run. Each cell has a warm-up (time and count) that is verified but not
measured, a measurement window that ends once both ``duration`` seconds and
``min_count`` replies are reached (or ``max_duration`` is), and a drain: the
replies still in flight after the window are awaited and verified, not counted.

The same process can instead measure ``fastfib.FibonacciRpcClient`` (``api:
"client"``) against a bare pika loop doing the same round trip, the two
interleaved: in seq mode ``client.call(n)`` and one bare request alternate call
by call, in pipe mode ``client.call_many(batch)`` and one bare pipelined batch
alternate batch by batch, each pair in turn in the other order. The bare side
then sends what the client sends (a uuid4 correlation id, ``expiration``,
``x-deadline-ms``, ``mandatory``, publisher confirms received asynchronously)
on its own connection. The result carries
the bare side as ``"baseline"``. Measured in the same seconds, the ratio of
the two does not move with the machine's load the way two cells a minute apart
do.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field

import gmpy2
import pika
from hdrh.histogram import HdrHistogram

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
BINARY = "application/octet-stream"
DECIMAL = "text/plain"
CONTENT_TYPES = {"decimal": DECIMAL, "binary": BINARY}

#: Latencies are recorded in microseconds, from 1 us to one hour, 3 significant digits.
HIST_LOW, HIST_HIGH, HIST_DIGITS = 1, 3_600_000_000, 3

#: How the distinct-n workload walks [lo, hi] without repeating: n_i = lo + (A*i + B) mod (hi - lo + 1).
DISTINCT_A = 7_368_787
DISTINCT_B = 104_729
#: Each load process gets a fresh block of indices i for each measurement (each repeat, each
#: server), so that no n is asked twice of one server in a run: a repeat never finds the cache
#: that an earlier repeat filled. 45 blocks fit in [10^5, 10^6].
DISTINCT_BLOCK = 20_000


class CellFailed(Exception):
    """A reply was wrong, an error, or lost: the run must fail."""


def new_histogram() -> HdrHistogram:
    return HdrHistogram(HIST_LOW, HIST_HIGH, HIST_DIGITS)


def fib_binary(f) -> bytes:
    return f.to_bytes((f.bit_length() + 7) // 8 or 1, "big")


def distinct_n(lo: int, hi: int, i: int) -> int:
    span = hi - lo + 1
    if math.gcd(DISTINCT_A, span) != 1:  # pragma: no cover - guarded by the choice of A
        raise ValueError(f"DISTINCT_A must be coprime to the span {span}")
    return lo + (DISTINCT_A * i + DISTINCT_B) % span


class Workload:
    """The sequence of n a cell sends, and how each reply is checked."""

    def __init__(self, spec: dict, fmt: str, check: str):
        self.kind = spec["kind"]
        self.fmt = fmt
        self.check = check  # "fib" or "echo"
        self.spec = spec
        self.i = 0
        # expected[(n, content_type)] = exact reply body
        self.expected: dict[tuple[int, str | None], bytes] = {}
        self.deferred: list[tuple[int, str | None, tuple[int, int]]] = []  # distinct: (n, content_type, digest)
        if self.kind == "fixed":
            self.ns = [int(spec["n"])]
        elif self.kind == "hot":
            self.ns = [int(n) for n in spec["ns"]]
        elif self.kind == "distinct":
            self.lo, self.hi = int(spec["lo"]), int(spec["hi"])
            self.base = int(spec.get("block", 0)) * DISTINCT_BLOCK
            self.ns = []
        else:
            raise ValueError(f"unknown workload kind {self.kind!r}")
        self.bodies = {n: str(n).encode() for n in self.ns}

    def prepare(self) -> None:
        """Compute every expected reply before the measurement starts."""
        if self.check != "fib":
            return
        for n in self.ns:
            f = gmpy2.fib(n)
            self.expected[(n, DECIMAL)] = str(f).encode()
            self.expected[(n, BINARY)] = fib_binary(f)

    def next_n(self) -> int:
        i = self.i
        self.i += 1
        if self.kind == "distinct":
            if i >= DISTINCT_BLOCK:
                raise CellFailed(f"distinct workload ran out of its block of {DISTINCT_BLOCK} values")
            return distinct_n(self.lo, self.hi, self.base + i)
        return self.ns[i % len(self.ns)]

    def body(self, n: int) -> bytes:
        b = self.bodies.get(n)
        return b if b is not None else str(n).encode()

    def verify(self, n: int, props: pika.BasicProperties, body: bytes, request_body: bytes, strict_format: bool) -> None:
        """Raise CellFailed unless ``body`` is the right answer to request n."""
        if self.check == "echo":
            if body != request_body:
                raise CellFailed(f"echo reply {body[:40]!r} is not the request body {request_body!r}")
            return
        headers = props.headers or {}
        if "x-error" in headers:
            raise CellFailed(f"error reply for n={n}: x-error={headers['x-error']!r} body={body[:200]!r}")
        ctype = props.content_type
        if ctype in (None, "", DECIMAL):
            ctype = DECIMAL  # a reply without content_type is decimal text (the tutorial's server)
        elif ctype != BINARY:
            raise CellFailed(f"reply for n={n} has unknown content_type {props.content_type!r}")
        if strict_format and ctype != CONTENT_TYPES[self.fmt]:
            raise CellFailed(f"asked for {self.fmt} for n={n}, got content_type {props.content_type!r}")
        want = self.expected.get((n, ctype))
        if want is not None:
            if body != want:
                raise CellFailed(f"WRONG reply for n={n} ({ctype}): got {_preview(body)}, want {_preview(want)}")
            return
        if self.kind != "distinct":
            raise CellFailed(f"reply for unexpected n={n}")
        # distinct n: too many values to precompute; keep a digest, check after the window.
        self.deferred.append((n, ctype, _digest(body)))

    def verify_deferred(self) -> int:
        for n, ctype, digest in self.deferred:
            f = gmpy2.fib(n)
            want = fib_binary(f) if ctype == BINARY else str(f).encode()
            if _digest(want) != digest:
                raise CellFailed(f"WRONG reply for n={n} ({ctype}): its digest does not match gmpy2.fib({n})")
        k = len(self.deferred)
        self.deferred.clear()
        return k


def _digest(body: bytes) -> tuple[int, int]:
    """The length and the 64-bit SipHash of ``body`` (Python's ``hash``, keyed per process).

    Not a cryptographic digest: the check runs in the load process, on the cores
    the servers share, so it is the cheapest that still catches a wrong reply
    (the costs: docs/benchmarks.md).
    """
    return len(body), hash(body)


def _preview(b: bytes) -> str:
    return repr(b) if len(b) <= 40 else f"{b[:20]!r}...{b[-12:]!r} ({len(b)} bytes)"


@dataclass
class Stats:
    hist: HdrHistogram = field(default_factory=new_histogram)
    count: int = 0  # replies received inside the measurement window
    verified: int = 0  # every verified reply: warm-up, window and drain
    stray: int = 0  # replies with an unknown or repeated correlation id (dropped)
    t0: float = 0.0  # window start (time.time())
    t1: float = 0.0  # window end
    cpu0: tuple = ()
    cpu1: tuple = ()
    min_count_reached: bool = True
    busy_ns: int | None = None  # interleaved cells: the time spent on this side's requests only
    extra: dict = field(default_factory=dict)

    def result(self) -> dict:
        elapsed = max(self.t1 - self.t0 if self.busy_ns is None else self.busy_ns / 1e9, 1e-9)
        return {
            "ok": True,
            "count": self.count,
            "verified": self.verified,
            "stray": self.stray,
            "t_start": self.t0,
            "t_end": self.t1,
            "elapsed": elapsed,
            "throughput": self.count / elapsed,
            "hist": self.hist.encode().decode("ascii") if self.hist.get_total_count() else None,
            "cpu_user": self.cpu1[0] - self.cpu0[0],
            "cpu_system": self.cpu1[1] - self.cpu0[1],
            "min_count_reached": self.min_count_reached,
            "pid": os.getpid(),
            **({"busy_s": self.busy_ns / 1e9} if self.busy_ns is not None else {}),
            **self.extra,
        }


class Window:
    """When the warm-up ends, when the measurement ends."""

    def __init__(self, cell: dict):
        self.warmup = float(cell.get("warmup", 0.5))
        self.warmup_count = int(cell.get("warmup_count", 1))
        self.duration = float(cell.get("duration", 2.0))
        self.min_count = int(cell.get("min_count", 1))
        self.max_duration = float(cell.get("max_duration", self.duration + 30.0))
        self.start = time.perf_counter()
        self.measuring_since: float | None = None
        self.done = False

    def tick(self, stats: Stats, replies: int) -> bool:
        """Called after each reply (``replies`` counts them all); True while the reply counts."""
        now = time.perf_counter()
        if self.measuring_since is None:
            if now - self.start >= self.warmup and replies >= self.warmup_count:
                self.measuring_since = now
                stats.t0 = time.time()
                stats.cpu0 = os.times()[:2]
            return False
        stats.count += 1
        elapsed = now - self.measuring_since
        if (elapsed >= self.duration and stats.count >= self.min_count) or elapsed >= self.max_duration:
            stats.min_count_reached = stats.count >= self.min_count
            self.finish(stats)
        return True

    def finish(self, stats: Stats) -> None:
        if not self.done:
            self.done = True
            stats.t1 = time.time()
            stats.cpu1 = os.times()[:2]

    def overdue(self) -> bool:
        """The warm-up never ended (nothing came back): give up after max_duration."""
        return time.perf_counter() - self.start > self.warmup + self.max_duration


class LoadClient:
    def __init__(self, url: str):
        self.url = url
        self.connection: pika.BlockingConnection | None = None
        self.channel = None
        self.on_reply = None
        self.returned: str | None = None  # a mandatory request the broker returned
        self.server_properties: dict = {}

    def connect(self, confirms: bool = False) -> None:
        if self.connection is not None and self.connection.is_open:
            return
        params = pika.URLParameters(self.url)
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        if confirms:  # like the client: pipelined, acks taken as they come (the blocking API waits for each)
            selected: list = []
            self.channel._impl.confirm_delivery(ack_nack_callback=lambda frame: None, callback=selected.append)
            while not selected:
                self.connection.process_data_events(0.05)
        self.channel.basic_consume(DIRECT_REPLY_TO, self._dispatch, auto_ack=True)
        self.channel.add_on_return_callback(self._on_return)
        try:
            self.server_properties = plain(self.connection._impl.server_properties or {})
        except Exception:
            self.server_properties = {}

    def _dispatch(self, ch, method, props, body):
        self.on_reply(props, body)

    def close(self) -> None:
        if self.connection is not None and self.connection.is_open:
            try:
                self.connection.close()
            except Exception:
                pass

    # --- the two bare pika modes --------------------------------------------------------

    def run(self, cell: dict, workload: Workload) -> dict:
        if cell.get("api", "pika") == "aio":
            from .aio_load import run_aio_cell

            return run_aio_cell(self.url, cell, workload.ns[0])
        if cell.get("api", "pika") == "client":
            self.close()  # a channel of its own in confirm mode, closed after the cell
            self.connect(confirms=True)
            try:
                return self._run_paired(cell, workload)
            finally:
                self.close()
                self.connection = None
        self.connect()
        if cell["mode"] == "seq":
            stats = self._run_seq(cell, workload)
        else:
            stats = self._run_pipe(cell, workload)
        workload.verify_deferred()  # raises on a wrong reply; each was counted in verified when it arrived
        return stats.result()

    def _props(self, fmt: str, like_client: float | None = None):
        """A function correlation id -> the request's properties.

        With ``like_client`` (a timeout in seconds), the properties that
        ``FibonacciRpcClient`` sends with that timeout: ``accept`` always,
        ``expiration`` and ``x-deadline-ms``.
        """
        if like_client is not None:
            expiration = str(int(like_client * 1000))
            accept_value = CONTENT_TYPES[fmt]

            def make_like_client(cid: str) -> pika.BasicProperties:
                deadline_ms = int((time.time() + like_client) * 1000)
                return pika.BasicProperties(reply_to=DIRECT_REPLY_TO, correlation_id=cid, expiration=expiration,
                                            headers={"accept": accept_value, "x-deadline-ms": deadline_ms})

            return make_like_client
        accept = {"accept": BINARY} if fmt == "binary" else None  # decimal: no header, like the tutorial's client

        def make(cid: str) -> pika.BasicProperties:
            return pika.BasicProperties(reply_to=DIRECT_REPLY_TO, correlation_id=cid, headers=accept)

        return make

    def _round_trip(self, queue: str, make_props, new_cid, lost_timeout: float, stats: Stats, mandatory: bool = False):
        """A function (n, body) -> (t_send_ns, t_recv_ns, props, body): one request, its reply awaited.

        ``t_recv_ns`` is taken in the reply's callback. A reply with another
        correlation id counts as stray; a returned (unroutable) request fails the cell.
        """
        publish, conn = self.channel.basic_publish, self.connection
        state = {"cid": None, "reply": None}

        def on_reply(props, body):
            if props.correlation_id != state["cid"] or state["reply"] is not None:
                stats.stray += 1
                return
            state["reply"] = (time.perf_counter_ns(), props, body)

        self.on_reply = on_reply

        def one(n: int, body: bytes):
            cid = state["cid"] = new_cid()
            state["reply"] = None
            props = make_props(cid)
            t_send = time.perf_counter_ns()
            publish("", queue, body, props, mandatory)
            deadline = time.perf_counter() + lost_timeout
            while state["reply"] is None:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise CellFailed(f"LOST reply: no answer for n={n} (correlation_id {cid}) within {lost_timeout:g} s")
                conn.process_data_events(time_limit=min(left, 1.0))
                self._check_returned()
            t_recv, rprops, rbody = state["reply"]
            return t_send, t_recv, rprops, rbody

        return one

    def _on_return(self, ch, method, props, body) -> None:
        self.returned = f"{method.reply_code} {method.reply_text} (correlation_id {props.correlation_id})"

    def _check_returned(self) -> None:
        if self.returned is not None:
            raise CellFailed(f"UNROUTABLE request: the broker returned it: {self.returned}")

    def _run_seq(self, cell: dict, workload: Workload) -> Stats:
        stats, win = Stats(), Window(cell)
        queue, strict = cell["queue"], bool(cell.get("strict_format", True))
        counter = iter(range(1, 1 << 62))
        one = self._round_trip(queue, self._props(workload.fmt), lambda: format(next(counter), "x"),
                               float(cell.get("lost_timeout", 30.0)), stats)
        replies = 0
        while not win.done:
            if win.measuring_since is None and win.overdue():
                raise CellFailed("warm-up never completed")
            n = workload.next_n()
            body = workload.body(n)
            t_send, t_recv, rprops, rbody = one(n, body)
            workload.verify(n, rprops, rbody, body, strict)
            stats.verified += 1
            replies += 1
            if win.tick(stats, replies):
                stats.hist.record_value(max(1, (t_recv - t_send) // 1000))
        return stats

    def _run_pipe(self, cell: dict, workload: Workload) -> Stats:
        stats, win = Stats(), Window(cell)
        queue, strict = cell["queue"], bool(cell.get("strict_format", True))
        window = int(cell.get("window", 32))
        lost_timeout = float(cell.get("lost_timeout", 30.0))
        make_props = self._props(workload.fmt)
        publish, conn = self.channel.basic_publish, self.connection
        pending: dict[str, tuple[int, int, bytes]] = {}  # cid -> (t_send_ns, n, request body)
        counter = [0, 0]  # sent, replies
        failure: list[BaseException] = []
        record = stats.hist.record_value

        def send() -> None:
            n = workload.next_n()
            body = workload.body(n)
            counter[0] += 1
            cid = format(counter[0], "x")
            pending[cid] = (time.perf_counter_ns(), n, body)
            publish("", queue, body, make_props(cid))

        def on_reply(props, body):
            t_recv = time.perf_counter_ns()
            entry = pending.pop(props.correlation_id, None)
            if entry is None:
                stats.stray += 1
                return
            if failure:
                return
            t_send, n, request_body = entry
            try:
                workload.verify(n, props, body, request_body, strict)
            except CellFailed as exc:
                failure.append(exc)
                return
            stats.verified += 1
            counter[1] += 1
            if win.tick(stats, counter[1]):
                record(max(1, (t_recv - t_send) // 1000))
            if not win.done:
                try:
                    send()
                except CellFailed as exc:
                    failure.append(exc)

        self.on_reply = on_reply
        for _ in range(window):
            send()
        last_progress, last_replies = time.perf_counter(), 0
        while pending and not failure:
            conn.process_data_events(time_limit=0.25)
            now = time.perf_counter()
            if counter[1] != last_replies:
                last_progress, last_replies = now, counter[1]
            elif now - last_progress > lost_timeout:
                lost = sorted(pending.items())[:3]
                raise CellFailed(
                    f"LOST replies: {len(pending)} requests unanswered for {lost_timeout:g} s, e.g. "
                    + ", ".join(f"n={n} (correlation_id {cid})" for cid, (_, n, _) in lost)
                )
            if win.measuring_since is None and win.overdue():
                raise CellFailed("warm-up never completed")
        if failure:
            raise failure[0]
        win.finish(stats)
        return stats

    def _pipe_batch(self, queue: str, bodies: list[bytes], window: int, make_props, lost_timeout: float,
                    stats: Stats) -> tuple[int, list]:
        """Every body sent, ``window`` in flight, mandatory like the client: (nanoseconds, [(props, body)] in order)."""
        publish, conn = self.channel.basic_publish, self.connection
        total = len(bodies)
        replies: list = [None] * total
        pending: dict[str, int] = {}
        sent_got = [0, 0]

        def send() -> None:
            i = sent_got[0]
            sent_got[0] += 1
            cid = uuid.uuid4().hex
            pending[cid] = i
            publish("", queue, bodies[i], make_props(cid), True)

        def on_reply(props, body):
            i = pending.pop(props.correlation_id, None)
            if i is None:
                stats.stray += 1
                return
            replies[i] = (props, body)
            sent_got[1] += 1
            if sent_got[0] < total:
                send()

        self.on_reply = on_reply
        t0 = time.perf_counter_ns()
        for _ in range(min(window, total)):
            send()
        last_progress, last_got = time.perf_counter(), 0
        while sent_got[1] < total:
            conn.process_data_events(time_limit=0.25)
            self._check_returned()
            now = time.perf_counter()
            if sent_got[1] != last_got:
                last_progress, last_got = now, sent_got[1]
            elif now - last_progress > lost_timeout:
                raise CellFailed(f"LOST replies: {len(pending)} requests unanswered for {lost_timeout:g} s")
        return time.perf_counter_ns() - t0, replies

    def _run_paired(self, cell: dict, workload: Workload) -> dict:
        """``FibonacciRpcClient`` and the bare loop doing the same round trip, interleaved
        (see the module docstring). The client's result, with the bare side's as ``"baseline"``."""
        from fastfib.client import FibonacciRpcClient

        queue, strict = cell["queue"], bool(cell.get("strict_format", True))
        lost_timeout = float(cell.get("lost_timeout", 30.0))
        make_props = self._props(workload.fmt, like_client=lost_timeout)
        mine, bare, win = Stats(busy_ns=0), Stats(busy_ns=0), Window(cell)
        # Each side's own CPU time (this process, all threads) over its own requests in the window.
        mine.extra["side_cpu_s"] = bare.extra["side_cpu_s"] = 0.0
        cpu = time.process_time
        expected = {n: int(gmpy2.fib(n)) for n in workload.ns}
        clock = time.perf_counter_ns
        with FibonacciRpcClient(self.url, queue=queue, timeout=lost_timeout, format=workload.fmt) as client:
            rounds = replies = 0
            if cell["mode"] == "seq":
                call = client.call
                one = self._round_trip(queue, make_props, lambda: uuid.uuid4().hex, lost_timeout, bare, mandatory=True)
                while not win.done:
                    if win.measuring_since is None and win.overdue():
                        raise CellFailed("warm-up never completed")
                    n = workload.next_n()
                    body = workload.body(n)
                    # Both sides are timed the same way: from before the call to the reply in hand.
                    for side in ((0, 1) if rounds % 2 == 0 else (1, 0)):
                        c0 = cpu()
                        t0 = clock()
                        if side == 0:
                            value = call(n)
                            dt_mine = clock() - t0
                            cpu_mine = cpu() - c0
                        else:
                            _, _, rprops, rbody = one(n, body)
                            dt_bare = clock() - t0
                            cpu_bare = cpu() - c0
                    rounds += 1
                    if value != expected[n]:
                        raise CellFailed(f"WRONG value from FibonacciRpcClient.call({n})")
                    workload.verify(n, rprops, rbody, body, strict)
                    mine.verified += 1
                    bare.verified += 1
                    if win.tick(mine, rounds):
                        bare.count += 1
                        mine.hist.record_value(max(1, dt_mine // 1000))
                        bare.hist.record_value(max(1, dt_bare // 1000))
                        mine.busy_ns += dt_mine
                        bare.busy_ns += dt_bare
                        mine.extra["side_cpu_s"] += cpu_mine
                        bare.extra["side_cpu_s"] += cpu_bare
            else:
                # call_many returns only when a whole batch is back: the warm-up and the window
                # are checked between batches, and a batch counts when it ends inside the window.
                window = int(cell.get("window", 32))
                chunk = int(cell.get("chunk", 512))
                while not win.done:
                    if win.measuring_since is None and win.overdue():
                        raise CellFailed("warm-up never completed")
                    ns = [workload.next_n() for _ in range(chunk)]
                    bodies = [workload.body(n) for n in ns]
                    for side in ((0, 1) if rounds % 2 == 0 else (1, 0)):
                        c0 = cpu()
                        if side == 0:
                            t0 = clock()
                            values = client.call_many(ns, window=window)
                            dt_mine = clock() - t0
                            cpu_mine = cpu() - c0
                        else:
                            dt_bare, bare_replies = self._pipe_batch(queue, bodies, window, make_props, lost_timeout, bare)
                            cpu_bare = cpu() - c0
                    rounds += 1
                    if len(values) != len(ns) or any(v != expected[n] for n, v in zip(ns, values, strict=True)):
                        raise CellFailed("WRONG or missing values from FibonacciRpcClient.call_many")
                    for n, body, (rprops, rbody) in zip(ns, bodies, bare_replies, strict=True):
                        workload.verify(n, rprops, rbody, body, strict)
                    mine.verified += chunk
                    bare.verified += chunk
                    replies += chunk
                    if win.measuring_since is not None:  # tick() below counts the batch's last reply
                        mine.count += chunk - 1
                        bare.count += chunk
                        mine.busy_ns += dt_mine
                        bare.busy_ns += dt_bare
                        mine.extra["side_cpu_s"] += cpu_mine
                        bare.extra["side_cpu_s"] += cpu_bare
                    win.tick(mine, replies)
                mine.extra["chunk"] = bare.extra["chunk"] = chunk
        win.finish(mine)
        # One process ran both sides: the window and the CPU times are the pair's.
        bare.t0, bare.t1, bare.cpu0, bare.cpu1 = mine.t0, mine.t1, mine.cpu0, mine.cpu1
        bare.min_count_reached = mine.min_count_reached
        result = mine.result()
        result["baseline"] = bare.result()
        # the CPU times are the pair's: they are divided by the replies of both sides
        result["pair_verified"] = result["baseline"]["pair_verified"] = mine.verified + bare.verified
        return result


def plain(value):
    """Server properties and the like as JSON-able values."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def serve_stdio(url: str) -> int:
    """The load process's command loop (see the module docstring)."""
    out = sys.stdout
    client = LoadClient(url)
    cell = workload = None

    def say(doc: dict) -> None:
        out.write(json.dumps(doc) + "\n")
        out.flush()

    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        cmd = msg.get("cmd")
        try:
            if cmd == "prepare":
                cell = msg["cell"]
                workload = Workload(cell["workload"], cell.get("format", "decimal"), cell.get("check", "fib"))
                workload.prepare()
                client.connect()
                say({"ready": True, "server_properties": client.server_properties})
            elif cmd == "go":
                say({"result": client.run(cell, workload)})
            elif cmd == "quit":
                break
            else:
                say({"result": {"ok": False, "error": f"unknown command {cmd!r}"}})
        except CellFailed as exc:
            say({"ready": False, "result": {"ok": False, "error": str(exc)}})
            client.close()  # unanswered replies must not leak into the next cell
            client = LoadClient(url)
        except Exception as exc:  # a crash is a failure too, with its traceback on stderr
            traceback.print_exc()
            say({"ready": False, "result": {"ok": False, "error": f"{type(exc).__name__}: {exc}"}})
            client.close()
            client = LoadClient(url)
    client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description="benchmark load process (driven by the harness)")
    parser.add_argument("--url", default="amqp://guest:guest@localhost:5672/%2F")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return serve_stdio(args.url)


if __name__ == "__main__":
    sys.exit(main())
