"""``fastfib serve`` under faults, against the real broker: a worker killed with
-9 under load, SIGTERM under load, a tutorial server on the same queue, the
broker going away (connections closed by the broker, a cut network through a
proxy, a cluster node lost), the queue deleted, credentials and permissions
refused, and heartbeats during a long computation.

Every test has a queue of its own; every pool is killed (its whole process
group) in the teardown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import gmpy2
import pytest
from _net import TcpProxy
from _server_helpers import (
    ROOT,
    URL,
    WIRES,
    Pool,
    RpcClient,
    close_worker_connections,
    delete_queue,
    queue_depth,
    rabbitmqctl,
)

import fastfib

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(autouse=True, params=WIRES)
def wire(request, monkeypatch):
    """Every test here runs on both wires (``fastfib serve`` reads FASTFIB_WIRE)."""
    monkeypatch.setenv("FASTFIB_WIRE", request.param)
    return request.param


def expected(body: bytes) -> bytes:
    return str(gmpy2.fib(int(body))).encode()


def check_all_answered(client: RpcClient, cids: dict[str, bytes]) -> int:
    """Every request got a correct answer; returns how many correlation ids were answered more than once."""
    duplicates = 0
    for cid, body in cids.items():
        replies = client.replies.get(cid)
        assert replies, f"request {cid} ({body!r}) never answered"
        assert all(reply == expected(body) for _, reply in replies)
        duplicates += len(replies) > 1
    return duplicates


def run_in_thread(fn, *args, **kw):
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def finish(thread, result, timeout):
    thread.join(timeout)
    assert not thread.is_alive(), "the load did not finish in time"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.timeout(120)
def test_kill_9_of_a_worker_under_load_loses_nothing(queue):
    bodies = [str(n).encode() for n in ([20, 500, 3000, 15000] * 1000)]
    with Pool(queue, "--prefetch", "32") as pool, RpcClient(queue) as client:
        pool.wait_ready()
        thread, result = run_in_thread(client.run, bodies, window=32, timeout=90)
        time.sleep(0.5)
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        cids = finish(thread, result, 100)
        check_all_answered(client, cids)
        assert len(cids) == len(bodies)
        pool.wait_ready(count=2, timeout=30)  # "all 2 workers consuming again"
        assert f"pid {victim}) was killed by SIGKILL" in pool.text()
        assert "restarting it in" in pool.text()
        assert victim not in pool.worker_pids() and len(pool.worker_pids()) == 2


@pytest.mark.timeout(120)
def test_sigterm_under_load_loses_nothing_and_a_new_pool_drains_the_rest(queue):
    bodies = [str(n).encode() for n in ([20, 700, 12000, 30000] * 800)]
    with RpcClient(queue) as client:
        with Pool(queue, "--prefetch", "64") as pool:
            pool.wait_ready()
            thread, result = run_in_thread(client.run, bodies, window=32, timeout=90)
            # Stop once the load is under way: a fixed sleep let a fast machine finish it first.
            deadline = time.monotonic() + 30
            while len(client.replies) < len(bodies) // 10:
                if "error" in result:
                    raise result["error"]
                assert thread.is_alive(), "the load finished before a tenth of it was answered"
                assert time.monotonic() < deadline, "the load did not get under way"
                time.sleep(0.005)
            pool.signal(signal.SIGTERM)
            assert pool.wait(30) == 0
            text = pool.text()
            assert "pool stopped (exit code 0)" in text
            assert text.count("worker stopped (exit code 0)") == 2
        assert thread.is_alive(), "the load finished before the stop: make it longer"
        ready, consumers = queue_depth(queue)
        assert consumers == 0 and ready > 0  # the unanswered requests wait in the queue
        with Pool(queue) as pool:
            pool.wait_ready()
            cids = finish(thread, result, 100)
        check_all_answered(client, cids)
        assert len(cids) == len(bodies)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_idle_pool_stops_cleanly(queue, sig):
    with Pool(queue, workers=3) as pool:
        pool.wait_ready()
        workers = pool.worker_pids()
        assert len(workers) == 3
        pool.signal(sig)
        assert pool.wait(30) == 0
        for pid in workers:
            assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


@pytest.mark.timeout(60)
def test_workers_stop_when_the_supervisor_is_killed(queue):
    with Pool(queue) as pool:
        pool.wait_ready()
        workers = pool.worker_pids()
        os.kill(pool.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_tutorial_server_and_fastfib_serve_the_same_queue(queue):
    tutorial = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_server_helpers.py"), "tutorial-server", "--queue", queue],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        assert "Awaiting RPC requests" in tutorial.stdout.readline()
        with Pool(queue) as pool, RpcClient(queue) as client:
            pool.wait_ready()
            bodies = [str(n).encode() for n in list(range(0, 21)) * 30]
            cids = client.run(bodies, window=16, timeout=90)
            check_all_answered(client, cids)
            by_tutorial = sum(1 for c in cids if client.replies[c][0][0].content_type is None)
            by_fastfib = sum(1 for c in cids if client.replies[c][0][0].content_type == "text/plain")
            assert by_tutorial + by_fastfib == len(bodies)
            assert by_tutorial > 0 and by_fastfib > 0
    finally:
        os.killpg(tutorial.pid, signal.SIGKILL)
        tutorial.wait(10)


@pytest.mark.timeout(90)
def test_broker_closing_the_connections_is_survived(queue):
    with Pool(queue) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        assert client.call(b"30")[1] == b"832040"
        assert close_worker_connections(queue) == 2
        pool.wait_ready(count=2, timeout=30)
        assert "connection to amqp://guest:***@127.0.0.1:5672/%2F lost" in pool.text()
        cids = client.run([b"25"] * 200, window=16)
        check_all_answered(client, cids)


@pytest.mark.timeout(90)
def test_network_cut_then_restored_reconnects_with_backoff(queue):
    proxy = TcpProxy().start()
    try:
        with Pool(queue, url=proxy.url) as pool, RpcClient(queue) as client:
            pool.wait_ready()
            assert client.call(b"10")[1] == b"55"
            proxy.stop()  # the network path is cut: connections drop, new ones are refused
            time.sleep(3)  # several refused attempts, with a growing delay
            text = pool.text()
            assert text.count("reconnecting to") >= 4
            assert pool.proc.poll() is None
            proxy.start()  # and restored, on the same port
            pool.wait_ready(count=2, timeout=30)
            assert client.call(b"11")[1] == b"89"
            assert "guest:guest" not in pool.text()
    finally:
        proxy.stop()


@pytest.mark.timeout(90)
def test_cluster_failover_to_the_next_url(queue):
    node_a, node_b = TcpProxy().start(), TcpProxy().start()
    try:
        with Pool(queue, "--url", node_b.url, url=node_a.url) as pool, RpcClient(queue) as client:
            pool.wait_ready()
            node_a.stop()  # one "node" is gone for good
            pool.wait_ready(count=2, timeout=30)
            cids = client.run([b"20"] * 100, window=16)
            check_all_answered(client, cids)
            assert f"127.0.0.1:{node_b.port}" in pool.text().split("all 2 workers consuming", 1)[1]
    finally:
        node_a.stop()
        node_b.stop()


@pytest.mark.timeout(60)
def test_deleted_queue_is_declared_again(queue):
    with Pool(queue) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        delete_queue(queue)
        pool.wait_for("declaring it again", timeout=20)
        deadline = time.monotonic() + 20
        # Both workers consume again, worker 0 with its idle consumer too: the broker had cancelled both of its.
        while queue_depth(queue)[1] < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert queue_depth(queue)[1] == 3
        assert client.call(b"12")[1] == b"144"


@pytest.mark.timeout(60)
def test_an_existing_durable_queue_is_served_as_it_is(queue):
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(URL))
    connection.channel().queue_declare(queue, durable=True, arguments={"x-max-length": 10000})
    connection.close()
    with Pool(queue) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        assert "exists with other attributes" in pool.text()
        assert client.call(b"15")[1] == b"610"
        delete_queue(queue)  # gone: the workers declare it again, as configured (durable quorum)
        # At least one worker declares it anew; the other may find it declared already (its passive declare passes).
        pool.wait_for("declaring it as configured", timeout=20)
        pool.wait_ready(count=2, timeout=20)
        assert client.call(b"16")[1] == b"987"


@pytest.mark.timeout(60)
def test_refused_credentials_are_fatal(queue):
    with Pool(queue, url="amqp://guest:not-the-password@127.0.0.1:5672/%2F") as pool:
        assert pool.wait(30) == 77
        text = pool.text()
        assert "credentials refused" in text and "not-the-password" not in text
        assert text.count("reconnecting") == 0


@pytest.mark.timeout(60)
def test_unknown_vhost_is_fatal(queue):
    with Pool(queue, url="amqp://guest:guest@127.0.0.1:5672/fastfib-no-such-vhost") as pool:
        assert pool.wait(30) == 77
        assert "refused" in pool.text() and "not found" in pool.text()


@pytest.fixture
def restricted_user():
    """A broker user that may connect to / but not configure (declare) any queue."""
    user, password = f"fastfib-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl("set_permissions", "-p", "/", user, "^$", ".*", ".*")
        yield f"amqp://{user}:{password}@127.0.0.1:5672/%2F", password
    finally:
        rabbitmqctl("delete_user", user, check=False)


@pytest.mark.timeout(90)
def test_refused_permission_is_fatal(queue, restricted_user):
    url, password = restricted_user
    with Pool(queue, url=url) as pool:
        assert pool.wait(30) == 77
        text = pool.text()
        assert "permission refused" in text and "ACCESS_REFUSED" in text
        assert password not in text


@pytest.mark.timeout(120)
def test_heartbeats_flow_during_a_long_computation(queue, broker_takes_128_mib):
    """With a 1 s heartbeat, a ~3 s computation must not cost the worker its connection,
    and the same worker keeps answering small requests meanwhile.

    RabbitMQ 3.x only: the 26 MB reply needs 3.x's 128 MiB max_message_size (4.x: 16 MiB)."""
    n = 300_000_000
    with Pool(queue, "--max-n", str(n), "--max-reply-bytes", str(128 << 20), url=URL + "?heartbeat=1",
              workers=1) as pool, RpcClient(queue) as client:
        pool.wait_ready()
        big = client.publish(str(n).encode(), headers={"accept": "application/octet-stream"})
        time.sleep(0.3)
        for i in range(10):
            assert client.call(str(i).encode(), timeout=5)[1] == expected(str(i).encode())
        assert not client.replies.get(big), "the small calls should be answered while F(n) is computed"
        deadline = time.monotonic() + 60
        while not client.replies.get(big) and time.monotonic() < deadline:
            client.connection.process_data_events(time_limit=0.2)
        (props, body), = client.replies[big]
        assert props.content_type == "application/octet-stream"
        assert body == fastfib.fib_encoded(n, "binary")
        assert "lost" not in pool.text() and "reconnecting" not in pool.text()
