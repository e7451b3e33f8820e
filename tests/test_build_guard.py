"""The kernel's build-time guard: a C compiler whose ``unsigned long`` is not 64 bits stops the build.

No 32-bit toolchain is installed here (``gcc -m32`` lacks glibc's 32-bit headers),
so the test compiles the current .pyx to C, takes the guard out of the generated
C, and runs the C preprocessor on it with a ``limits.h`` of each width.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gmpy2
import pytest

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = "fastfib needs a 64-bit unsigned long"


@pytest.fixture(scope="module")
def guard(tmp_path_factory) -> str:
    """The guard's lines as they appear in the C that Cython generates from fastfib/_kernel.pyx."""
    out = tmp_path_factory.mktemp("cython") / "_kernel.c"
    include = os.path.dirname(os.path.dirname(gmpy2.__file__))
    subprocess.run([sys.executable, "-m", "cython", "-3", "-I", include, str(ROOT / "fastfib/_kernel.pyx"),
                    "-o", str(out)], check=True, capture_output=True)
    match = re.search(r"^\s*#include <limits.h>\n.*?#endif\n", out.read_text(), re.S | re.M)
    assert match and MESSAGE in match.group(0), "the 64-bit guard is not in the generated C"
    return match.group(0)


def _preprocess(tmp_path: Path, guard: str, ulong_max: str) -> subprocess.CompletedProcess:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    assert cc, "a C compiler is needed to build fastfib, and so to run this test"
    (tmp_path / "limits.h").write_text(f"#define ULONG_MAX {ulong_max}\n")
    (tmp_path / "guard.c").write_text(guard + "int fastfib_guard_ok;\n")
    return subprocess.run([cc, "-E", "-nostdinc", "-I", str(tmp_path), str(tmp_path / "guard.c")],
                          capture_output=True, text=True)


def test_the_guard_stops_a_32_bit_build(tmp_path, guard):
    proc = _preprocess(tmp_path, guard, "0xFFFFFFFFUL")
    assert proc.returncode != 0
    assert MESSAGE in proc.stderr


def test_the_guard_passes_a_64_bit_build(tmp_path, guard):
    proc = _preprocess(tmp_path, guard, "0xFFFFFFFFFFFFFFFFUL")
    assert proc.returncode == 0, proc.stderr
    assert "fastfib_guard_ok" in proc.stdout
