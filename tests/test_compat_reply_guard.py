"""fastfib.server.reply_guard: version gating, verdicts per pid, and the prober's failure modes (issue 14)."""

import base64
import os
import socket
import threading
import time

import pytest

from fastfib.server.reply_guard import (
    PREFIX,
    ReplyGuard,
    ReplyToProber,
    broker_version,
    direct_reply_to_ok,
    needs_probe,
    pid_of,
)


def _props(version, product="RabbitMQ"):
    return {"product": product, "version": version}


@pytest.mark.parametrize(("version", "crash"), [
    ("3.8.35", True), ("3.9.25", True), ("3.9.26", False), ("3.10.8", True), ("3.10.11", True),
    ("3.10.12", False), ("3.10.25", False), ("3.11.3", True), ("3.11.4", False), ("3.12.0", False),
    ("3.13.7", False), ("4.0.9", False), ("4.1.0-rc.1", False), ("4.2.3", False), ("4.3.0", False),
    (b"3.10.8", True), (b"4.3.0", False),
])
def test_needs_probe_by_version(version, crash):
    assert needs_probe(_props(version)) is crash


def test_an_unreadable_version_counts_as_affected():
    assert needs_probe(None) and needs_probe({}) and needs_probe(_props("banana"))
    assert needs_probe(_props("4.3.0", product="SomeOtherBroker"))
    assert broker_version(_props("3.10.8")) == (3, 10, 8) and broker_version(_props("4.1")) == (4, 1, 0)


def _pid_term(node: bytes) -> bytes:
    return b"\x83\x58\x76" + len(node).to_bytes(2, "big") + node + b"\x00" * 8 + b"\x00\x00\x00\x01"


def _name(pid_term: bytes, key: str | None = None) -> str:
    key = key or base64.b64encode(os.urandom(16)).decode()
    return f"{PREFIX}{base64.b64encode(pid_term).decode()}.{key}"


def test_shape_check_and_pid():
    good = _name(_pid_term(b"reply@1234"), "a2V5")
    assert direct_reply_to_ok(good) and direct_reply_to_ok("amq.gen-abc")
    assert pid_of(good) == base64.b64encode(_pid_term(b"reply@1234")).decode() and pid_of("q") is None
    assert not direct_reply_to_ok(_name(_pid_term(b"reply@1234"), "!!"))
    assert not direct_reply_to_ok(PREFIX + base64.b64encode(b"garbage").decode() + ".abcd")
    assert not direct_reply_to_ok(_name(_pid_term(b"nonode")))


class FakeProber:
    """Records submissions; answers only when told to. ``alive`` as a test sets it."""

    def __init__(self):
        self.submitted, self.alive, self.abandoned = [], True, 0

    def submit(self, url, name, callback):
        self.submitted.append((url, name, callback))

    def abandon(self):
        self.abandoned += 1

    def stop(self):
        pass


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _guard(prober, clock=None):
    return ReplyGuard(0, lambda fn: fn(), prober=prober, probe_timeout=10.0, clock=clock or Clock())


def test_a_flood_of_names_with_one_pid_costs_one_probe():
    prober, resumed = FakeProber(), []
    guard = _guard(prober)
    pid = _pid_term(b"reply@1234")
    names = [_name(pid) for _ in range(20_000)]
    for i, name in enumerate(names):
        assert guard.verdict(name) is None
        guard.hold(name, i, lambda item, ok: resumed.append((item, ok)), "amqp://x")
    assert len(prober.submitted) == 1 and guard.probes == 1 and guard.held == 20_000
    url, name, callback = prober.submitted[0]
    callback(name, True)
    assert resumed == [(i, True) for i in range(20_000)] and guard.held == 0
    # Later names with the same pid and other keys are known: no probe, no hold.
    assert all(guard.verdict(_name(pid)) is True for _ in range(1000))
    assert guard.probes == 1
    assert guard.verdict(names[0]) is True
    guard.forget()  # a 541 on the worker's connection: every name is vetted again
    assert guard.verdict(names[0]) is None
    prober.submitted.clear()
    guard.hold(names[0], "again", lambda item, ok: resumed.append((item, ok)), "amqp://x")
    prober.submitted[0][2](names[0], True)
    assert resumed[-1] == ("again", True)
    # A refused pid: every name with it is dropped, whatever its key.
    other = _name(_pid_term(b"reply@999"))
    prober.submitted.clear()
    guard.hold(other, "x", lambda item, ok: resumed.append((item, ok)), "amqp://x")
    prober.submitted[0][2](other, False)
    assert resumed[-1] == ("x", False) and guard.verdict(_name(_pid_term(b"reply@999"))) is False


def test_no_probe_on_a_broker_without_the_crash():
    prober = FakeProber()
    guard = _guard(prober)
    guard.on_connected(_props("4.3.0"))
    assert guard.verdict(_name(_pid_term(b"reply@1234"))) is True
    assert guard.verdict(_name(_pid_term(b"nonode"))) is False  # malformed: never deliverable, on any broker
    assert guard.verdict("amq.gen-x") is True and guard.verdict(b"\xff") is False
    guard.on_connected(_props("3.10.8"))
    assert guard.verdict(_name(_pid_term(b"reply@1234"))) is None
    assert prober.submitted == []


