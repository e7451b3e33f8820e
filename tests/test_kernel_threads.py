"""The two-thread kernel (issue 8): fib(n, threads=K) and fib_encoded(n, fmt, threads=K).

Correctness against GMP's own mpz_fib_ui on every path (one thread, the helper
thread created, each doubling step on one or two threads, both last steps),
argument checks, calls from several Python threads, signals during a threaded
call, fork after one, and no leak of memory or threads.
"""

from __future__ import annotations

import ctypes
import gc
import os
import random
import signal
import threading
import time

import gmpy2
import psutil
import pytest

import fastfib
from fastfib import _kernel, fib, fib_encoded

# The threshold is calibrated per process, and the choice is then made size by
# size from what calls measure (tests/test_kernel_calibration.py); here the
# threshold alone decides, pinned, so that the threaded paths run at known n.
THREADS_MIN_N = 600_000


@pytest.fixture(autouse=True)
def pinned_threshold():
    _kernel._set_threads_min_n(THREADS_MIN_N)
    _kernel._set_adaptation(False)
    yield
    _kernel._set_threads_min_n(0)
    _kernel._set_adaptation(True)


def _task_count() -> int:
    return len(os.listdir("/proc/self/task"))


def _wait_for_tasks(at_most: int, timeout: float = 5.0) -> int:
    """The helper threads are detached and exit just after the call: give them a moment."""
    deadline = time.monotonic() + timeout
    while _task_count() > at_most and time.monotonic() < deadline:
        time.sleep(0.01)
    return _task_count()


def test_threshold_constant():
    # Threads are used only where they pay; below, threads=2 is the one-thread path.
    assert _kernel._NOGIL_MIN_N <= 2 * _kernel._PAR_MIN_M <= _kernel.THREADS_MIN_N <= THREADS_MIN_N
    assert _kernel.threads_min_n() == THREADS_MIN_N
    assert fastfib.fib(THREADS_MIN_N, threads=2) == gmpy2.fib(THREADS_MIN_N)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_small_and_table_n(threads):
    for n in list(range(200)) + [1000, 19_999, 20_000, 20_001]:
        assert fib(n, threads=threads) == gmpy2.fib(n), n


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_around_the_threshold(threads):
    for n in range(THREADS_MIN_N - 5, THREADS_MIN_N + 6):
        assert fib(n, threads=threads) == gmpy2.fib(n), n


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_around_powers_of_two(threads):
    # 2^k - 1 and 2^k + 1 take the odd last step, 2^k the even one; the high k
    # run their last steps (and, higher, their doubling steps) on two threads.
    for k in range(14, 24):
        for n in (2**k - 1, 2**k, 2**k + 1):
            assert fib(n, threads=threads) == gmpy2.fib(n), n


def test_each_step_boundary():
    # n whose doubling walk passes F[m] with m just below, at and just above
    # the step threshold, at several depths: every mix of one- and two-thread steps.
    par = _kernel._PAR_MIN_M
    ns = set()
    for m in (par - 1, par, par + 1):
        for depth in range(1, 12):
            for low in (0, 1, (1 << depth) - 1):
                n = (m << depth) + low
                if THREADS_MIN_N <= n <= 5 * 10**6:
                    ns.add(n)
    assert len(ns) >= 9
    for n in sorted(ns):
        assert fib(n, threads=2) == gmpy2.fib(n), n


def test_last_step_as_two_squares_for_odd_and_even_n():
    # With the helper ready, the last step is F[k]^2 and F[k-1]^2 on the two threads,
    # combined by one formula for odd n and another for even n: both must run, and agree.
    # The helper is "ready" when it spins on a CPU of its own at that moment.
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: the helper is never spinning on a CPU of its own at the last step")
    before = _kernel._squared_last_steps()
    for _ in range(20):
        for k in range(20, 24):
            for n in (2**k - 1, 2**k, 2**k + 1, 3 * 2**(k - 1)):
                assert fib(n, threads=2) == gmpy2.fib(n), n
        odd, even = (x - y for x, y in zip(_kernel._squared_last_steps(), before, strict=True))
        if odd and even:
            break
    assert odd > 0 and even > 0, (odd, even)


def test_random_n_two_threads():
    rng = random.Random(8)
    for n in [rng.randrange(THREADS_MIN_N, 3 * 10**6) for _ in range(30)]:
        assert fib(n, threads=2) == gmpy2.fib(n), n


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("n", [10**7 - 1, 10**7])
def test_ten_million(threads, n):
    assert fib(n, threads=threads) == gmpy2.fib(n)


@pytest.mark.parametrize("fmt", ["decimal", "binary"])
def test_encoded_same_bytes(fmt):
    for n in (0, 93, 5000, THREADS_MIN_N - 1, THREADS_MIN_N, 10**6 + 1):
        assert fib_encoded(n, fmt, threads=2) == fib_encoded(n, fmt) == fastfib.encode(gmpy2.fib(n), fmt), n
    assert fib_encoded(10**6, fmt=fmt, threads=4) == fib_encoded(10**6, fmt)


def test_threads_accepts_index_and_large_values():
    n = THREADS_MIN_N + 7
    want = gmpy2.fib(n)
    assert fib(n, threads=gmpy2.mpz(2)) == want
    assert fib(n, threads=10**30) == want  # more than two threads are accepted; two are used
    assert fib(n, 3) == want  # positional too


