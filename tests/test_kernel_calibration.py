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
    """``forced(n, retry_in_s)`` makes ``n`` the threshold as if a calibration had found it, the only
    judge (no size-by-size choice, see the tests below); returns the calibrations run so far."""
    def force(n: int, retry_in_s: float = -1.0) -> int:
        _kernel._set_threads_min_n(n, retry_in_s=retry_in_s)
        _kernel._set_adaptation(False)
        return _kernel.threads_calibration()["runs"]
    yield force
    _kernel._set_threads_min_n(0)
    _kernel._set_adaptation(True)


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
    forced(700_001)
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


# The size-by-size choice: decisions on fed timings (no wall-clock assertions).

N = 2**20  # one bucket: n in [2^20, 2^21)
EXPLORED = (1, 3, 12, 28)  # the first calls alternate; then 8 calls after the preference is set (call 4), 16, 32 ...
LATER = (12, 28)  # the same when the side not preferred was measured already


@pytest.fixture
def adapting():
    _kernel._set_adaptation(True, forget=True)
    yield
    _kernel._set_adaptation(True, forget=True)


def _feed(two: bool, *walls_ms: float) -> None:
    for ms in walls_ms:
        _kernel._adapt_feed(N, two, int(ms * 1e6))


def _choices(prior: bool, calls: int = 29) -> list[bool]:
    """Whether each call uses two threads."""
    return [_kernel._adapt_choice(N + 5, prior) for _ in range(calls)]


def test_without_measurements_the_calibration_decides(adapting):
    assert _choices(True) == [c not in EXPLORED for c in range(29)]
    _kernel._set_adaptation(True, forget=True)
    assert _choices(False) == [c in EXPLORED for c in range(29)]


def test_two_threads_where_they_measured_faster(adapting):
    _feed(False, 10, 10)
    _feed(True, 7, 7)
    assert _choices(prior=False) == [c not in LATER for c in range(29)]


def test_threads_1_calls_spare_the_first_calls_a_one_thread_trial(adapting):
    _feed(False, 10, 10)  # as threads=1 calls do
    assert _choices(prior=True) == [c not in LATER for c in range(29)]


def test_one_thread_where_two_measured_slower_whatever_the_calibration(adapting):
    _feed(False, 10, 10)
    _feed(True, 11, 11)
    assert _choices(prior=True) == [c in LATER for c in range(29)]
    _kernel._set_adaptation(True, forget=True)
    _feed(False, 10, 10)
    _feed(True, 9.8, 9.8)  # 2 % faster is within the noise: one thread
    assert _choices(prior=True) == [c in LATER for c in range(29)]


def test_a_change_of_the_machine_is_followed(adapting):
    _feed(False, 10, 10)
    _feed(True, 7, 7)
    assert _kernel._adapt_choice(N, False) is True
    _feed(True, 20, 20, 20)  # the second core got slow: the moving average crosses one thread's
    # one thread now; the first calls do not alternate, as two threads have their samples
    assert [_kernel._adapt_choice(N, False) for _ in range(12)] == [False] * 11 + [True]  # call 12 explores
    costs = {b["n_from"]: b for b in _kernel.threads_adaptation()}[N]
    assert costs["two_cost"] > costs["one_cost"] and costs["two_samples"] == 5 and costs["one_samples"] == 2


def test_calls_feed_the_measurements(adapting):
    n = 2**18 + 3
    _kernel._set_threads_min_n(NEVER)  # the calibration says one thread: calls 1 and 3 explore two
    try:
        assert fib(n, threads=1) == gmpy2.fib(n)
        assert fib(n - 1) == gmpy2.fib(n - 1)
        assert fib(_kernel.THREADS_MIN_N - 1, threads=2) == gmpy2.fib(_kernel.THREADS_MIN_N - 1)  # below: not kept
        (bucket,) = _kernel.threads_adaptation()
        assert bucket["n_from"] == 2**18 and bucket["one_samples"] == 2 and bucket["one_cost"] > 0
        assert bucket["two_samples"] == 0 and bucket["calls"] == 0
        start = _kernel._helpers_started()
        for _ in range(4):
            assert fib(n, threads=2) == gmpy2.fib(n)
        (bucket,) = _kernel.threads_adaptation()
        assert bucket["calls"] == 4 and bucket["one_samples"] == 4 and bucket["two_samples"] == 2
        assert _kernel._helpers_started() == start + 2
    finally:
        _kernel._set_threads_min_n(0)


