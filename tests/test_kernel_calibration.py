"""Where ``threads=2`` starts to use a second thread: calibrated once per process.

Behaviour only (no timing assertions): the decision rule on given timings,
the lazy one-time calibration, that a "never" is measured again later, and
that no helper thread starts below the threshold.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import gmpy2
import pytest

from fastfib import _kernel, fib, fib_encoded

LADDER = [2**17, 2**18, 2**19, 2**20, 2**21]
NEVER = _kernel.THREADS_NEVER


def _rungs(ratios):
    return [(n, 1000, int(1000 * r)) for n, r in zip(LADDER, ratios, strict=False)]


@pytest.mark.parametrize(
    "ratios, ended, want",
    [
        ([1.2, 1.0], False, 0),  # no win yet: measure on
        ([1.2, 0.8], False, 0),  # one win: wait for the next rung to confirm it
        ([1.2, 0.8, 0.85], False, 2**18),  # two wins in a row decide
        ([0.8, 0.8], False, 2**17),
        ([0.8, 1.0, 0.8, 0.8], False, 2**19),  # a win below a loss does not count
        ([0.95, 0.95, 0.95, 0.95, 0.95], True, NEVER),  # 5% is within the noise: never a win
        ([1.1, 1.1, 1.1, 1.1, 0.8], True, 2**21),  # a win on the top rung counts alone
        ([1.1, 1.1, 1.1, 1.1, 1.1], True, NEVER),
        ([0.9, 0.9], False, 2**17),  # exactly the margin wins
    ],
)
def test_decision_rule(ratios, ended, want):
    assert _kernel._pick_threshold_for(_rungs(ratios), ended) == want


CHILD = r"""
import json, threading, gmpy2
from fastfib import _kernel, fib
out = {"before": _kernel.threads_calibration()}
assert fib(_kernel.THREADS_MIN_N - 1, threads=2) == gmpy2.fib(_kernel.THREADS_MIN_N - 1)
assert fib(10**6, threads=1) == gmpy2.fib(10**6)
out["after_small_or_one_thread"] = _kernel.threads_calibration()
results = []
def call():
    results.append(fib(10**6 + 1, threads=2) == gmpy2.fib(10**6 + 1))