@pytest.mark.parametrize("bad", [2.0, "2", b"2", None, [2]])
def test_threads_type_errors(bad):
    name = type(bad).__name__
    with pytest.raises(TypeError, match=rf"^threads must be an integer, not {name}$"):
        fib(10, threads=bad)
    with pytest.raises(TypeError, match=rf"^threads must be an integer, not {name}$"):
        fib_encoded(10, "binary", threads=bad)


def test_threads_bool_refused():
    with pytest.raises(TypeError, match=r"^threads must be an integer, not bool$"):
        fib(10, threads=True)


@pytest.mark.parametrize("bad", [0, -1, -(10**30)])
def test_threads_value_errors(bad):
    with pytest.raises(ValueError, match=rf"^threads must be at least 1, got {bad}$"):
        fib(10, threads=bad)
    with pytest.raises(ValueError, match=rf"^threads must be at least 1, got {bad}$"):
        fib_encoded(10**6, threads=bad)


def test_n_is_checked_before_threads():
    with pytest.raises(fastfib.FibRangeError):
        fib(-1, threads=0)


@pytest.fixture
def slow_helper():
    """Make the helper thread late (as on a busy machine), then undo it."""
    yield _kernel._set_helper_delay
    _kernel._set_helper_delay(0)


@pytest.mark.parametrize("delay_us", [5, 60, 400, 3000])
def test_late_helper(slow_helper, delay_us):
    # A late helper makes the caller take products back and leaves stale
    # wake-ups behind; every mix of who computed what must give F(n).
    slow_helper(delay_us * 1000)
    rng = random.Random(delay_us)
    ns = [THREADS_MIN_N, THREADS_MIN_N + 1, 10**6, 10**6 + 1] + [
        rng.randrange(THREADS_MIN_N, 2 * 10**6) for _ in range(6)
    ]
    for n in ns:
        assert fib(n, threads=2) == gmpy2.fib(n), n


def test_several_python_threads_at_once():
    # Large n use their own helper threads, small n the shared GIL-held
    # temporaries; all at once, with the GIL released by the large ones.
    ns = [THREADS_MIN_N + 1, 10**6, 10**6 + 1, 1_234_567, 3000, 50, 2 * THREADS_MIN_N, 777_777]
    errors: list[str] = []
    barrier = threading.Barrier(len(ns))

    def work(n: int) -> None:
        barrier.wait(timeout=30)
        for rep in range(3):
            threads = 2 if rep != 1 else 4
            if fib(n, threads=threads) != gmpy2.fib(n):
                errors.append(f"fib({n}, threads={threads})")
            if fib_encoded(n, "binary", threads=threads) != fastfib.encode(gmpy2.fib(n), "binary"):
                errors.append(f"fib_encoded({n}, threads={threads})")

    workers = [threading.Thread(target=work, args=(n,)) for n in ns]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not any(w.is_alive() for w in workers)
    assert errors == []


def test_signals_during_a_threaded_call():
    # The calling thread waits on a semaphore, which a signal interrupts (EINTR);
    # the kernel must wait again, and Python must run the handler afterwards.
    hits = []
    old = signal.signal(signal.SIGALRM, lambda *_: hits.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        for n in (3 * 10**6, 3 * 10**6 + 1):
            assert fib(n, threads=2) == gmpy2.fib(n)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert hits


def test_fork_after_threaded_calls():
    n = 10**6 + 3
    want = gmpy2.fib(n)
    assert fib(n, threads=2) == want
    pid = os.fork()
    if pid == 0:  # the child: no helper thread came along; make a new one
        ok = fib(n, threads=2) == want and fib(THREADS_MIN_N, threads=2) == gmpy2.fib(THREADS_MIN_N)
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0


def test_no_helper_thread_outlives_a_call():
    before = _task_count()
    for n in (THREADS_MIN_N, 10**6):
        fib(n, threads=2)
    assert _wait_for_tasks(before) == before


def test_gmp_allocates_with_its_thread_safe_defaults():
    # The helper thread allocates through GMP's memory functions without the
    # GIL: they must be GMP's defaults (malloc), not PyMem-based ones.
    lib = ctypes.CDLL(next(p.split()[-1] for p in open("/proc/self/maps") if "libgmp" in p))
    funcs = [ctypes.c_void_p() for _ in range(3)]
    lib.__gmp_get_memory_functions(*(ctypes.byref(f) for f in funcs))
    for f, name in zip(
        funcs, ("__gmp_default_allocate", "__gmp_default_reallocate", "__gmp_default_free"), strict=True
    ):
        assert f.value == ctypes.cast(getattr(lib, name), ctypes.c_void_p).value, name


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.slow
def test_no_leak_over_repeated_threaded_calls():
    tasks = _task_count()
    ns = [THREADS_MIN_N + 997 * i for i in range(150)]
    # Warm up: the allocator's arenas reach the size of the largest call.
    for n in (ns[0], ns[-1]):
        fib(n, threads=2)
        fib_encoded(n, "decimal", threads=2)
    before = _rss_mb()
    calls = 0
    for i, n in enumerate(ns):
        fib(n, threads=2)
        fib_encoded(n, "binary" if i & 1 else "decimal", threads=2)
        with pytest.raises(ValueError):
            fib_encoded(n, "binary", threads=0)
        calls += 2
    grown = _rss_mb() - before
    # A call's four temporaries are ~0.7 n bits each (~200 kB together at n = 6e5):
    # leaking them, or a helper thread's stack, would grow RSS by tens of MB here.
    assert grown < 8, f"RSS grew by {grown:.1f} MB over {calls} threaded calls"
    assert _wait_for_tasks(tasks) == tasks
