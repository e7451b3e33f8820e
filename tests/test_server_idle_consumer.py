"""Worker 0's idle consumer (docs/server.md, "The idle consumer").

In a pool of several workers, worker 0 holds a second consumer with
prefetch 1 and a higher consumer priority. Requests sent one at a time all
reach that worker; pipelined requests still spread over every worker.
"""

from __future__ import annotations

import pytest
from _ops_helpers import ServePool, scrape, value, wait_until
from _server_helpers import RpcClient, rabbitmqctl

from fastfib.server.settings import IDLE_PREFETCH, IDLE_PRIORITY

pytestmark = [pytest.mark.broker]


def _consumers(queue: str) -> list[tuple[str, str]]:
    """(prefetch, arguments) of each consumer of ``queue``, sorted."""
    rows = [line.split("\t") for line in rabbitmqctl("list_consumers", "queue_name", "prefetch_count",
                                                     "arguments").splitlines()]
    return sorted((row[1], row[2]) for row in rows if len(row) == 3 and row[0] == queue)


def _served(base: str, worker: int) -> float:
    return value(scrape(base), "fastfib_requests_total", outcome="ok", worker=str(worker))


@pytest.mark.timeout(120)
def test_requests_one_at_a_time_reach_worker_0_and_a_pipeline_reaches_both(queue):
    with ServePool.on(queue, "--metrics-port", "0", workers=2) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        rows = wait_until(lambda: [r for r in [_consumers(queue)] if len(r) == 3 and r], 15)
        rows = rows[0] if rows else None
        assert rows, _consumers(queue)
        plain = [r for r in rows if "x-priority" not in r[1]]
        idle = [r for r in rows if "x-priority" in r[1]]
        assert [p for p, _ in plain] == ["64", "64"]
        assert len(idle) == 1 and idle[0][0] == str(IDLE_PREFETCH) and str(IDLE_PRIORITY) in idle[0][1], rows

        base = pool.metrics_url()
        for _ in range(40):
            assert client.call(b"20")[1] == b"6765"
        assert wait_until(lambda: _served(base, 0) == 40, 10), (_served(base, 0), _served(base, 1))
        assert _served(base, 1) == 0

        cids = client.run([b"20"] * 400, window=32)
        assert all(client.replies[c][0][1] == b"6765" for c in cids)
        assert wait_until(lambda: _served(base, 0) + _served(base, 1) == 440, 10)
        assert _served(base, 1) > 0, "the pipelined requests must reach worker 1 too"


@pytest.mark.timeout(60)
def test_a_single_worker_has_one_consumer(queue):
    with ServePool.on(queue, workers=1) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        assert client.call(b"20")[1] == b"6765"
        assert [p for p, _ in _consumers(queue)] == ["64"]
