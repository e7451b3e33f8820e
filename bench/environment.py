"""The machine, the versions and the broker a benchmark ran on, for the report."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from .common import ROOT


def _run(cmd: list[str], timeout: float = 30.0) -> str | None:
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_environment(url: str) -> dict:
    import gmpy2
    import psutil

    fastfib = {"version": None, "kernel": None}
    try:
        import fastfib as ff

        fastfib["version"] = ff.__version__
        # what fastfib serve's workers do as they start, in this same environment (before
        # kernel_info, which names it)
        fastfib["gmp_code"] = ff.gmp_dispatch.apply()
        fastfib["kernel"] = ff.kernel_info()
    except Exception as exc:  # the kernel may not be built
        fastfib["error"] = f"{type(exc).__name__}: {exc}"
    commit = _run(["git", "rev-parse", "HEAD"])
    # bench/results is output, not code: `--out bench/results/published` empties that tracked
    # folder before this runs, which made every published run look like uncommitted code.
    status = _run(["git", "status", "--porcelain", "--", ".", ":(exclude)bench/results"])
    mem = psutil.virtual_memory().total
    return {
        "machine": {
            "hostname": platform.node(),
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpu_count_physical": psutil.cpu_count(logical=False),
            "memory_gib": round(mem / 2**30, 1),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "packages": {name: _version(name) for name in ("pika", "gmpy2", "hdrhistogram", "psutil", "matplotlib", "rich", "pytest-benchmark")},
        "gmp": gmpy2.mp_version(),
        "fastfib": fastfib,
        "rabbitmq": {
            "url": _redact(url),
            "rabbitmqctl_version": _run(["rabbitmqctl", "version"]),
        },
        "git": {
            "commit": commit or "unknown (no commit yet)",
            "dirty": bool(status) if status is not None else None,
            "branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"]),
        },
    }


def _redact(url: str) -> str:
    """The URL without its password."""
    import urllib.parse as up

    parts = up.urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return up.urlunsplit(parts)