@pytest.fixture
def stalled_helper():
    """A helper that, once it has claimed a product, sleeps as if its core had been taken away."""
    _kernel._set_helper_stall(50_000_000)
    yield
    _kernel._set_helper_stall(0)


def test_a_starved_helper_makes_the_next_calls_use_one_thread(adapting, stalled_helper):
    # The calibration says two threads; each threaded call then takes at least the 50 ms stall,
    # several times what F(4*10^6) takes on one thread (about 10-20 ms here).
    _kernel._set_threads_min_n(2**17)
    try:
        n = 4 * 10**6
        want = gmpy2.fib(n)
        start = _kernel._helpers_started()
        for _ in range(4):  # two threads, one, two, one: both sides measured
            assert fib(n, threads=2) == want
        assert _kernel._helpers_started() == start + 2
        for _ in range(3):  # calls 4-6: one thread, as measured
            assert fib(n, threads=2) == want
        assert _kernel._helpers_started() == start + 2
        _kernel._set_helper_stall(0)
        for _ in range(5):  # calls 7-11
            assert fib(n, threads=2) == want
        assert _kernel._helpers_started() == start + 2
        assert fib(n, threads=2) == want  # call 12, 8 after the preference was set, tries two threads again
        assert _kernel._helpers_started() == start + 3
    finally:
        _kernel._set_threads_min_n(0)


def test_the_calibration_is_not_counted_in_the_call_that_makes_it(adapting):
    _kernel._set_threads_min_n(0)  # the next eligible call calibrates (tens of ms)
    n = 2**17 + 1
    assert fib(n, threads=2) == gmpy2.fib(n)
    cal_ns = _kernel.threads_calibration()["ms"] * 1e6
    (bucket,) = _kernel.threads_adaptation()
    cost = bucket["one_cost"] if bucket["one_samples"] else bucket["two_cost"]
    # cost is ns * 4096 / n: the call's own time is far below the calibration's
    assert cost * n / 4096 < cal_ns
    _kernel._set_threads_min_n(0)


def test_a_promising_exploration_is_followed_by_more(adapting):
    _feed(False, 10, 10)
    _feed(True, 7, 7)
    assert _choices(prior=False, calls=13) == [c != 12 for c in range(13)]  # two threads; call 12 explores
    _feed(False, 5)  # one thread now beats two threads' average (a threads=1 call, or that exploration)
    # one thread at once (call 13), then two and four calls later (15, 19), until the averages cross
    assert _choices(prior=False, calls=7) == [False, True, False, True, True, True, False]
    _feed(False, 5, 5)  # they cross: one thread is preferred from call 20, and explores two 8 calls later
    assert _choices(prior=False, calls=9) == [False] * 8 + [True]


def test_above_the_ladder_a_never_lets_the_first_calls_decide(adapting):
    _kernel._set_threads_min_n(NEVER, retry_in_s=3600.0)
    try:
        start = _kernel._helpers_started()
        assert fib(2**21 + 1, threads=2) == gmpy2.fib(2**21 + 1)  # on the ladder: one thread
        assert _kernel._helpers_started() == start
        n = 2**22 + 1
        assert fib(n, threads=2) == gmpy2.fib(n)  # above it: two threads first (call 0)
        assert _kernel._helpers_started() == start + 1
        (bucket,) = [b for b in _kernel.threads_adaptation() if b["n_from"] == 2**22]
        assert bucket["two_samples"] == 1
    finally:
        _kernel._set_threads_min_n(0)