threads = [threading.Thread(target=call) for _ in range(3)]
for t in threads: t.start()
for t in threads: t.join()
out["results"] = results
out["first"] = _kernel.threads_calibration()
out["min_n"] = _kernel.threads_min_n()
out["second"] = _kernel.threads_calibration()
print(json.dumps(out))
"""


def test_calibrates_lazily_once_per_process():
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    # Nothing is measured at import, below THREADS_MIN_N, or with one thread.
    assert out["before"] is None
    assert out["after_small_or_one_thread"] is None
    # Three concurrent first callers: all right, and one calibration.
    assert out["results"] == [True, True, True]
    first = out["first"]
    assert first is not None and first == {**out["second"], "retry_in_s": first["retry_in_s"]}
    assert first["runs"] == 1
    assert out["min_n"] == first["threads_min_n"]
    assert first["threads_min_n"] in LADDER + [NEVER]
    rungs = first["rungs"]
    assert 1 <= len(rungs) <= len(LADDER)
    assert [r["n"] for r in rungs] == LADDER[: len(rungs)]
    assert all(r["one_ns"] > 0 and r["two_ns"] > 0 for r in rungs)
    # The threshold is what the rule makes of the rungs measured.
    decided = _kernel._pick_threshold_for([(r["n"], r["one_ns"], r["two_ns"]) for r in rungs], len(rungs) == len(LADDER))
    assert first["threads_min_n"] in (decided, NEVER)


@pytest.fixture
def forced():
    """``forced(n, retry_in_s)`` makes ``n`` the threshold as if a calibration had found it; returns the runs so far."""
    def force(n: int, retry_in_s: float = -1.0) -> int:
        _kernel._set_threads_min_n(n, retry_in_s=retry_in_s)
        _kernel._reset_threads_backoff()
        return _kernel.threads_calibration()["runs"]
    yield force
    _kernel._set_threads_min_n(0)


def test_a_found_threshold_is_final(forced):
    runs = forced(2**18, retry_in_s=0.0)
    assert _kernel.threads_min_n() == 2**18
    assert fib(2**18, threads=2) == gmpy2.fib(2**18)
    assert _kernel.threads_calibration()["runs"] == runs


def test_never_is_kept_until_its_retry_is_due(forced):
    runs = forced(NEVER, retry_in_s=3600.0)
    start = _kernel._helpers_started()
    assert fib(2**20, threads=2) == gmpy2.fib(2**20)
    assert _kernel.threads_min_n() == NEVER
    assert _kernel._helpers_started() == start
    cal = _kernel.threads_calibration()
    assert cal["runs"] == runs and 3000 < cal["retry_in_s"] <= 3600


def test_a_due_never_is_measured_again_by_the_next_call(forced):
    runs = forced(NEVER, retry_in_s=0.0)
    n = 2**20 + 1
    assert fib(n, threads=2) == gmpy2.fib(n)  # the call that measures again is still right
    cal = _kernel.threads_calibration()
    assert cal["runs"] == runs + 1
    assert cal["rungs"] and [r["n"] for r in cal["rungs"]] == LADDER[: len(cal["rungs"])]
    assert _kernel.threads_min_n() == cal["threads_min_n"]
    if cal["threads_min_n"] == NEVER:  # lost again: the next measurement is further away
        assert 0 < cal["retry_in_s"] <= 5
    else:
        assert cal["retry_in_s"] is None


@pytest.fixture
def threshold(forced):
    forced(700_001)  # and no backoff that an earlier threaded call may have left
    return 700_001


def test_no_helper_thread_below_the_threshold(threshold):
    start = _kernel._helpers_started()
    assert fib(threshold - 1, threads=2) == gmpy2.fib(threshold - 1)
    assert fib_encoded(threshold - 1, "binary", threads=2) == fib_encoded(threshold - 1, "binary")
    assert fib(threshold, threads=1) == gmpy2.fib(threshold)
    assert _kernel._helpers_started() == start
    assert fib(threshold, threads=2) == gmpy2.fib(threshold)
    assert _kernel._helpers_started() == start + 1


def test_threshold_is_never_below_the_floor():
    _kernel._set_threads_min_n(1000)
    try:
        start = _kernel._helpers_started()
        n = _kernel.THREADS_MIN_N - 1
        assert fib(n, threads=2) == gmpy2.fib(n)
        assert _kernel._helpers_started() == start
    finally:
        _kernel._set_threads_min_n(0)


def test_threads_min_n_waits_for_a_calibration_in_progress():
    _kernel._set_threads_min_n(0)
    got = []
    ts = [threading.Thread(target=lambda: got.append(_kernel.threads_min_n())) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(set(got)) == 1 and got[0] == _kernel.threads_calibration()["threads_min_n"]


@pytest.fixture
def stalled_helper():
    """A helper that, once it has claimed a product, sleeps as if its core had been taken away."""
    _kernel._set_threads_min_n(600_000)
    _kernel._reset_threads_backoff()
    _kernel._set_helper_stall(50_000_000)
    yield
    _kernel._set_helper_stall(0)
    _kernel._reset_threads_backoff()
    _kernel._set_threads_min_n(0)


def test_a_starved_helper_makes_the_next_calls_use_one_thread(stalled_helper):
    n = 4 * 10**6
    want = gmpy2.fib(n)
    # The helper must have claimed at least one product for the caller to wait on it:
    # on a busy machine it may not be scheduled in time, so allow a few calls.
    for _ in range(5):
        assert fib(n, threads=2) == want
        left, following = _kernel._threads_backoff()
        if left:
            break
    assert (left, following) == (8, 16)
    _kernel._set_helper_stall(0)
    start = _kernel._helpers_started()
    for i in range(8):  # backing off: one thread, no helper started
        assert fib(n + i, threads=2) == gmpy2.fib(n + i)
    assert _kernel._helpers_started() == start
    assert _kernel._threads_backoff()[0] == 0
    assert fib(n, threads=2) == want  # then two threads are tried again
    assert _kernel._helpers_started() == start + 1


def test_backoff_doubles_while_the_helper_stays_starved(stalled_helper):
    n = 4 * 10**6
    lengths = []
    for _ in range(40):
        fib(n, threads=2)
        left, following = _kernel._threads_backoff()
        if not left:
            # The helper was not scheduled in time to claim a product, so the caller did
            # all the work and was not starved: the doubling starts over, as it should.
            lengths = []
            continue
        lengths.append(left)
        for _ in range(left):  # serve the backoff out
            fib(n, threads=2)
        if len(lengths) == 2:
            break
    assert lengths == [8, 16]
