"""Install instructions match how fastfib is really installed: the wheel from `make dist`, or a clone.

fastfib is not on PyPI, so no command anywhere may install the name ``fastfib``
from an index (``pip install fastfib``, ``pip install 'fastfib[metrics]'``); and
a missing optional dependency is one clear line naming the extra.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `pip install` followed, on the same line, by the bare name fastfib (quoted or not, with or without extras);
# a path such as ./fastfib-0.1.0-...whl or '.[metrics]' does not match.
PYPI_NAME = re.compile(r"pip3?\s+install\b[^\n]*?(?<![\w./-])['\"]?fastfib(?=[\['\"\s`]|$)", re.M)


def _sources() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / ".ci" / "run", ROOT / "pyproject.toml"]
    for pattern in ("docs/*", "fastfib/**/*.py", "bench/*.py", "scripts/*"):
        files += [p for p in ROOT.glob(pattern) if p.is_file()]
    return files


def test_the_pattern_catches_pypi_installs():
    for bad in ("pip install fastfib", "pip install 'fastfib[metrics]'", 'pip install -U "fastfib"',
                "(pip install fastfib[metrics])"):
        assert PYPI_NAME.search(bad), bad
    for good in ("pip install ./fastfib-0.1.0-cp311-cp311-manylinux_2_34_x86_64.whl",
                 "/opt/fastfib/venv/bin/pip install '.[metrics]'", "pip install prometheus_client"):
        assert not PYPI_NAME.search(good), good


def test_no_command_installs_fastfib_from_pypi():
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in _sources() for m in PYPI_NAME.finditer(p.read_text())]
    assert not found, found


def test_bench_without_its_extra_says_which_extra(tmp_path):
    (tmp_path / "psutil.py").write_text('raise ImportError("No module named psutil (blocked by the test)")\n')
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "[bench] extra" in lines[0] and "pip install '.[bench]'" in lines[0], proc.stderr


def test_fastfib_demo_checks_the_kernel_without_a_broker():
    proc = subprocess.run([sys.executable, "-m", "fastfib", "demo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "compiled kernel" in proc.stdout and "F(100) = 354224848179261915075" in proc.stdout


def test_fastfib_demo_into_a_reader_that_left_prints_no_traceback():
    """`fastfib demo | head -1`: once the reader has gone, the demo stops quietly (exit 0, no traceback)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line: every write meets EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "fastfib", "demo"], cwd=ROOT, stdout=write_end,
                              stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode()
