"""GMP's own faster routines on x86-64 CPUs where GMP 6.3.0 picks slower ones.

The GMP that gmpy2's wheel ships is a "fat" build: at its first call it reads
the CPU model and fills ``__gmpn_cpuvec``, a table of pointers to the
assembly routines written for that CPU. Three cases leave F(n) slower than the
same library can make it (docs/kernel.md):

- **An Intel model that GMP 6.3.0 does not know** (newer Xeons, such as the
  family 6 model 207 of one of this project's CI machines) gets its generic
  x86-64 routines, which do not use the ``mulx``/``adcx`` instructions that
  every Intel CPU since Broadwell has: about 1.4× the time per F(n).
- **AMD family 25** (Zen 3 and Zen 4) gets GMP's zen routines, whose
  basecase multiplication adds its partial products with one ``adc`` carry
  chain. GMP's Broadwell routines for the same five entries run two
  (``adcx``/``adox``); on a Zen 4 (model 17) they took
  0.86–0.90× the time per F(n).
- **AMD family 26** (Zen 5), which GMP 6.3.0 does not know, gets its generic
  routines; GMP's zen routines, which it picks itself for family 25, took
  about 0.70× the time per F(n) on a family 26, model 2.

:func:`apply` points the table's entries at GMP's own better routines when
all of these hold, and otherwise changes nothing:

- Linux on x86-64, with exactly one GMP loaded, and that GMP is 6.3.0;
- every entry of the table is a routine of the expected name (its layout is
  GMP 6.3.0's);
- the CPU has the instructions those routines use (SSSE3, BMI2, ADX;
  ``/proc/cpuinfo``), checked with the rest of Broadwell's set;
- Intel: GMP chose generic code for every entry (it did not know the CPU);
  then the multiplication and linear-arithmetic entries get the routines GMP
  itself picks for a Broadwell or later Intel CPU;
- AMD family 26 (:data:`AMD_NEW_FAMILIES`), any model: likewise generic code
  for every entry; then those entries get GMP's zen routine where it has one;
- AMD family 25, model 17, the one measured (:data:`AMD_MODELS`): GMP chose
  its zen code for the five basecase multiplication entries (``addmul_1``,
  ``mul_1``, ``mul_basecase``, ``mullo_basecase``, ``sqr_basecase``); then
  those five get GMP's Broadwell (``coreibwl``) routines and the rest stays
  as GMP chose it. Other AMD models keep GMP's choice: how fast
  ``adcx``/``adox`` run differs between generations.

Division, modular and gcd entries are left as they are (some of them come
in pairs that share precomputed tables, and F(n) does not use them), as are
the size thresholds. The change is process-wide: gmpy2 in the same process
gets it too. The kernel calls :func:`apply` at its first F(n) with n >= 20000
(and before it calibrates two threads), a ``fastfib serve`` worker when it
starts; a process that only imports fastfib, a client for instance, keeps GMP
as it is. ``FASTFIB_GMP_DISPATCH=off`` in the environment keeps GMP as
shipped everywhere. :func:`status` says what was done, and
:func:`fastfib.kernel_info` includes it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sys

log = logging.getLogger(__name__)

#: The environment variable that turns the switch off (one of OFF); anything else, or unset, means on.
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
#: Every other variant suffix of GMP 6.3.0's x86-64 fat build: for naming what GMP chose on a CPU it knows.
OTHER_VARIANTS = ("k8", "k10", "bd1", "bt1", "bt2", "zen", "pentium4", "atom", "silvermont", "goldmont", "nano",
                  "skylake")
#: The CPU flags checked: the routines use SSSE3, BMI2 and ADX; the rest of Broadwell's set is a
#: conservative margin.
REQUIRED_FLAGS = frozenset({"ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "bmi1", "bmi2", "adx"})
VENDOR = "GenuineIntel"
#: AMD: the (family, model) pairs whose zen routines are replaced (those measured faster:
#: docs/kernel.md), the entries replaced, and with what.
AMD_VENDOR = "AuthenticAMD"
AMD_MODELS = frozenset({(25, 17)})
AMD_FROM = "zen"
AMD_PATCHED = ("addmul_1", "mul_1", "mul_basecase", "mullo_basecase", "sqr_basecase")
AMD_TARGET = "coreibwl"
#: AMD families that GMP 6.3.0 does not know (it gives them generic code) and that were measured
#: faster with its zen routines: 26 (Zen 5).
AMD_NEW_FAMILIES = frozenset({26})
GMP_VERSION = "6.3.0"
#: The values of ENV that turn the switch off.
OFF = ("off", "0", "false", "no")

_status = "not chosen yet (at the first F(n) with n >= 20000, or when a worker starts)"
# What apply changed: the table's address and, per entry changed, (index, shipped routine, new routine).
_applied = False
_table = 0
_changed: list[tuple[int, int, int]] = []


def plan(current: list[tuple[str, str] | None], available: set[str], flags: set[str],
         vendor: str = VENDOR, family: int = 6, model: int = 0) -> list[tuple[int, str]] | str:
    """The entries to change, as (index, routine name), or the reason to change nothing.

    ``current`` is, for each entry of the table, (function, variant) of the routine it
    holds, or None if it holds no routine of a known name; ``available`` the exported
    routine names of the library (``__gmpn_<function>_<variant>``); ``flags``,
    ``vendor``, ``family`` and ``model`` the CPU's. Pure: it reads and writes no memory.
    """
    if len(current) != len(CPUVEC_FUNCS):
        return f"the table has {len(current)} entries, GMP {GMP_VERSION}'s has {len(CPUVEC_FUNCS)}"
    for i, (func, entry) in enumerate(zip(CPUVEC_FUNCS, current, strict=True)):
        if entry is None or entry[0] not in (func, STAND_INS.get(func)):
            return f"entry {i} is not {func} (another GMP layout)"
    chosen = sorted({variant for _, variant in current} - set(GENERIC))
    if chosen and vendor == AMD_VENDOR and (family, model) in AMD_MODELS:
        return _plan_zen(current, available, flags, family)
    if chosen:
        return f"kept: GMP chose its {'/'.join(chosen)} code for this CPU"
    if vendor == VENDOR:
        targets = TARGETS
    elif vendor == AMD_VENDOR and family in AMD_NEW_FAMILIES:
        targets = (AMD_FROM,)  # what GMP 6.3.0 itself picks for the Zen families it knows
    else:
        return f"kept generic: a {vendor or 'unknown'} CPU of family {family} (the switch is for Intel CPUs " \
               f"and AMD family {'/'.join(map(str, sorted(AMD_NEW_FAMILIES)))})"
    missing = sorted(REQUIRED_FLAGS - flags)
    if missing:
        return f"kept generic: the CPU lacks {', '.join(missing)}"
    changes = []
    for i, func in enumerate(CPUVEC_FUNCS):
        if func not in PATCHED:
            continue
        for target in targets:
            name = f"__gmpn_{func}_{target}"
            if name in available:
                changes.append((i, name))
                break
    return changes or "kept generic: the library has no CPU-specific routines"


def _plan_zen(current: list[tuple[str, str]], available: set[str], flags: set[str],
              family: int) -> list[tuple[int, str]] | str:
    missing = sorted(REQUIRED_FLAGS - flags)
    if missing:
        return f"kept: GMP's code for AMD family {family}; the CPU lacks {', '.join(missing)}"
    changes = []
    for i, func in enumerate(CPUVEC_FUNCS):
        if func not in AMD_PATCHED:
            continue
        variant = current[i][1]
        if variant != AMD_FROM:
            return f"kept: GMP chose its {variant} {func} for this AMD family {family} CPU, not its {AMD_FROM} one"
        name = f"__gmpn_{func}_{AMD_TARGET}"
        if name not in available:
            return f"kept: the library has no {name}"
        changes.append((i, name))
    return changes


def status() -> str:
    """What :func:`apply` did, in words."""
    return _status


def _cpu() -> tuple[str, int, int, set[str]]:
    """The first CPU's vendor, family, model and flags, from /proc/cpuinfo."""
    vendor, family, model, flags = "", -1, -1, set()
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("vendor_id") and not vendor:
                vendor = line.split(":", 1)[1].strip()
            elif line.startswith("cpu family") and family < 0:
                family = int(line.split(":", 1)[1])
            elif re.match(r"model\s*:", line) and model < 0:
                model = int(line.split(":", 1)[1])
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return vendor, family, model, flags


