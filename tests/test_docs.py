"""Every example in README.md and docs/*.md runs, as written, against the checkout's package.

- ``>>>`` examples run as doctests (``python -m doctest README.md`` too).
- Each fenced ``python`` block runs as a script of its own in a fresh
  interpreter, with ``fastfib serve`` (one worker) answering on the default
  queue, ``rpc_queue`` on the test broker: what a user has after the README's
  quick start. Where a block prints, each ``print`` line ends with a comment
  giving the line it prints (``...`` matches anything), and the output must
  match.
- A block that cannot run here is marked on the line just above its fence with
  ``<!-- docs-test: compile-only: <why> -->``; it is still compiled. Use it
  sparingly, and always say why.
"""

from __future__ import annotations

import contextlib
import doctest
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEFAULT_QUEUE = "rpc_queue"
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"<!--\s*docs-test:\s*compile-only:\s*(\S.*?)\s*-->")
_PRINT = re.compile(r"^\s*print\(.*\)\s*#\s?(.*)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    code: str
    compile_only: str | None  # the reason, when marked

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The fenced ``python`` blocks of a markdown file that are scripts (not ``>>>`` sessions)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        code = "\n".join(lines[i + 1:end]) + "\n"
        above = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
        marker = _MARKER.search(above)
        if fence.group(1) in ("python", "py", "python3") and not code.lstrip().startswith(">>>"):
            blocks.append(Block(path, i + 1, code, marker.group(1) if marker else None))
        i = end + 1
    return blocks


BLOCKS = [block for path in DOCS for block in python_blocks(path)]


def expected_output(code: str) -> list[str] | None:
    """What the block's ``print(...)  # line`` comments say it prints; None if it prints nothing."""
    prints = [ln for ln in code.splitlines() if re.match(r"^\s*print\(", ln)]
    if not prints:
        return None
    expected = []
    for ln in prints:
        m = _PRINT.match(ln)
        assert m and m.group(1).strip(), f"a print without a '# what it prints' comment: {ln.strip()}"
        expected.append(m.group(1).strip())
    return expected


def _matches(pattern: str, line: str) -> bool:
    return re.fullmatch(".*".join(map(re.escape, pattern.split("..."))), line.strip()) is not None


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doctest_examples(path):
    result = doctest.testfile(str(path), module_relative=False, optionflags=doctest.ELLIPSIS, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} >>> examples in {path.name} failed"


def test_python_m_doctest_readme():
    proc = subprocess.run([sys.executable, "-m", "doctest", "README.md"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_examples_were_found():
    # The parser must see the README's blocks; a broken parser would make the tests below vacuous.
    assert {b.path.name for b in BLOCKS} >= {"README.md", "client.md"}
    assert len([b for b in BLOCKS if b.path.name == "README.md"]) >= 2
    assert doctest.DocTestParser().get_examples((ROOT / "README.md").read_text())


def _delete_default_queue(url: str) -> None:
    """Remove a leftover ``rpc_queue`` (of an earlier run, maybe declared another way) that nobody uses.

    Checked by a passive declare: quorum queues refuse ``queue.delete`` with ``if-unused``.
    """
    import pika

    with contextlib.closing(pika.BlockingConnection(pika.URLParameters(url))) as connection:
        channel = connection.channel()
        try:
            ok = channel.queue_declare(DEFAULT_QUEUE, passive=True).method
        except pika.exceptions.ChannelClosedByBroker:
            return  # no such queue
        if ok.consumer_count == 0 and ok.message_count == 0:
            channel.queue_delete(DEFAULT_QUEUE)


@pytest.fixture(scope="module")
def default_server(broker_url):
    """``fastfib serve`` on the default queue, as the README's quick start leaves it."""
    from _server_helpers import Pool

    _delete_default_queue(broker_url)
    with Pool(DEFAULT_QUEUE, workers=1, url=broker_url) as pool:
        pool.wait_ready()
        yield pool
    _delete_default_queue(broker_url)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_python_block_runs(block, default_server, broker_url, tmp_path):
    compiled = compile(block.code, block.id, "exec")
    if block.compile_only is not None:
        return  # marked, with its reason, as not runnable here: compiling it is the check
    assert compiled
    # The blocks call with url=None and the default queue: point them at the test broker and the fixture's queue.
    env = {k: v for k, v in os.environ.items() if k != "FASTFIB_QUEUE"}
    env.update(PYTHONPATH=str(ROOT), FASTFIB_URL=broker_url)
    proc = subprocess.run([sys.executable, "-c", block.code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"{block.id} failed:\n{proc.stderr}"
    want = expected_output(block.code)
    if want is not None:
        got = proc.stdout.splitlines()
        assert len(got) == len(want) and all(map(_matches, want, got)), (
            f"{block.id} printed:\n{proc.stdout}\nthe comments say:\n" + "\n".join(want))
    assert "Traceback" not in default_server.text()
