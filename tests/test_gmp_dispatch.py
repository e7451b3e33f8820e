"""fastfib.gmp_dispatch: GMP's own routines for CPUs that GMP 6.3.0 does not know.

The decision is a pure function (``plan``), tested on made-up tables; the
change itself is tested in this process and in subprocesses with and without
``FASTFIB_GMP_DISPATCH=off``, which must compute the same numbers.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import sys

import pytest

import fastfib
from fastfib import gmp_dispatch as gd

ALL_FLAGS = set(gd.REQUIRED_FLAGS) | {"sse2", "fpu"}


def _generic_table() -> list[tuple[str, str]]:
    return [(gd.STAND_INS.get(f, f) if f == "preinv_mod_1" else f, "x86_64") for f in gd.CPUVEC_FUNCS]


def _library(*variants: str) -> set[str]:
    return {f"__gmpn_{f}_{v}" for f in gd.CPUVEC_FUNCS for v in variants}


def test_plan_switches_only_the_multiplication_and_linear_entries_of_a_generic_table():
    changes = gd.plan(_generic_table(), _library("x86_64", "coreibwl", "coreihwl", "core2"), ALL_FLAGS)
    assert isinstance(changes, list)
    changed = {gd.CPUVEC_FUNCS[i]: name for i, name in changes}
    assert set(changed) == set(gd.PATCHED)
    # the best routine the library has, in GMP's own order
    assert changed["addmul_1"] == "__gmpn_addmul_1_coreibwl"
    assert not {"mod_1_1p", "mod_1_1p_cps", "divrem_1", "redc_1", "gcd_11"} & set(changed)


def test_plan_takes_the_next_best_routine_when_the_best_is_missing():
    changes = gd.plan(_generic_table(), _library("x86_64", "coreisbr") | {"__gmpn_mul_1_coreibwl"}, ALL_FLAGS)
    changed = {gd.CPUVEC_FUNCS[i]: name for i, name in changes}
    assert changed["mul_1"] == "__gmpn_mul_1_coreibwl"
    assert changed["add_n"] == "__gmpn_add_n_coreisbr"


def test_plan_keeps_what_gmp_chose_for_a_cpu_it_knows():
    table = _generic_table()
    table[3] = ("addmul_1", "coreihwl")
    assert gd.plan(table, _library("x86_64", "coreibwl"), ALL_FLAGS) == "kept: GMP chose its coreihwl code for this CPU"


def test_plan_keeps_generic_code_on_a_cpu_without_the_instructions():
    reason = gd.plan(_generic_table(), _library("x86_64", "coreibwl"), ALL_FLAGS - {"adx", "bmi2"})
    assert reason == "kept generic: the CPU lacks adx, bmi2"


def test_plan_refuses_a_table_of_another_layout():
    table = _generic_table()
    table[5], table[6] = table[6], table[5]
    assert "another GMP layout" in gd.plan(table, _library("x86_64", "coreibwl"), ALL_FLAGS)
    assert "entries" in gd.plan(_generic_table()[:-1], _library("x86_64", "coreibwl"), ALL_FLAGS)
    table = _generic_table()
    table[0] = None
    assert "another GMP layout" in gd.plan(table, _library("x86_64", "coreibwl"), ALL_FLAGS)


def test_plan_with_no_cpu_specific_routines_changes_nothing():
    assert gd.plan(_generic_table(), _library("x86_64"), ALL_FLAGS) == "kept generic: the library has no CPU-specific routines"


def test_kernel_info_says_what_was_done():
    assert f"GMP code: {gd.status()}" in fastfib.kernel_info()
    assert not gd.status().startswith("not applied")


def test_a_switched_table_holds_the_routines_it_names():
    """Where this process's GMP was switched (a CPU GMP 6.3.0 does not know), read the table back."""
    if "switched" not in gd.status():
        pytest.skip(f"GMP was not switched on this machine: {gd.status()}")
    (path,) = gd._loaded_libgmp()
    lib = ctypes.CDLL(path)
    names = {}
    for func in gd.CPUVEC_FUNCS:
        for variant in gd.GENERIC + gd.TARGETS:
            addr = gd._address(lib, f"__gmpn_{func}_{variant}")
            if addr is not None:
                names.setdefault(addr, (func, variant))
    table = ctypes.addressof(ctypes.c_void_p.in_dll(lib, "__gmpn_cpuvec"))
    slots = (ctypes.c_void_p * len(gd.CPUVEC_FUNCS)).from_address(table)
    for i, func in enumerate(gd.CPUVEC_FUNCS):
        _, variant = names[slots[i]]
        if func in gd.PATCHED:
            assert variant in gd.TARGETS, (func, variant)
        else:
            assert variant in gd.GENERIC, (func, variant)