def _loaded_libgmp() -> list[str]:
    paths = set()
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 6 and os.path.basename(parts[5]).startswith("libgmp"):
                paths.add(parts[5])
    return sorted(paths)


class _Gmp:
    """The one libgmp of this process, its routine table, and the names of its routines."""

    def __init__(self) -> None:
        libs = _loaded_libgmp()
        if len(libs) != 1:
            raise LookupError(f"{len(libs)} GMP libraries are loaded, not one")
        self.lib = ctypes.CDLL(libs[0])  # already loaded (by gmpy2): the same handle, not a second copy
        try:
            self.version = ctypes.c_char_p.in_dll(self.lib, "__gmp_version").value.decode()
            self.table = ctypes.addressof(ctypes.c_void_p.in_dll(self.lib, "__gmpn_cpuvec"))
            ready = ctypes.c_int.in_dll(self.lib, "__gmpn_cpuvec_initialized")
        except (ValueError, AttributeError):
            raise LookupError("not a fat GMP build (no __gmpn_cpuvec)") from None
        if not ready.value:
            # GMP fills the table at its first call; gmpy2 has made calls by now, but make sure.
            getattr(self.lib, "__gmpn_cpuvec_init")()  # not self.lib.__gmpn...: a class would mangle that name
        self.slots = (ctypes.c_void_p * len(CPUVEC_FUNCS)).from_address(self.table)
        self.known: dict[int, tuple[str, str]] = {}
        self.available: set[str] = set()
        for func in CPUVEC_FUNCS:
            for variant in GENERIC + TARGETS + OTHER_VARIANTS:
                name = f"__gmpn_{func}_{variant}"
                addr = self.address(name)
                if addr is not None:
                    self.known.setdefault(addr, (func, variant))
                    self.available.add(name)

    def address(self, name: str) -> int | None:
        try:
            return ctypes.cast(getattr(self.lib, name), ctypes.c_void_p).value
        except AttributeError:
            return None

    def current(self) -> list[tuple[str, str] | None]:
        return [self.known.get(self.slots[i] or 0) for i in range(len(CPUVEC_FUNCS))]


