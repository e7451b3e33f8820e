"""fastfib.gmp_dispatch: GMP's own faster routines where GMP 6.3.0 picks slower ones.

The decision is a pure function (``plan``), tested on made-up tables. The
switch itself is tested where it happens (on a CPU like this project's CI
machines, an Intel that GMP does not know or an AMD Zen 4, where it must
happen): the table read back, each switched routine against the one it
replaced, and F(n) from a process with the switch against one with
``FASTFIB_GMP_DISPATCH=off``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import gmpy2
import pytest

import fastfib
from fastfib import gmp_dispatch as gd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_FLAGS = set(gd.REQUIRED_FLAGS) | {"sse2", "fpu"}


def _generic_table() -> list[tuple[str, str]]:
    return [("mod_1" if f == "preinv_mod_1" else f, "x86_64") for f in gd.CPUVEC_FUNCS]


def _zen_table() -> list[tuple[str, str]]:
    """What GMP 6.3.0 chose on the AMD Zen 4 of a CI machine: zen where it has a zen routine."""
    zen = {"addlsh1_n", "addmul_1", "com", "copyd", "copyi", "gcd_11", "lshift", "lshiftc", "mul_1", "mul_basecase",
           "mullo_basecase", "rshift", "sqr_basecase", "sublsh1_n", "submul_1"}
    return [(f, "zen") if f in zen else entry for f, entry in zip(gd.CPUVEC_FUNCS, _generic_table(), strict=True)]


def _library(*variants: str) -> set[str]:
    return {f"__gmpn_{f}_{v}" for f in gd.CPUVEC_FUNCS for v in variants}


def _run(code: str, env_extra: dict | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != gd.ENV}
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


# --- the decision ------------------------------------------------------------------------


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
    table[3] = ("addmul_1", "zen")
    assert gd.plan(table, _library("x86_64", "coreibwl"), ALL_FLAGS) == "kept: GMP chose its zen code for this CPU"


def test_plan_keeps_generic_code_on_a_cpu_without_the_instructions_or_not_intel():
    lib = _library("x86_64", "coreibwl")
    assert gd.plan(_generic_table(), lib, ALL_FLAGS - {"adx", "bmi2"}) == "kept generic: the CPU lacks adx, bmi2"
    assert gd.plan(_generic_table(), lib, ALL_FLAGS, "AuthenticAMD", 23, 1) == (
        "kept generic: a AuthenticAMD CPU of family 23 (the switch is for Intel CPUs and AMD family 26)")


def test_plan_on_amd_family_26_takes_gmps_zen_routines_where_the_library_has_them():
    zen = {f for f, v in _zen_table() if v == "zen"} & gd.PATCHED
    lib = _library("x86_64", "coreibwl") | {f"__gmpn_{f}_zen" for f in zen}
    changes = gd.plan(_generic_table(), lib, ALL_FLAGS, "AuthenticAMD", 26, 2)
    assert isinstance(changes, list)
    assert {gd.CPUVEC_FUNCS[i]: name for i, name in changes} == {f: f"__gmpn_{f}_zen" for f in zen}
    assert "gcd_11" not in zen and len(zen) == 14  # only multiplication and linear arithmetic
    # any model of the family; not another family, nor without the instructions or the routines
    assert isinstance(gd.plan(_generic_table(), lib, ALL_FLAGS, "AuthenticAMD", 26, 68), list)
    assert gd.plan(_generic_table(), lib, ALL_FLAGS, "AuthenticAMD", 27, 2).startswith(
        "kept generic: a AuthenticAMD CPU of family 27")
    assert gd.plan(_generic_table(), lib, ALL_FLAGS - {"bmi2"}, "AuthenticAMD", 26, 2) == (
        "kept generic: the CPU lacks bmi2")
    assert gd.plan(_generic_table(), _library("x86_64", "coreibwl"), ALL_FLAGS, "AuthenticAMD", 26, 2) == (
        "kept generic: the library has no CPU-specific routines")
    # where GMP knew the CPU (a later GMP), its choice stands
    assert gd.plan(_zen_table(), lib, ALL_FLAGS, "AuthenticAMD", 26, 2) == "kept: GMP chose its zen code for this CPU"


def test_plan_on_amd_family_25_switches_the_five_basecase_multiplication_entries_from_zen():
    lib = _library("x86_64", "zen", "coreibwl", "coreihwl")
    changes = gd.plan(_zen_table(), lib, ALL_FLAGS, "AuthenticAMD", 25, 17)
    assert isinstance(changes, list)
    assert {gd.CPUVEC_FUNCS[i]: name for i, name in changes} == {
        f: f"__gmpn_{f}_coreibwl" for f in ("addmul_1", "mul_1", "mul_basecase", "mullo_basecase", "sqr_basecase")}


def test_plan_on_amd_keeps_gmps_choice_on_other_models_or_without_the_instructions_or_routines():
    lib = _library("x86_64", "zen", "coreibwl")
    kept = "kept: GMP chose its zen code for this CPU"
    assert gd.plan(_zen_table(), lib, ALL_FLAGS, "AuthenticAMD", 23, 17) == kept  # another family
    assert gd.plan(_zen_table(), lib, ALL_FLAGS, "AuthenticAMD", 25, 33) == kept  # a model not measured
    assert gd.plan(_zen_table(), lib, ALL_FLAGS - {"adx"}, "AuthenticAMD", 25, 17) == (
        "kept: GMP's code for AMD family 25; the CPU lacks adx")
    table = _zen_table()
    table[gd.CPUVEC_FUNCS.index("mul_basecase")] = ("mul_basecase", "bd1")
    assert gd.plan(table, lib, ALL_FLAGS, "AuthenticAMD", 25, 17) == (
        "kept: GMP chose its bd1 mul_basecase for this AMD family 25 CPU, not its zen one")
    assert gd.plan(_zen_table(), _library("x86_64", "zen"), ALL_FLAGS, "AuthenticAMD", 25, 17) == (
        "kept: the library has no __gmpn_addmul_1_coreibwl")
    # an Intel CPU of the same family and model numbers is not an AMD one
    assert gd.plan(_zen_table(), lib, ALL_FLAGS, gd.VENDOR, 25, 17) == kept


def test_plan_refuses_a_table_of_another_layout():
    lib = _library("x86_64", "coreibwl")
    table = _generic_table()
    table[5], table[6] = table[6], table[5]
    assert gd.plan(table, lib, ALL_FLAGS) == "entry 5 is not bdiv_dbm1c (another GMP layout)"
    assert "entries" in gd.plan(_generic_table()[:-1], lib, ALL_FLAGS)
    table = _generic_table()
    table[0] = None
    assert gd.plan(table, lib, ALL_FLAGS) == "entry 0 is not add_n (another GMP layout)"


def test_plan_with_no_cpu_specific_routines_changes_nothing():
    assert gd.plan(_generic_table(), _library("x86_64"), ALL_FLAGS) == "kept generic: the library has no CPU-specific routines"


# --- when it happens ---------------------------------------------------------------------


def test_importing_fastfib_alone_changes_nothing_and_the_first_large_f_n_does():
    out = json.loads(_run(
        "import json, fastfib\n"
        "from fastfib import gmp_dispatch as gd\n"
        "a = gd.status(); fastfib.fib(19999); b = gd.status(); fastfib.fib_encoded(20000, 'binary')\n"
        "print(json.dumps([a, b, gd.status(), fastfib.kernel_info()]))"))
    assert out[0].startswith("not chosen yet") and out[1] == out[0]
    assert not out[2].startswith("not chosen yet")
    assert out[3].endswith(f"GMP code: {out[2]}")


def test_off_in_the_environment_keeps_gmp_as_shipped():
    for value in ("off", "0", "false"):
        code = "import fastfib; fastfib.fib(10**5); from fastfib import gmp_dispatch as gd; print(gd.status(), gd.changed())"
        assert _run(code, {gd.ENV: value}) == f"kept as shipped ({gd.ENV}={value}) []"


def test_apply_twice_changes_nothing_more():
    first = gd.apply()
    n = len(gd.changed())
    assert gd.apply() == first and len(gd.changed()) == n
    assert not re.match(r"kept: \w+(Error|Exception)\b", first), first  # a failure, not a decision


def _expected_switch() -> tuple[str, dict[str, str]] | None:
    """Where this machine is one where the switch must happen: which case ("intel", "amd" or
    "amd-new") and the variant each switched entry must then hold; else None. Must: GMP 6.3.0
    and the instructions, and either an Intel CPU or an AMD CPU of a family GMP does not know
    for which GMP chose generic routines for every entry, or an AMD CPU of a measured model for
    which it chose its zen ones for the five basecase entries (read in a process with the switch
    off)."""
    vendor, family, model, flags = gd._cpu()
    if not gd.REQUIRED_FLAGS <= flags or gmpy2.mp_version() != f"GMP {gd.GMP_VERSION}":
        return None
    if vendor != gd.VENDOR and not (vendor == gd.AMD_VENDOR and ((family, model) in gd.AMD_MODELS
                                                                 or family in gd.AMD_NEW_FAMILIES)):
        return None
    table = _shipped_table()
    if table is None or None in table:
        return None
    shipped = dict(zip(gd.CPUVEC_FUNCS, table, strict=True))
    if vendor == gd.VENDOR and all(entry[1] in gd.GENERIC for entry in shipped.values()):
        # as GMP 6.3.0's fat initialisation layers them for a Broadwell: core2, ..., coreibwl
        return "intel", {"sqr_basecase": "coreibwl", "mul_basecase": "coreibwl", "addmul_1": "coreibwl",
                         "mul_1": "coreibwl", "addmul_2": "coreihwl", "add_n": "coreihwl", "sub_n": "coreihwl",
                         "submul_1": "coreihwl", "lshift": "coreisbr", "rshift": "coreisbr", "copyi": "core2",
                         "com": "core2"}
    if (family, model) in gd.AMD_MODELS and all(shipped[f] == (f, gd.AMD_FROM) for f in gd.AMD_PATCHED):
        return "amd", {f: gd.AMD_TARGET for f in gd.AMD_PATCHED}
    if family in gd.AMD_NEW_FAMILIES and all(entry[1] in gd.GENERIC for entry in shipped.values()):
        # what GMP 6.3.0 chose on a Zen 4 (family 25) for the entries the switch may change
        return "amd-new", {f: v for f, v in _zen_table() if v == "zen" and f in gd.PATCHED}
    return None


@functools.cache  # the same in every process of this session: read once, not once per test
def _shipped_table() -> list[tuple[str, str] | None] | None:
    """The table as GMP filled it, read in a process with the switch off; None where there is no table.
    Not to be mutated (it is shared)."""
    out = json.loads(_run(
        "import json\nfrom fastfib import gmp_dispatch as gd\n"
        "try:\n    t = gd.read_table()\nexcept LookupError:\n    t = None\nprint(json.dumps(t))", {gd.ENV: "off"}))
    return None if out is None else [tuple(e) if e else None for e in out]


def test_the_switch_happens_where_gmp_picks_slower_code_and_names_the_routines_it_should():
    status = gd.apply()
    found = _expected_switch()
    if found is None:
        assert not gd.changed(), status
        pytest.skip(f"GMP needs no switch on this machine: {status}")
    case, expected = found
    table = dict(zip(gd.CPUVEC_FUNCS, gd.read_table(), strict=True))
    shipped = dict(zip(gd.CPUVEC_FUNCS, _shipped_table(), strict=True))
    assert {f: table[f][1] for f in expected} == expected, status
    switched = {f for f in gd.CPUVEC_FUNCS if table[f] != shipped[f]}
    if case == "intel":
        assert status.startswith(f"{len(gd.PATCHED)} routines switched from generic"), status
        assert switched == set(gd.PATCHED)
        assert all(table[f][1] in gd.TARGETS for f in switched)
    elif case == "amd-new":
        assert status.startswith(f"{len(expected)} routines switched from generic to GMP's zen code (AMD family"), status
        assert switched == set(expected)
    else:
        assert status.startswith(f"{len(gd.AMD_PATCHED)} routines switched from GMP's zen code"), status
        assert switched == set(gd.AMD_PATCHED)


# Each switched routine against the routine it replaced, on random limbs, sizes 1..40
# (sqr_basecase: the sizes GMP calls it with), in a subprocess (a wrong routine could crash the process rather than answer wrong).
_ROUTINES = r"""
import ctypes, random, sys
from fastfib import gmp_dispatch as gd
gd.apply()
L, P, N = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_long
# function -> (result type, kind of arguments)
SIGS = {
    "add_n": (L, "rpuvn"), "sub_n": (L, "rpuvn"), "addlsh1_n": (L, "rpuvn"), "addlsh2_n": (L, "rpuvn"),
    "sublsh1_n": (L, "rpuvn"), "addmul_1": (L, "rpunl"), "submul_1": (L, "rpunl"), "mul_1": (L, "rpunl"),
    "addmul_2": (L, "rpunv2"), "cnd_add_n": (L, "cnd"), "cnd_sub_n": (L, "cnd"), "com": (None, "rpun"),
    "copyi": (None, "rpun"), "copyd": (None, "rpun"), "lshift": (L, "shift"), "rshift": (L, "shift"),
    "lshiftc": (L, "shift"), "mul_basecase": (None, "mulbc"), "sqr_basecase": (None, "sqr"),
    "mullo_basecase": (None, "mullo"),
}
rng = random.Random(1)
def limbs(k):
    return (L * max(k, 1))(*[rng.getrandbits(64) for _ in range(max(k, 1))])
