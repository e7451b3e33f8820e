"""The compiled kernel: correctness against GMP's own mpz_fib_ui, bounds, encoders."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from fractions import Fraction

import gmpy2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastfib
from fastfib import FibRangeError, fib, fib_encoded
from fastfib.reference import fib_doubling, fib_naive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_n_up_to_5000():
    for n in range(5001):
        assert fib(n) == gmpy2.fib(n), n


@pytest.mark.parametrize("k", range(1, 25))
def test_around_powers_of_two(k):
    for n in (2**k - 1, 2**k, 2**k + 1):
        assert fib(n) == gmpy2.fib(n), n


def test_random_n_up_to_a_million():
    rng = random.Random(20261126)
    for n in [rng.randrange(10**6) for _ in range(40)] + [10**6]:
        assert fib(n) == gmpy2.fib(n), n


def test_table_edge():
    # 93 is the last table entry, 94 the first computed by doubling.
    assert fastfib.TABLE_MAX_N == 93
    assert fib(93) == 12200160415121876738 == 2**64 - 6246583658587674878
    assert fib(94) == fib(93) + fib(92)


def test_returns_gmpy2_mpz():
    assert type(fib(10)) is type(gmpy2.mpz(1))
    assert type(fib(10**5)) is type(gmpy2.mpz(1))


def test_matches_pure_python_references():
    for n in range(25):
        assert fib(n) == fib_naive(n)
    for n in (0, 1, 2, 93, 94, 1000, 12345):
        assert fib(n) == fib_doubling(n)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=200_000))
def test_cassini(n):
    # F(n-1) F(n+1) - F(n)^2 = (-1)^n
    assert fib(n - 1) * fib(n + 1) - fib(n) ** 2 == (-1) ** n


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=50_000), st.integers(min_value=0, max_value=50_000))
def test_docagne(m, n):
    # F(m) F(n+1) - F(m+1) F(n) = (-1)^n F(m-n)
    if m < n:
        m, n = n, m
    assert fib(m) * fib(n + 1) - fib(m + 1) * fib(n) == (-1) ** n * fib(m - n)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=100_000), st.integers(min_value=1, max_value=100_000))
def test_addition_and_gcd(m, n):
    # F(m+n) = F(m) F(n+1) + F(m-1) F(n), and gcd(F(m), F(n)) = F(gcd(m, n))
    m += 1
    assert fib(m + n) == fib(m) * fib(n + 1) + fib(m - 1) * fib(n)
    assert gmpy2.gcd(fib(m), fib(n)) == fib(gmpy2.gcd(m, n))


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=300_000))
def test_encoders_round_trip(n):
    value = int(fib(n))
    binary = fib_encoded(n, "binary")
    assert int.from_bytes(binary, "big") == value
    assert len(binary) == max(1, (value.bit_length() + 7) // 8)
    decimal = fib_encoded(n, "decimal")
    assert decimal.isdigit() and (decimal == b"0" or not decimal.startswith(b"0"))
    assert gmpy2.mpz(decimal.decode()) == value
    assert fib_encoded(n) == decimal  # decimal is the default
    assert fastfib.encode(value, "binary") == binary
    assert fastfib.encode(gmpy2.mpz(value), "decimal") == decimal


def test_encoders_zero_and_large():
    assert fib_encoded(0, "binary") == b"\x00"
    assert fib_encoded(0, "decimal") == b"0"
    assert fib_encoded(1, "binary") == b"\x01"
    assert fib_encoded(12, "decimal") == b"144"
    big = 10**6
    assert gmpy2.mpz(fib_encoded(big, "decimal").decode()) == gmpy2.fib(big)
    assert int.from_bytes(fib_encoded(big, "binary"), "big") == gmpy2.fib(big)
    assert fib_encoded(big, "decimal") == gmpy2.fib(big).digits().encode()


@pytest.mark.parametrize("bad", [1.0, 30.0, "30", b"30", None, Fraction(3, 1), [30], 1j])
def test_type_errors(bad):
    with pytest.raises(TypeError, match=r"^n must be an integer, not "):
        fib(bad)
    with pytest.raises(TypeError, match=r"^n must be an integer, not "):
        fib_encoded(bad, "binary")


@pytest.mark.parametrize("flag", [True, False])
def test_bool_is_refused(flag):
    with pytest.raises(TypeError, match=r"not bool"):
        fib(flag)


def test_index_types_accepted():
    assert fib(gmpy2.mpz(100)) == gmpy2.fib(100)

    class Index:
        def __index__(self):
            return 50

    assert fib(Index()) == gmpy2.fib(50)


@pytest.mark.parametrize("n", [-1, -(10**30)])
def test_negative(n):
    with pytest.raises(FibRangeError, match=rf"^n must not be negative, got {n}$"):
        fib(n)
    with pytest.raises(ValueError):
        fib_encoded(n)


@pytest.mark.parametrize("n", [fastfib.MAX_N + 1, 2**64, 10**100])
def test_above_limit(n):
    expected = rf"^n must be at most {fastfib.MAX_N} \(the kernel's limit, set by the size of F\(n\)\), got {n}$"
    with pytest.raises(FibRangeError, match=expected):
        fib(n)
    with pytest.raises(ValueError, match=expected):
        fib_encoded(n, "decimal")


def test_range_error_is_value_error():
    assert issubclass(FibRangeError, ValueError)
    assert fastfib.MAX_N == 1_000_000_000


@pytest.mark.parametrize("fmt", ["hex", "", "DECIMAL", None, b"binary"])
def test_unknown_format(fmt):
    with pytest.raises(ValueError, match=r"^fmt must be 'decimal' or 'binary'"):
        fib_encoded(10, fmt)


def test_encode_rejects_negative():
    with pytest.raises(ValueError, match="non-negative"):
        fastfib.encode(-1)


def test_gil_released_for_large_n():
    """Another thread makes progress while a large F(n) is computed."""
    ticks = 0
    done = threading.Event()

    def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1

    t = threading.Thread(target=ticker)
    t.start()
    try:
        before = ticks
        fib(5 * 10**6)
        during = ticks - before
    finally:
        done.set()
        t.join()
    # With the GIL held for the whole computation (~20 ms) the ticker would be
    # frozen apart from the interpreter's 5 ms switch interval.
    assert during > 1000, during


def test_threads_compute_correctly_at_once():
    ns = [94, 1000, 19_999, 20_000, 150_000, 300_001] * 4
    results: dict[int, object] = {}

    def work(i, n):
        results[i] = (fib(n), fib_encoded(n, "binary"))

    threads = [threading.Thread(target=work, args=(i, n)) for i, n in enumerate(ns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, n in enumerate(ns):
        value, binary = results[i]
        assert value == gmpy2.fib(n)
        assert int.from_bytes(binary, "big") == gmpy2.fib(n)


def _run(code: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_extension_imports_before_gmpy2_in_fresh_process():
    code = (
        "import sys\n"
        "assert 'gmpy2' not in sys.modules\n"
        "import fastfib._kernel as k\n"
        "import gmpy2\n"
        "assert k.fib(100) == gmpy2.fib(100)\n"
        "libs = {line.split()[-1] for line in open('/proc/self/maps') if 'libgmp' in line}\n"
        "print(len(libs), sorted(libs))\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    count, _, libs = proc.stdout.partition(" ")
    # One GMP in the process: the one the gmpy2 wheel bundles.
    assert count == "1", proc.stdout
    assert "gmpy2.libs" in libs


def test_kernel_links_the_same_gmp_as_gmpy2():
    assert fastfib.gmp_library_version() == gmpy2.mp_version().split()[-1]


def test_installed_package_has_no_sources():
    """`pip install .` put a compiled kernel, and no .pyx or .c, into site-packages."""
    code = (
        "import os, fastfib, fastfib._kernel as k\n"
        "d = os.path.dirname(fastfib.__file__)\n"
        "print(d)\n"
        "print(' '.join(sorted(os.listdir(d))))\n"
        "print(k.__file__)\n"
    )
    proc = _run(code, cwd="/")  # outside the checkout, so the installed copy is imported
    assert proc.returncode == 0, proc.stderr
    where, files, so = proc.stdout.split("\n")[:3]
    assert "site-packages" in where, where
    assert so.endswith(".so")
    assert not [f for f in files.split() if f.endswith((".pyx", ".c", ".pxd"))], files


def test_import_fails_clearly_without_extension(tmp_path):
    """No silent fallback: a checkout without the built extension refuses to import."""
    pkg = tmp_path / "fastfib"
    pkg.mkdir()
    src = os.path.join(REPO, "fastfib")
    for name in os.listdir(src):
        if name.endswith(".py"):
            (pkg / name).write_text(open(os.path.join(src, name)).read())
    proc = subprocess.run(
        [sys.executable, "-c", "import fastfib"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode != 0
    assert "compiled kernel" in proc.stderr and "make build" in proc.stderr
    assert "no pure-Python fallback" in proc.stderr
