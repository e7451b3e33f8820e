"""Abuse bounds (issue 6, part 6): body size, maximum n, deadlines, and a flood of max-n requests.

The flood tests print how long small requests wait behind a flood of
F(10^6) requests, with the default prefetch (64) and with prefetch 1, and
check the model that docs/reliability.md states by the order of events (which
reply came first, what the queue still held), not by durations:

- within a worker, small n are computed on the I/O thread while the compute
  thread works through the large ones, so a small request that reaches a
  worker is answered in milliseconds, flood or not;
- the queue is FIFO: a small request reaches a worker only once fewer than
  ``workers x prefetch`` requests are ahead of it. With prefetch 1 it waits
  for (nearly) the whole flood.
"""

from __future__ import annotations

import json
import statistics
import threading
import time

import pytest
from _fault_helpers import (
    Pool,
    RpcClient,
    fib_body,
    queue_depth,
    unacked,
    wait_until,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

WORKERS = 2


def _error(reply) -> tuple[str, str]:
    props, body = reply
    assert props.content_type == "application/json"
    doc = json.loads(body)
    assert props.headers["x-error"] == doc["error"]
    return doc["error"], doc["message"]


@pytest.mark.timeout(120)
def test_body_size_max_n_and_deadlines_are_enforced(queue):
    with Pool(queue, "--max-n", "1000", workers=WORKERS) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        # Body size: 64 bytes are read (whitespace and leading zeros included), 65 are not.
        assert client.call(b" " * 60 + b"1000")[1] == fib_body(1000, "decimal")
        assert client.call(b"0" * 61 + b"999")[1] == fib_body(999, "decimal")
        for body in (b" " * 61 + b"1000", b"0" * 62 + b"999", b"1" * 65, b"7" * (1 << 20)):
            kind, message = _error(client.call(body))
            assert kind == "invalid_argument" and "64" in message, (len(body), message)
        # Maximum n: the configured one, named in the message.
        assert client.call(b"1000", headers={"accept": "application/octet-stream"})[1] == fib_body(1000, "binary")
        for body in (b"1001", b"1000000", b"9" * 64):
            kind, message = _error(client.call(body))
            assert kind == "out_of_range" and "1000" in message
        # Deadlines: 300 requests already past theirs are acknowledged without an answer;
        # a request with a future deadline is answered as usual.
        past = int(time.time() * 1000) - 1
        expired = [client.publish(b"500", headers={"x-deadline-ms": past}) for _ in range(300)]
        assert client.call(b"10", headers={"x-deadline-ms": int(time.time() * 1000) + 60_000})[1] == b"55"
        client.drain(1.0)
        assert not any(client.replies.get(cid) for cid in expired), "a request past its deadline was answered"
        wait_until(lambda: queue_depth(queue)[0] == 0 and unacked(queue) == 0, 20, what="the queue empty")
        assert pool.worker_pids() and "Traceback" not in pool.text()


class _TimedClient(RpcClient):
    """An RpcClient that notes when each reply arrived (monotonic time)."""

    def __init__(self, queue: str) -> None:
        super().__init__(queue)
        self.arrived: dict[str, float] = {}

    def _on_reply(self, ch, method, props, body) -> None:
        self.arrived.setdefault(props.correlation_id, time.monotonic())
        super()._on_reply(ch, method, props, body)


def _flood_and_probe(queue: str, prefetch: int, flood: int, probes: int = 20) -> dict:
    """Publish ``flood`` distinct F(~10^6) decimal requests, then time ``probes`` sequential F(20) calls.

    The flood's replies are read by a thread of their own (the flooder's
    connection is used by that thread only), so that each reply's arrival
    time is known.
    """
    with Pool(queue, "--prefetch", str(prefetch), "--cache-bytes", "0", workers=WORKERS) as pool, \
            _TimedClient(queue) as flooder, RpcClient(queue) as prober:
        pool.wait_ready()
        started = time.monotonic()
        big = [flooder.publish(b"%d" % (1_000_000 - i), headers={"accept": "text/plain"}) for i in range(flood)]
        # A round trip on the flood's channel: the broker has queued the whole flood before the
        # first probe is published on another connection (two connections are not ordered).
        flooder.channel.queue_declare(queue, passive=True)

        def pump() -> None:
            deadline = time.monotonic() + 300
            while len(flooder.arrived) < flood and time.monotonic() < deadline:
                flooder.connection.process_data_events(time_limit=0.02)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        latencies, answered_at, ready_at_first = [], [], None
        for _ in range(probes):
            t0 = time.monotonic()
            assert prober.call(b"20", timeout=120)[1] == b"6765"
            answered_at.append(time.monotonic())
            latencies.append(answered_at[-1] - t0)
            if ready_at_first is None:
                ready_at_first = queue_depth(queue)[0]  # flood requests not yet handed to a worker
        reader.join(310)
        assert len(flooder.arrived) == flood, "the flood was not answered"
        flood_took = max(flooder.arrived.values()) - started
        assert flooder.replies[big[0]][0][1] == fib_body(1_000_000, "decimal")
        assert "lost" not in pool.text()
    return {
        "prefetch": prefetch, "flood": flood, "first": latencies[0], "p50": statistics.median(latencies),
        "max": max(latencies), "flood_took": flood_took, "probes_done": answered_at[-1] - started,
        "flood_done_at_first_probe": sum(1 for t in flooder.arrived.values() if t <= answered_at[0]),
        "flood_done_at_last_probe": sum(1 for t in flooder.arrived.values() if t <= answered_at[-1]),
        "ready_at_first_probe": ready_at_first,
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("prefetch", "flood"), [(64, 120), (1, 120), (64, 400)],
                         ids=["prefetch64-flood120", "prefetch1-flood120", "prefetch64-flood400"])
def test_how_long_small_requests_wait_behind_a_flood_of_max_n_requests(queue, prefetch, flood):
    r = _flood_and_probe(queue, prefetch=prefetch, flood=flood)
    window = WORKERS * prefetch
    print(f"\nflood: workers {WORKERS}, prefetch {prefetch}, {flood} x F(~10^6) decimal took {r['flood_took']:.2f} s; "
          f"the first F(20) call waited {r['first'] * 1000:.0f} ms ({r['flood_done_at_first_probe']} of the flood "
          f"answered by then), p50 of 20 calls {r['p50'] * 1000:.1f} ms, max {r['max'] * 1000:.0f} ms")
    if flood <= window:
        # Every request reaches a worker at once; small ones are served on the I/O thread meanwhile,
        # overtaking the large ones that the workers already hold.
        assert r["flood_done_at_last_probe"] < flood, "the small calls should finish while the flood is computed"
        assert r["flood_done_at_first_probe"] < flood // 2, r
    else:
        # FIFO queue: the first small request reaches a worker only once the whole flood ahead of it
        # has been handed to the workers, so when it is answered none of the flood is left in the queue
        # (had it jumped the line, about flood - window requests would still be there).
        assert r["ready_at_first_probe"] == 0, r
        if prefetch > 1:
            # Once through, it overtakes the up to workers x prefetch large requests that the workers hold:
            # the small calls finish while the flood is still computed.
            assert r["flood_done_at_last_probe"] < flood, r