def run(addr, func, n, seed):
    global rng
    rng = random.Random(seed)
    res, kind = SIGS[func]
    up, vp, rp = limbs(n), limbs(n), limbs(2 * n + 2)
    if kind == "rpuvn":
        f = ctypes.CFUNCTYPE(res, P, P, P, N)(addr); r = f(rp, up, vp, n)
    elif kind == "rpunl":
        f = ctypes.CFUNCTYPE(res, P, P, N, L)(addr); r = f(rp, up, n, vp[0])
    elif kind == "rpunv2":
        f = ctypes.CFUNCTYPE(res, P, P, N, P)(addr); r = f(rp, up, n, vp)
    elif kind == "cnd":
        f = ctypes.CFUNCTYPE(res, L, P, P, P, N)(addr); r = (f(1, rp, up, vp, n), f(0, rp, up, vp, n))
    elif kind == "rpun":
        f = ctypes.CFUNCTYPE(res, P, P, N)(addr); r = f(rp, up, n)
    elif kind == "shift":
        f = ctypes.CFUNCTYPE(res, P, P, N, ctypes.c_uint)(addr); r = tuple(f(rp, up, n, c) for c in (1, 13, 63))
    elif kind == "mulbc":
        k = max(1, n // 2)
        f = ctypes.CFUNCTYPE(res, P, P, N, P, N)(addr); r = f(rp, up, n, vp, k)
    elif kind == "sqr":
        f = ctypes.CFUNCTYPE(res, P, P, N)(addr); r = f(rp, up, n)
    else:
        f = ctypes.CFUNCTYPE(res, P, P, P, N)(addr); r = f(rp, up, vp, n)
    return r, list(rp)
# GMP calls sqr_basecase only below this size, and the generic one handles no larger size
sqr_max = gd.thresholds()["sqr_toom2"] - 1
checked = 0
for i, shipped, new in gd.changed():
    func = gd.CPUVEC_FUNCS[i]
    for n in range(2 if func == "addmul_2" else 1, sqr_max + 1 if func == "sqr_basecase" else 41):
        a, b = run(shipped, func, n, n), run(new, func, n, n)
        if a != b:
            sys.exit(f"{func} n={n}: the switched routine differs from the shipped one")
        checked += 1
print(checked, len(gd.changed()), sqr_max)
"""


def test_each_switched_routine_computes_what_the_one_it_replaced_does():
    found = _expected_switch()
    if found is None:
        pytest.skip(f"GMP needs no switch on this machine: {gd.status()}")
    checked, routines, sqr_max = map(int, _run(_ROUTINES).split())
    funcs = {"intel": gd.PATCHED, "amd": gd.AMD_PATCHED, "amd-new": found[1]}[found[0]]
    assert routines == len(funcs) and sqr_max >= 16
    # addmul_2 from n=2, sqr_basecase below the threshold, the rest 1..40
    assert checked == sum(39 if f == "addmul_2" else sqr_max if f == "sqr_basecase" else 40 for f in funcs)


_DIGESTS = """
import hashlib, json, random
import gmpy2
import fastfib
from fastfib import gmp_dispatch
rng = random.Random(7)
ns = [94, 95, 1000, 4097, 20000, 65537, 99_999, 300_001, 1_000_000, 2_500_003]
ns += [rng.randint(10**4, 2 * 10**6) for _ in range(12)]
out = {}
for n in ns:
    b = fastfib.fib_encoded(n, "binary", threads=1)
    out[n] = [hashlib.sha256(b).hexdigest(), fastfib.fib_encoded(n, "binary", threads=2) == b,
              int.from_bytes(b, "big") == int(gmpy2.fib(n)),
              hashlib.sha256(fastfib.fib_encoded(n, "decimal")).hexdigest()]
print(json.dumps({"status": gmp_dispatch.status(), "digests": out}))
"""


def test_switched_and_shipped_gmp_compute_the_same_numbers():
    shipped, here = json.loads(_run(_DIGESTS, {gd.ENV: "off"})), json.loads(_run(_DIGESTS))
    assert shipped["status"] == f"kept as shipped ({gd.ENV}=off)"
    assert here["status"] == gd.apply()
    assert here["digests"] == shipped["digests"]
    # within each process: two threads agree with one, and the kernel with gmpy2.fib
    assert all(d[1] and d[2] for d in here["digests"].values())


def test_use_switched_toggles_between_the_shipped_and_the_switched_routines():
    gd.apply()
    if not gd.changed():
        assert gd.use_switched(False) is False  # nothing to toggle where nothing was switched
        return
    switched = gd.read_table()
    want = fastfib.fib_encoded(300_001, "binary")
    try:
        assert gd.use_switched(False) is True
        shipped = gd.read_table()
        assert [i for i, (a, b) in enumerate(zip(shipped, switched, strict=True)) if a != b] == [
            i for i, _, _ in gd.changed()]
        assert shipped == _shipped_table()
        assert fastfib.fib_encoded(300_001, "binary") == want
    finally:
        gd.use_switched(True)
    assert gd.read_table() == switched


def test_the_plain_gmpy2_baseline_server_does_not_import_fastfib():
    assert _run("import sys, bench.servers; print('fastfib' in sys.modules)") == "False"