def test_a_probe_that_hangs_times_out_with_the_fallback_verdict():
    prober, clock, resumed = FakeProber(), Clock(), []
    guard = _guard(prober, clock)
    a, b = _name(_pid_term(b"reply@1")), _name(_pid_term(b"reply@2"))
    guard.hold(a, "a", lambda item, ok: resumed.append((item, ok)), "amqp://x")
    clock.now += 5
    guard.hold(b, "b", lambda item, ok: resumed.append((item, ok)), "amqp://x")
    guard.poll()
    assert resumed == []
    clock.now += 6  # a's probe is 11 s old
    guard.poll()
    assert resumed == [("a", True)] and prober.abandoned == 1  # served unvetted, as before probes existed
    assert len(prober.submitted) == 3  # b was queued behind the stuck probe: asked again on a fresh thread
    clock.now += 11
    guard.forget()  # a 541 was seen since: unvettable names are now dropped
    guard.poll()
    assert resumed[-1] == ("b", False) and guard.held == 0


def test_a_dead_prober_thread_leaves_no_request_waiting():
    prober, resumed = FakeProber(), []
    guard = _guard(prober)
    name = _name(_pid_term(b"reply@1"))
    guard.hold(name, 1, lambda item, ok: resumed.append((item, ok)), "amqp://x")
    prober.alive = False
    guard.poll()
    assert resumed == [(1, True)] and guard.held == 0


def _wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_prober_thread_death_is_noticed_and_a_new_thread_serves_the_next_probe():
    calls = []

    def connect(url):
        calls.append(url)
        if len(calls) == 1:
            raise SystemExit  # escapes the probe's error handling: the thread dies
        raise ConnectionRefusedError(111, "refused")

    prober = ReplyToProber(0, connect=connect)
    guard = ReplyGuard(0, lambda fn: fn(), prober=prober, probe_timeout=60.0)
    resumed = []
    name = _name(_pid_term(b"reply@1"))
    guard.hold(name, 1, lambda item, ok: resumed.append((item, ok)), "amqp://x")
    _wait(lambda: not prober.alive)
    guard.poll()
    assert resumed == [(1, True)]
    done = threading.Event()
    prober.submit("amqp://y", name, lambda n, ok: (resumed.append(("new", ok)), done.set()))
    assert done.wait(20) and resumed[-1] == ("new", None) and prober.alive
    prober.stop()


def test_prober_that_cannot_connect_answers_none():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prober = ReplyToProber(0, timeout=2.0)
    got = threading.Event()
    verdicts = []
    prober.submit(f"amqp://guest:guest@127.0.0.1:{port}/%2F", _name(_pid_term(b"reply@1")),
                  lambda n, ok: (verdicts.append(ok), got.set()))
    assert got.wait(30) and verdicts == [None]
    prober.stop()


def test_a_hanging_connect_is_abandoned_and_the_guard_moves_on():
    release = threading.Event()

    def connect(url):
        release.wait(30)  # a broker that accepts TCP and never answers
        raise TimeoutError("stack timeout")

    prober = ReplyToProber(0, connect=connect)
    clock = Clock()
    guard = ReplyGuard(0, lambda fn: fn(), prober=prober, probe_timeout=10.0, clock=clock)
    resumed = []
    guard.hold(_name(_pid_term(b"reply@1")), 1, lambda item, ok: resumed.append((item, ok)), "amqp://x")
    _wait(lambda: prober.alive)
    clock.now += 11
    guard.poll()
    assert resumed == [(1, True)]
    assert prober._thread is None  # abandoned: the next probe gets a fresh thread
    release.set()


def test_probe_connection_has_heartbeats_and_timeouts(broker_url):
    connection = ReplyToProber(3)._default_connect(broker_url)
    try:
        params = connection._impl.params
        assert params.heartbeat == 30 and params.blocked_connection_timeout == 10.0
        assert params.socket_timeout == 10.0 and params.stack_timeout == 10.0
        assert connection._impl._heartbeat_checker is not None  # negotiated: heartbeats flow
    finally:
        connection.close()


def _real_name(broker_url):
    from _fault_helpers import learn_direct_reply_to

    return learn_direct_reply_to(broker_url)


def test_probe_of_a_live_pid_is_safe(broker_url):
    direct = _real_name(broker_url)
    prober = ReplyToProber(0)
    got, verdicts = threading.Event(), []
    prober.submit(broker_url, direct.name, lambda n, ok: (verdicts.append(ok), got.set()))
    assert got.wait(30) and verdicts == [True]
    prober.stop()


def test_probe_of_an_unknown_node_is_refused_on_a_broker_with_the_541_crash(broker_url, broker_has_541_crash):
    """RabbitMQ < 3.10.12 (here 3.10.8): a reply to an unknown node hash closes the connection with 541."""
    direct = _real_name(broker_url)
    h = direct.node.partition(b"@")[2]
    prober = ReplyToProber(0)
    got, verdicts = threading.Event(), []
    prober.submit(broker_url, direct.with_node(b"reply@%d" % (int(h) + 1)),
                  lambda n, ok: (verdicts.append(ok), got.set()))
    assert got.wait(30) and verdicts == [False]
    prober.stop()
