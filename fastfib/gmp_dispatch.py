"""GMP's own CPU-specific code on x86-64 CPUs that GMP 6.3.0 does not know.

The GMP that gmpy2's wheel ships is a "fat" build: at its first call it reads
the CPU model and fills ``__gmpn_cpuvec``, a table of pointers to the
assembly routines written for that CPU. A model that GMP 6.3.0 does not know
(newer Xeons, such as the family 6 model 207 of this project's CI machine)
gets its generic x86-64 routines, which do not use the ``mulx``/``adcx``
instructions that every CPU since Broadwell has. There F(n) takes about 1.4×
as long as it would with the Broadwell routines that the same library holds
(docs/kernel.md).

:func:`apply` (called when :mod:`fastfib` is imported) points the table's
multiplication and linear-arithmetic entries at those routines when all of
these hold, and otherwise changes nothing:

- Linux on x86-64, with exactly one GMP loaded, and that GMP is 6.3.0;
- every entry of the table is a routine of the expected name (its layout is
  GMP 6.3.0's), and GMP chose generic code for every entry (it did not know
  the CPU);
- the CPU has every instruction those routines use (``/proc/cpuinfo``).

The routines are GMP's own, picked as GMP itself picks them for a Broadwell
or later Intel CPU. Division, modular and gcd entries are left as they are
(some of them come in pairs that share precomputed tables, and F(n) does not
use them). The change is process-wide: gmpy2 in the same process gets it too.
``FASTFIB_GMP_DISPATCH=off`` in the environment keeps GMP as shipped.
:func:`status` says what was done, and :func:`fastfib.kernel_info` includes it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

#: The environment variable that turns this off ("off"); anything else, or unset, means on.
ENV = "FASTFIB_GMP_DISPATCH"

#: The function entries of GMP 6.3.0's ``struct cpuvec_t``, in order (gmp-impl.h).
CPUVEC_FUNCS = (
    "add_n", "addlsh1_n", "addlsh2_n", "addmul_1", "addmul_2", "bdiv_dbm1c", "cnd_add_n", "cnd_sub_n",
    "com", "copyd", "copyi", "divexact_1", "divrem_1", "gcd_11", "lshift", "lshiftc", "mod_1", "mod_1_1p",
    "mod_1_1p_cps", "mod_1s_2p", "mod_1s_2p_cps", "mod_1s_4p", "mod_1s_4p_cps", "mod_34lsub1",
    "modexact_1c_odd", "mul_1", "mul_basecase", "mullo_basecase", "preinv_divrem_1", "preinv_mod_1",
    "redc_1", "redc_2", "rshift", "sqr_basecase", "sub_n", "sublsh1_n", "submul_1",
)
#: The entries that are changed: multiplication and linear arithmetic, each self-contained.
PATCHED = frozenset({
    "add_n", "addlsh1_n", "addlsh2_n", "addmul_1", "addmul_2", "cnd_add_n", "cnd_sub_n", "com", "copyd",
    "copyi", "lshift", "lshiftc", "mul_1", "mul_basecase", "mullo_basecase", "rshift", "sqr_basecase",
    "sub_n", "sublsh1_n", "submul_1",
})
#: Entries that GMP's fat initialisation may fill with another function's routine (same arguments).
STAND_INS = {"preinv_mod_1": "mod_1", "preinv_divrem_1": "divrem_1"}
#: GMP's generic routines: an entry holding one of these means GMP did not pick code for the CPU.
GENERIC = ("x86_64", "fat")
#: Best first, as GMP's fat initialisation layers them for a Broadwell or later Intel CPU.
TARGETS = ("coreibwl", "coreihwl", "coreisbr", "coreinhm", "core2")
#: The CPU flags those routines need (ADX and BMI2 for Broadwell's and Haswell's multiplications).
REQUIRED_FLAGS = frozenset({"ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "bmi1", "bmi2", "adx"})
GMP_VERSION = "6.3.0"

_status = "not applied (fastfib.gmp_dispatch.apply was not called)"
# What apply changed: the table's address and, per entry changed, (index, shipped routine, new routine).
_table = 0
_changed: list[tuple[int, int, int]] = []


def plan(current: list[tuple[str, str] | None], available: set[str], flags: set[str]) -> list[tuple[int, str]] | str:
    """The entries to change, as (index, routine name), or the reason to change nothing.

    ``current`` is, for each entry of the table, (function, variant) of the routine it
    holds, or None if it holds no routine of a known name; ``available`` the exported
    routine names of the library (``__gmpn_<function>_<variant>``); ``flags`` the CPU's.
    Pure: it reads and writes no memory.
    """
    if len(current) != len(CPUVEC_FUNCS):
        return f"the table has {len(current)} entries, GMP {GMP_VERSION}'s has {len(CPUVEC_FUNCS)}"
    for i, (func, entry) in enumerate(zip(CPUVEC_FUNCS, current, strict=True)):
        if entry is None or entry[0] not in (func, STAND_INS.get(func)):
            return f"entry {i} is not {func} (another GMP layout)"
    chosen = sorted({variant for _, variant in current} - set(GENERIC))
    if chosen:
        return f"kept: GMP chose its {'/'.join(chosen)} code for this CPU"
    missing = sorted(REQUIRED_FLAGS - flags)
    if missing:
        return f"kept generic: the CPU lacks {', '.join(missing)}"
    changes = []
    for i, func in enumerate(CPUVEC_FUNCS):
        if func not in PATCHED:
            continue
        for target in TARGETS:
            name = f"__gmpn_{func}_{target}"
            if name in available:
                changes.append((i, name))
                break
    return changes or "kept generic: the library has no CPU-specific routines"


def status() -> str:
    """What :func:`apply` did, in words."""
    return _status


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def _loaded_libgmp() -> list[str]:
    paths = set()
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 6 and os.path.basename(parts[5]).startswith("libgmp"):
                paths.add(parts[5])
    return sorted(paths)


def _address(lib: ctypes.CDLL, name: str) -> int | None:
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    except AttributeError:
        return None


def _apply() -> str:
    if os.environ.get(ENV, "").strip().lower() == "off":
        return f"kept as shipped ({ENV}=off)"
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return "kept: not Linux on x86-64"
    libs = _loaded_libgmp()
    if len(libs) != 1:
        return f"kept: {len(libs)} GMP libraries are loaded, not one"
    lib = ctypes.CDLL(libs[0])  # already loaded (by gmpy2): the same handle, not a second copy
    try:
        version = ctypes.c_char_p.in_dll(lib, "__gmp_version").value.decode()
        table = ctypes.addressof(ctypes.c_void_p.in_dll(lib, "__gmpn_cpuvec"))
        ready = ctypes.c_int.in_dll(lib, "__gmpn_cpuvec_initialized")
    except (ValueError, AttributeError):
        return "kept: not a fat GMP build (no __gmpn_cpuvec)"
    if version != GMP_VERSION:
        return f"kept: GMP {version}, not {GMP_VERSION}"
    if not ready.value:
        # GMP fills the table at its first call; gmpy2 has made calls by now, but make sure.
        lib.__gmpn_cpuvec_init()
    known: dict[int, tuple[str, str]] = {}
    available: set[str] = set()
    for func in CPUVEC_FUNCS:
        for variant in GENERIC + TARGETS:
            name = f"__gmpn_{func}_{variant}"
            addr = _address(lib, name)
            if addr is not None:
                known.setdefault(addr, (func, variant))
                available.add(name)
    slots = (ctypes.c_void_p * len(CPUVEC_FUNCS)).from_address(table)
    current = [known.get(slots[i] or 0) for i in range(len(CPUVEC_FUNCS))]
    changes = plan(current, available, _cpu_flags())
    if isinstance(changes, str):
        return changes
    global _table
    _table = table
    for i, name in changes:
        new = _address(lib, name)
        _changed.append((i, slots[i], new))
        slots[i] = new
    targets = sorted({name.rsplit("_", 1)[1] for _, name in changes}, key=TARGETS.index)
    return f"{len(changes)} routines switched from generic to GMP's {'/'.join(targets)} code (CPU not known to GMP)"


def apply() -> str:
    """Point GMP at its own routines for this CPU where it chose generic ones (see the module
    docstring); return, and keep for :func:`status`, what was done. Never raises."""
    global _status
    try:
        _status = _apply()
    except Exception as exc:  # a reading that did not work out leaves GMP as it is
        _status = f"kept: {type(exc).__name__}: {exc}"
    log.debug("GMP dispatch: %s", _status)
    return _status


def _use_switched(on: bool) -> bool:
    """Benchmarks only (bench.gmp_dispatch): GMP's shipped routines (False) or the switched ones
    (True), in this process; False if apply switched nothing. Call it while no thread computes."""
    if not _changed:
        return False
    slots = (ctypes.c_void_p * len(CPUVEC_FUNCS)).from_address(_table)
    for i, shipped, new in _changed:
        slots[i] = new if on else shipped
    return True
