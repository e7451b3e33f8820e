"""The linters run as tests (as asyncpg does): ruff, with the settings in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    # ruff is in the "test" extra: a missing ruff fails here rather than skipping the check
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "fastfib", "bench", "tests", "setup.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