def read_table() -> list[tuple[str, str] | None]:
    """What each entry of this process's GMP routine table holds, as (function, variant), or None
    for a routine of no known name. Reads only; LookupError if there is no such table."""
    return _Gmp().current()


#: The size thresholds that follow the routines in GMP 6.3.0's table (in limbs), left as GMP set them.
CPUVEC_THRESHOLDS = ("mul_toom22", "mul_toom33", "sqr_toom2", "sqr_toom3", "bmod_1_to_mod_1")


def thresholds() -> dict[str, int]:
    """The table's size thresholds, e.g. ``sqr_toom2``: GMP calls ``sqr_basecase`` only below it
    (the generic routine supports no larger size). Reads only; LookupError if there is no table."""
    values = (ctypes.c_long * (len(CPUVEC_FUNCS) + len(CPUVEC_THRESHOLDS))).from_address(_Gmp().table)
    return {name: values[len(CPUVEC_FUNCS) + i] for i, name in enumerate(CPUVEC_THRESHOLDS)}


def _apply() -> str:
    if os.environ.get(ENV, "").strip().lower() in OFF:
        return f"kept as shipped ({ENV}={os.environ[ENV].strip()})"
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return "kept: not Linux on x86-64"
    try:
        gmp = _Gmp()
    except LookupError as exc:
        return f"kept: {exc}"
    if gmp.version != GMP_VERSION:
        return f"kept: GMP {gmp.version}, not {GMP_VERSION}"
    vendor, family, model, flags = _cpu()
    current = gmp.current()
    changes = plan(current, gmp.available, flags, vendor, family, model)
    if isinstance(changes, str):
        return changes
    global _table
    _table = gmp.table
    for i, name in changes:
        new = gmp.address(name)
        _changed.append((i, gmp.slots[i], new))
        gmp.slots[i] = new
    targets = "/".join(sorted({name.rsplit("_", 1)[1] for _, name in changes}, key=(TARGETS + OTHER_VARIANTS).index))
    replaced = sorted({current[i][1] for i, _ in changes} - set(GENERIC))
    if replaced:
        return (f"{len(changes)} routines switched from GMP's {'/'.join(replaced)} code to its {targets} code "
                f"(AMD family {family}, model {model})")
    cpu = f"AMD family {family}, model {model}, " if vendor == AMD_VENDOR else ""
    return f"{len(changes)} routines switched from generic to GMP's {targets} code ({cpu}CPU not known to GMP)"


def apply() -> str:
    """Point GMP at its own faster routines where it chose slower ones for this CPU (see the
    module docstring); return, and keep for :func:`status`, what was done. Never raises; once
    done, a later call returns the same answer and changes nothing."""
    global _status, _applied
    if _applied:
        return _status
    _applied = True
    try:
        _status = _apply()
    except Exception as exc:  # a reading that did not work out leaves GMP as it is
        _status = f"kept: {type(exc).__name__}: {exc}"
    log.debug("GMP code: %s", _status)
    return _status


def changed() -> list[tuple[int, int, int]]:
    """What :func:`apply` switched: (entry index, shipped routine's address, new routine's address)."""
    return list(_changed)


def use_switched(on: bool) -> bool:
    """For benchmarks and tests: GMP's shipped routines (False) or the switched ones (True), in
    this process; False if :func:`apply` switched nothing. Each entry is one aligned pointer
    write, and the two routines compute the same, so a computation running meanwhile is safe."""
    if not _changed:
        return False
    slots = (ctypes.c_void_p * len(CPUVEC_FUNCS)).from_address(_table)
    for i, shipped, new in _changed:
        slots[i] = new if on else shipped
    return True