_DIGESTS = """
import hashlib, json, random, sys
import gmpy2
import fastfib
from fastfib import gmp_dispatch
rng = random.Random(7)
ns = [94, 95, 1000, 4097, 65537, 99_999, 300_001, 1_000_000, 2_500_003] + [rng.randint(10**4, 2 * 10**6) for _ in range(12)]
out = {}
for n in ns:
    out[n] = [hashlib.sha256(fastfib.fib_encoded(n, "binary", threads=t)).hexdigest() for t in (1, 2)]
    out[n].append(hashlib.sha256(gmpy2.fib(n).digits(16).encode()).hexdigest())
    out[n].append(hashlib.sha256(fastfib.fib_encoded(n, "decimal")).hexdigest())
print(json.dumps({"status": gmp_dispatch.status(), "digests": out}))
"""


def _digests(off: bool) -> dict:
    env = dict(os.environ)
    env.pop(gd.ENV, None)
    if off:
        env[gd.ENV] = "off"
    r = subprocess.run([sys.executable, "-c", _DIGESTS], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_switched_and_shipped_gmp_compute_the_same_numbers():
    shipped, here = _digests(off=True), _digests(off=False)
    assert shipped["status"] == f"kept as shipped ({gd.ENV}=off)"
    assert here["status"] == gd.status()
    assert here["digests"] == shipped["digests"]
    # and the kernel agrees with gmpy2 on each side
    n = "1000000"
    assert shipped["digests"][n][0] == shipped["digests"][n][1]


def test_binary_digest_matches_an_independent_computation():
    # F(10^6) from Python's own integers (fast doubling in Python), against the kernel in this process
    def fib_pair(k: int) -> tuple[int, int]:
        if k == 0:
            return 0, 1
        a, b = fib_pair(k >> 1)
        c = a * (2 * b - a)
        d = a * a + b * b
        return (d, c + d) if k & 1 else (c, d)

    f = fib_pair(1_000_000)[0]
    want = f.to_bytes((f.bit_length() + 7) // 8, "big")
    assert hashlib.sha256(fastfib.fib_encoded(1_000_000, "binary")).digest() == hashlib.sha256(want).digest()


def test_the_plain_gmpy2_baseline_server_does_not_import_fastfib():
    code = "import sys, bench.servers; print('fastfib' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_use_switched_toggles_between_the_shipped_and_the_switched_routines():
    if "switched" not in gd.status():
        assert gd._use_switched(False) is False  # nothing to toggle where nothing was switched
        return
    (path,) = gd._loaded_libgmp()
    table = ctypes.addressof(ctypes.c_void_p.in_dll(ctypes.CDLL(path), "__gmpn_cpuvec"))
    slots = (ctypes.c_void_p * len(gd.CPUVEC_FUNCS)).from_address(table)
    switched = list(slots)
    want = fastfib.fib_encoded(300_001, "binary")
    try:
        assert gd._use_switched(False) is True
        shipped = list(slots)
        assert shipped != switched
        assert fastfib.fib_encoded(300_001, "binary") == want
        assert [i for i in range(len(slots)) if shipped[i] != switched[i]] == [i for i, _, _ in gd._changed]
    finally:
        gd._use_switched(True)
    assert list(slots) == switched
