"""``fastfib serve`` configured from the environment, logging JSON, failing over past a node that
refuses connections, and running without prometheus_client: against the real broker.
"""

from __future__ import annotations

import json
import signal

import pytest
from _ops_helpers import RefusingPort, ServePool, blocked_prometheus_path, clean_env, queue_row
from _server_helpers import URL, RpcClient, rabbitmqctl

pytestmark = [pytest.mark.broker]


@pytest.mark.timeout(90)
def test_environment_configures_the_pool_flags_win_and_logs_are_json(queue):
    with RefusingPort() as refusing:
        env = clean_env(
            FASTFIB_QUEUE=queue, FASTFIB_WORKERS="1", FASTFIB_PREFETCH="7", FASTFIB_LOG_FORMAT="json",
            # Two nodes, the first refusing, and a password that must never be logged.
            FASTFIB_URL=f"{refusing.url('s3cret-pw')} {URL}",
        )
        with ServePool(["--workers", "2"], env, workers=2) as pool, RpcClient(queue) as client:
            pool.wait_ready()
            assert client.call(b"30")[1] == b"832040"
            consumers = [line.split("\t") for line in rabbitmqctl("list_consumers", "queue_name",
                                                                   "prefetch_count").splitlines()]
            # env prefetch, 2 workers (flag), and worker 0's idle consumer (prefetch 1)
            assert sorted(p for q, p in consumers if q == queue) == ["1", "7", "7"]
            # The default queue is the current tutorial's (issue 14): durable, quorum.
            row = queue_row(queue)
            assert row[1:3] == ["true", "quorum"] and '"x-queue-type","quorum"' in row[3], row
            pool.signal(signal.SIGTERM)
            assert pool.wait(60) == 0
        text = pool.text()
    assert "s3cret-pw" not in text and "guest:guest" not in text
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is one object
    for e in entries:
        assert {"time", "level", "logger", "message", "process", "worker", "pid"} <= e.keys()
        assert isinstance(e["pid"], int) and e["time"].endswith("Z")
    assert any(e["worker"] is None and e["message"].startswith(f"starting 2 worker(s) on queue '{queue}'")
               and "prefetch 7" in e["message"] for e in entries)
    # what fastfib.gmp_dispatch did, once in each worker, as it started
    gmp = [e for e in entries if e["message"].startswith("GMP code: ")]
    assert sorted(e["worker"] for e in gmp) == [0, 1] and {e["logger"] for e in gmp} == {"fastfib.server.compute"}, gmp
    assert "not chosen yet" not in gmp[0]["message"]
    assert {e["worker"] for e in entries if e["logger"] == "fastfib.server.lifecycle"} == {0, 1}
    refused = [e for e in entries if "cannot connect to" in e["message"]]
    assert refused and refused[0]["level"] == "WARNING" and refused[0]["worker"] == 0
    assert f"amqp://guest:***@127.0.0.1:{refusing.port}/" in refused[0]["message"]
    assert any(e["message"] == "pool stopped (exit code 0)" for e in entries)


@pytest.mark.timeout(90)
def test_failover_when_the_first_url_refuses_connections(queue):
    with RefusingPort() as refusing:
        args = ("--url", refusing.url("hidden-pw"), "--url", URL)
        with ServePool.on(queue, *args, workers=2, url=None) as pool, RpcClient(queue) as client:
            pool.wait_ready(timeout=30)
            cids = client.run([b"25"] * 200, window=32)
            assert all(client.replies[c][0][1] == b"75025" for c in cids)
            text = pool.text()
    # Worker 0 starts on the first URL, is refused, and moves to the next node at once.
    assert f"cannot connect to amqp://guest:***@127.0.0.1:{refusing.port}/%2F" in text
    assert "hidden-pw" not in text
    assert text.count("consuming from queue") == 2 and "127.0.0.1:5672" in text


@pytest.mark.timeout(60)
def test_pool_runs_without_prometheus_client(queue, tmp_path):
    # prometheus_client made unimportable: without --metrics-port nothing imports it.
    env = clean_env(PYTHONPATH=blocked_prometheus_path(tmp_path))
    with ServePool.on(queue, workers=1, env=env) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        assert client.call(b"12")[1] == b"144"
        assert "blocked by the test" not in pool.text()
