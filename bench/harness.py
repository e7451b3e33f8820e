"""The benchmark run: start the servers, drive the load processes over the grid, collect the rows.

``python -m bench`` (see :mod:`bench.__main__`) calls :func:`run`. The plan:

1. start one load process per client (:mod:`bench.load`) and every server under
   test, each in its own processes (its own session, so that the whole tree can
   be killed), each on its own queue ``bench.<run id>.<server>``;
2. wait until each server consumes (its queue's consumer count, polled with a
   passive ``queue_declare``, reaches the expected number);
3. for each cell of the grid, for each repeat, run it against each server in
   turn (so that the servers compared in a row are measured side by side, not
   minutes apart), snapshotting the CPU time of every server, load and broker
   process around it;
4. always stop every server (SIGTERM, then SIGKILL of its process group) and
   delete its queue, even when a reply was wrong or the run was interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue as queue_mod
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pika
import psutil
from hdrh.histogram import HdrHistogram

from .common import (  # noqa: F401 (DEFAULT_URL: bench.__main__)
    AIO_BASELINE_ROW,
    AIO_ROW,
    CLIENT_BASELINE_ROW,
    CLIENT_ROW,
    DEFAULT_URL,
    ROOT,
    median,
)
from .environment import collect_environment
from .load import DISTINCT_BLOCK, plain

#: The grid of the full run.
FULL_NS = (20, 30, 1000, 100_000, 1_000_000)
FORMATS = ("decimal", "binary")
MODES = ("seq", "pipe")
HOT_NS = (500_000, 1_000_000)
DISTINCT_RANGE = (100_000, 1_000_000)
#: Requests in flight per client in the compute-bound (distinct n) cell.
COMPUTE_WINDOW = 8
#: The naive recursion makes 2*F(n+1) - 1 calls: it is not run from this n on.
NAIVE_MAX_N = 30


#: The asyncio cell: calls per side and calls in flight.
AIO_CALLS = 4000
AIO_INFLIGHT = 64
#: The rows of a paired cell: api -> ((row, label prefix), (baseline row, label prefix)).
PAIRED_ROWS = {
    "client": ((CLIENT_ROW, "FibonacciRpcClient → "), (CLIENT_BASELINE_ROW, "bare pika loop, same round trip → ")),
    "aio": ((AIO_ROW, "AsyncFibonacciRpcClient → "), (AIO_BASELINE_ROW, "aio-pika RPC client (its docs' pattern) → ")),
}


class BenchFailure(Exception):
    """The run cannot go on: a wrong or lost reply, a server that did not start, a crashed load process."""


# --- the grid -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    workload: str  # fixed | hot | distinct
    fmt: str  # decimal | binary
    mode: str  # seq | pipe
    n: int | None = None
    # pika: the bare pika load loop; client: fastfib.FibonacciRpcClient against the bare loop;
    # aio: fastfib's AsyncFibonacciRpcClient against aio-pika's RPC client (bench.aio_load)
    api: str = "pika"

    @property
    def id(self) -> str:
        what = f"n={self.n}" if self.workload == "fixed" else self.workload
        return f"{what}/{self.fmt}/{self.mode}" + (f"/{self.api}" if self.api != "pika" else "")

    @property
    def label(self) -> str:
        if self.workload == "fixed":
            what = f"n={_n_label(self.n)}"
        elif self.workload == "hot":
            what = "hot n∈{" + ", ".join(_n_label(n) for n in HOT_NS) + "}"
        else:
            what = f"distinct n∈[{_n_label(DISTINCT_RANGE[0])}, {_n_label(DISTINCT_RANGE[1])}]"
        mode = {"seq": "sequential", "pipe": "pipelined"}[self.mode]
        if self.api == "aio":
            return f"{what} {self.fmt}, asyncio clients, {AIO_CALLS} calls, {AIO_INFLIGHT} in flight"
        return f"{what} {self.fmt} {mode}"

    def workload_spec(self, block: int = 0) -> dict:
        if self.workload == "fixed":
            return {"kind": "fixed", "n": self.n}
        if self.workload == "hot":
            return {"kind": "hot", "ns": list(HOT_NS)}
        return {"kind": "distinct", "lo": DISTINCT_RANGE[0], "hi": DISTINCT_RANGE[1], "block": block}

    @property
    def max_n(self) -> int:
        if self.workload == "fixed":
            return self.n
        return max(HOT_NS) if self.workload == "hot" else DISTINCT_RANGE[1]


def _n_label(n: int) -> str:
    for exp in (6, 5):
        if n >= 10**exp and n % 10**exp == 0:
            m = n // 10**exp
            return f"10^{exp}" if m == 1 else f"{m}·10^{exp}"
    return str(n)


@dataclass
class ServerSpec:
    key: str  # unique in the run: echo, naive, gmpy2, fastfib-w2, fastfib-w2-nocache
    kind: str  # echo | naive | gmpy2 | fastfib | fastfib-pika (fastfib serve --wire pika)
    label: str
    workers: int = 1
    cache: bool = True  # fastfib only
    queue: str = ""
    argv: list[str] = field(default_factory=list)

    @property
    def consumers(self) -> int:
        return self.workers


@dataclass
class Settings:
    quick: bool
    url: str
    out: Path
    duration: float
    warmup: float
    repeat: int
    clients: int
    window: int
    workers: list[int]
    servers: list[str]
    naive_calls: int
    lost_timeout: float
    cache_bytes: int | None
    plots: bool = True
    grid: str = "quick"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


def build_cells(quick: bool, kinds: set[str]) -> list[Cell]:
    """The grid, in the order it runs."""
    if quick:
        fixed = [(20, "decimal"), (20, "binary"), (30, "decimal"), (1_000_000, "binary")]
    else:
        fixed = [(n, fmt) for n in FULL_NS for fmt in FORMATS]
    cells = [Cell("fixed", fmt, mode, n) for n, fmt in fixed for mode in MODES]
    cells += [Cell("hot", "decimal", "pipe"), Cell("distinct", "binary", "pipe")]
    if "client" in kinds:
        cells += [Cell("fixed", "binary", mode, 20, api="client") for mode in MODES]
    if "aio" in kinds:
        cells.append(Cell("fixed", "decimal", "pipe", 20, api="aio"))
    return cells


def repeated(cell: Cell) -> bool:
    """The cells that the targets use are repeated (--repeat); the rest of the grid runs once."""
    return (cell.workload == "fixed" and cell.n == 20) or cell.workload in ("hot", "distinct")


def applies(server: ServerSpec, cell: Cell, max_workers: int) -> tuple[bool, str | None]:
    """Whether a server runs a cell; (False, reason) marks a cell that is reported as not run,
    (False, None) one that does not belong to that server's rows at all."""
    if server.kind == "fastfib-pika":  # the pika wire beside the default one: n=20 only
        return (cell.api not in PAIRED_ROWS and cell.workload == "fixed" and cell.n == 20), None
    if cell.api in PAIRED_ROWS:
        return (server.kind == "fastfib" and server.cache and server.workers == max_workers), None
    if server.kind == "gmpy2" and server.workers > 1:
        # W plain processes: the compute-bound peer of W fastfib workers
        return cell.workload == "distinct", None
    if server.kind == "echo":
        # The echo server replies the request body: n and the format change nothing but a few bytes.
        return (cell.workload == "fixed" and cell.n == 20 and cell.fmt == "decimal"), None
    if server.kind == "naive" and cell.max_n > NAIVE_MAX_N:
        return False, (
            f"not run: the tutorial's recursion makes 2·F(n+1)−1 calls, ~10^{_calls_log10(cell.max_n)} "
            f"for n={_n_label(cell.max_n)}; it is measured at n ≤ {NAIVE_MAX_N} only"
        )
    if server.kind == "fastfib" and not server.cache:
        # the cache-off pool shows what the cache is worth: large n only
        return (cell.workload == "hot" or (cell.workload == "fixed" and cell.n >= 100_000)), None
    return True, None


def _calls_log10(n: int) -> int:
    # log10(2·F(n+1)) ≈ (n+1)·log10(φ) − log10(√5) + log10(2)
    import math

    phi = (1 + 5**0.5) / 2
    return int((n + 1) * math.log10(phi) - math.log10(5**0.5) + math.log10(2))


# --- processes ----------------------------------------------------------------------------


class ServerProcess:
    """One server under test: started in its own session, always killed with its whole group."""

    def __init__(self, spec: ServerSpec, log_dir: Path):
        self.spec = spec
        self.log_path = log_dir / f"server-{spec.key}.log"
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_after: float | None = None
        self._known: dict[int, psutil.Process] = {}

    def start(self) -> None:
        self.log_file = open(self.log_path, "wb")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            self.spec.argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def processes(self) -> list[psutil.Process]:
        """The server's process tree (fastfib: the supervisor and its workers)."""
        if not self.alive():
            return []
        try:
            root = self._known.setdefault(self.proc.pid, psutil.Process(self.proc.pid))
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return []
        # Keep one psutil.Process per pid: cpu_times() of the same object stays consistent.
        return [self._known.setdefault(p.pid, p) for p in procs]

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of the group (a worker that outlived its supervisor) goes too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.log_file.close()


class LoadProcess:
    """A bench.load process, driven over stdin/stdout JSON lines."""

    def __init__(self, index: int, url: str, log_dir: Path):
        self.index = index
        self.log_file = open(log_dir / f"load-{index}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.load", "--url", url],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.lines: queue_mod.Queue = queue_mod.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, doc: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(doc) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise BenchFailure(f"load process {self.index} is gone ({exc})") from exc

    def receive(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue_mod.Empty:
            raise BenchFailure(f"load process {self.index} did not answer within {timeout:.0f} s") from None
        if line is None:
            raise BenchFailure(f"load process {self.index} exited (code {self.proc.poll()}); see its log")
        return json.loads(line)

    def cpu_times(self) -> tuple[float, float]:
        try:
            t = psutil.Process(self.proc.pid).cpu_times()
            return t.user, t.system
        except psutil.Error:
            return 0.0, 0.0

    def stop(self) -> None:
        try:
            self.send({"cmd": "quit"})
            self.proc.wait(5)
        except (BenchFailure, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        self.log_file.close()


class Control:
    """The harness's own broker connection: readiness polls and queue clean-up."""

    def __init__(self, url: str):
        self.url = url
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.server_properties = self.connection._impl.server_properties or {}

    def consumer_count(self, queue: str) -> int | None:
        """The queue's consumer count, or None while it does not exist."""
        try:
            ok = self.channel.queue_declare(queue, passive=True)
            return ok.method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            self.channel = self.connection.channel()
            return None

    def delete(self, queue: str) -> None:
        """Delete a queue, best effort. The connection may have sat idle through
        the whole run (a BlockingConnection only answers heartbeats while it is
        used), so a failure gets one more try on a fresh connection."""
        for attempt in (1, 2):
            try:
                if attempt == 2 or self.connection.is_closed:
                    self.close()
                    self.__init__(self.url)
                self.channel.queue_delete(queue)
                return
            except Exception:
                if attempt == 2:
                    print(f"bench: could not delete queue {queue}", file=sys.stderr)

    def sleep(self, seconds: float) -> None:
        self.connection.sleep(seconds)

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:
            pass


def broker_process() -> psutil.Process | None:
    """The RabbitMQ node's Erlang VM, to read its CPU time (read-only)."""
    for p in psutil.process_iter(["name"]):
        if p.info["name"] == "beam.smp":
            return p
    return None


def _cpu(proc: psutil.Process) -> tuple[float, float]:
    try:
        t = proc.cpu_times()
        return t.user, t.system
    except psutil.Error:
        return 0.0, 0.0


# --- checks --------------------------------------------------------------------------------


def fastfib_serve_status() -> tuple[bool, str]:
    """(usable, why not): `python -m fastfib serve --help` must run and offer --workers and --queue."""
    try:
        p = subprocess.run(
            [sys.executable, "-m", "fastfib", "serve", "--help"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`python -m fastfib serve --help` failed: {exc}"
    if p.returncode != 0:
        return False, f"`python -m fastfib serve --help` exited {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}"
    missing = [opt for opt in ("--queue", "--workers") if opt not in p.stdout]
    if missing:
        return False, f"`python -m fastfib serve` has no {', '.join(missing)} yet"
    return True, ""


def _imports_in_subprocess(code: str, failed: str, broken: str) -> tuple[bool, str]:
    """(usable, why not): ``code`` runs in a fresh interpreter; ``failed``/``broken`` start the reason."""
    try:
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{failed}: {exc}"
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return False, f"{broken}: {last}"
    return True, ""


def aio_status() -> tuple[bool, str]:
    """(usable, why not): fastfib.aio.AsyncFibonacciRpcClient and aio-pika (the bench extra)."""
    return _imports_in_subprocess(
        "import aio_pika; from fastfib.aio import AsyncFibonacciRpcClient as C; C.call",
        "importing aio_pika and fastfib.aio failed",
        "aio_pika or fastfib.aio.AsyncFibonacciRpcClient does not import (pip install .[bench])")


def kernel_ratios(quick: bool, log_dir: Path) -> dict:
    """bench.kernel_ratios in a subprocess (this process has threads of its own): its JSON."""
    out = log_dir / "kernel_ratios.json"
    cmd = [sys.executable, "-m", "bench.kernel_ratios", "--out", str(out)] + (["--quick"] if quick else [])
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:
        raise BenchFailure(f"bench.kernel_ratios did not finish: {exc}") from exc
    if p.returncode != 0:
        raise BenchFailure(f"bench.kernel_ratios exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return json.loads(out.read_text())


def fastfib_client_status() -> tuple[bool, str]:
    """(usable, why not): fastfib.client.FibonacciRpcClient with call and call_many."""
    return _imports_in_subprocess(
        "from fastfib.client import FibonacciRpcClient as C; C.call; C.call_many",
        "importing fastfib.client failed",
        "fastfib.client.FibonacciRpcClient (call, call_many) does not import")


# --- the run -------------------------------------------------------------------------------


def server_specs(settings: Settings, run_id: str, fastfib_ok: bool) -> list[ServerSpec]:
    py = sys.executable
    specs: list[ServerSpec] = []
    kinds = set(settings.servers)
    for kind, label in (("echo", "echo (transport limit)"), ("naive", "naive (tutorial)"), ("gmpy2", "gmpy2 single-process")):
        if kind in kinds:
            specs.append(ServerSpec(kind, kind, label))
    wmax = max(settings.workers)
    if "echo" in kinds and wmax > 1:
        # A stricter transport limit for the pool: as many echo processes as its largest worker count.
        specs.insert(1, ServerSpec(f"echo-p{wmax}", "echo", f"echo ×{wmax} processes", workers=wmax))
    if "gmpy2" in kinds:
        # W plain processes for each W swept: per-process efficiency against W fastfib workers.
        at = next(i for i, s in enumerate(specs) if s.key == "gmpy2") + 1
        for w in sorted(w for w in settings.workers if w > 1):
            specs.insert(at, ServerSpec(f"gmpy2-p{w}", "gmpy2", f"gmpy2 ×{w} plain processes", workers=w))
            at += 1
    if "fastfib" in kinds and fastfib_ok:
        for w in settings.workers:
            specs.append(ServerSpec(f"fastfib-w{w}", "fastfib", f"fastfib w={w}", workers=w))
        if "nocache" in kinds:
            w = max(settings.workers)
            specs.append(ServerSpec(f"fastfib-w{w}-nocache", "fastfib", f"fastfib w={w} no cache", workers=w, cache=False))
        if "pikawire" in kinds:
            w = max(settings.workers)
            specs.append(ServerSpec(f"fastfib-w{w}-pika", "fastfib-pika", f"fastfib w={w} --wire pika", workers=w))
    for s in specs:
        s.queue = f"bench.{run_id}.{s.key}"
        if s.kind in ("fastfib", "fastfib-pika"):
            # The peers (bench.servers) declare the seed tutorial's transient classic queue;
            # fastfib serves the same kind, so that the queue's cost is the same on both sides.
            s.argv = [py, "-m", "fastfib", "serve", "--url", settings.url, "--queue", s.queue,
                      "--workers", str(s.workers), "--log-level", "warning",
                      "--queue-type", "classic", "--no-queue-durable"]
            if s.kind == "fastfib-pika":
                s.argv += ["--wire", "pika"]
            if not s.cache:
                s.argv += ["--cache-bytes", "0"]
            elif settings.cache_bytes is not None:
                s.argv += ["--cache-bytes", str(settings.cache_bytes)]
        else:
            s.argv = [py, "-m", "bench.servers", s.kind, "--queue", s.queue, "--url", settings.url]
            if s.workers > 1:
                s.argv += ["--procs", str(s.workers)]
    return specs


def cell_params(settings: Settings, server: ServerSpec, cell: Cell) -> dict:
    """The load parameters of one (server, cell) measurement."""
    p = {
        "queue": server.queue,
        "mode": cell.mode,
        "format": cell.fmt,
        "api": cell.api,
        "window": settings.window if cell.mode == "pipe" else 1,
        "duration": settings.duration,
        "warmup": settings.warmup,
        "warmup_count": 1,
        "min_count": 20 if settings.quick else 50,
        "max_duration": settings.duration + 30.0,
        "lost_timeout": settings.lost_timeout,
        "check": "echo" if server.kind == "echo" else "fib",
        # the tutorial's server ignores `accept` and always answers decimal text
        "strict_format": server.kind != "naive",
    }
    if server.kind == "naive" and cell.n == NAIVE_MAX_N:
        # Each call takes a good fraction of a second: a few calls, counted rather than timed.
        # In flight, more than 2 would only queue behind its prefetch of 1.
        p.update(duration=0.0, warmup=0.0, warmup_count=1, min_count=settings.naive_calls, window=min(p["window"], 2))
    if cell.mode == "seq" and cell.max_n >= 100_000:
        p["min_count"] = 10
    if cell.api == "aio":
        p.update(calls=AIO_CALLS, inflight=AIO_INFLIGHT, window=AIO_INFLIGHT)
    if cell.workload == "distinct" and cell.mode == "pipe":
        p["window"] = COMPUTE_WINDOW
    return p


def workload_specs(cell: Cell, server_key: str, clients: int, blocks: dict[str, int]) -> list[dict]:
    """The workload of each client for one measurement of ``cell`` on one server.

    A distinct-n cell takes a fresh block of indices per client per
    measurement, so that the n of one repeat are new to that server: none of
    them sits in the cache an earlier repeat (or warm-up) filled.
    """
    specs = []
    for _ in range(clients):
        block = 0
        if cell.workload == "distinct":
            block = blocks.get(server_key, 0)
            if (block + 1) * DISTINCT_BLOCK > DISTINCT_RANGE[1] - DISTINCT_RANGE[0] + 1:
                raise BenchFailure(f"{server_key}: more distinct-n measurements than [{DISTINCT_RANGE[0]}, "
                                   f"{DISTINCT_RANGE[1]}] has fresh values for (fewer --repeat or --clients)")
            blocks[server_key] = block + 1
        specs.append(cell.workload_spec(block))
    return specs


@dataclass
class Measurement:
    server: str
    cell: Cell
    repeat: int
    results: list[dict]
    server_cpu: dict[int, tuple[str, float, float]]  # pid -> (name, user, system) during the cell
    broker_cpu: tuple[float, float] | None
    load_cpu: list[tuple[int, float, float]]  # (pid, user, system) over the whole cell
    wall: float
    params: dict


def run(settings: Settings, progress=None, console=None) -> dict:
    """Run the benchmark; returns the raw run (the report module turns it into the report)."""
    t_begin = time.time()
    run_id = uuid.uuid4().hex[:8]
    out: Path = settings.out
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    def say(msg: str) -> None:
        if console is not None:
            console.log(msg)

    kinds = set(settings.servers)
    fastfib_ok, fastfib_why = (False, "not selected (--servers)")
    if "fastfib" in kinds:
        fastfib_ok, fastfib_why = fastfib_serve_status()
        if not fastfib_ok:
            notes.append(f"fastfib rows not run: {fastfib_why}")
            say(f"[yellow]fastfib serve is not usable: {fastfib_why}")
    client_ok, client_why = (False, "not selected (--servers)")
    if "client" in kinds:
        if not fastfib_ok:
            client_ok, client_why = False, "no fastfib pool to call"
        else:
            client_ok, client_why = fastfib_client_status()
        if not client_ok:
            notes.append(f"client rows (FibonacciRpcClient.call, call_many) not run: {client_why}")
            say(f"[yellow]client rows left out: {client_why}")
            kinds.discard("client")

    if "aio" in kinds:
        aio_ok, aio_why = (False, "no fastfib pool to call") if not fastfib_ok else aio_status()
        if not aio_ok:
            notes.append(f"asyncio client rows (AsyncFibonacciRpcClient, aio-pika) not run: {aio_why}")
            say(f"[yellow]asyncio client rows left out: {aio_why}")
            kinds.discard("aio")

    specs = server_specs(settings, run_id, fastfib_ok)
    if not specs and "kernel" not in kinds:
        raise BenchFailure("no server to measure")
    max_workers = max((s.workers for s in specs if s.kind == "fastfib"), default=0)
    cells = build_cells(settings.quick, kinds)

    env = collect_environment(settings.url)
    control = Control(settings.url)
    env["rabbitmq"]["server_properties"] = plain(control.server_properties)
    broker = broker_process()

    servers: dict[str, ServerProcess] = {}
    loads: list[LoadProcess] = []
    measurements: list[Measurement] = []
    failure: str | None = None
    not_run: list[dict] = []
    distinct_blocks: dict[str, int] = {}
    kernel: dict | None = None

    # SIGTERM (e.g. a CI timeout) must still stop the servers: turn it into an exception.
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        if "kernel" in kinds:
            # before any server starts: the kernel's ratios want the quietest machine this run has
            if progress is not None:
                progress.console.log("kernel ratios (encoding, threads), in process")
            kernel = kernel_ratios(settings.quick, log_dir)
        n_load = max(1, settings.clients)
        loads = [LoadProcess(i, settings.url, log_dir) for i in range(n_load)]
        for spec in specs:
            control.delete(spec.queue)
            sp = servers[spec.key] = ServerProcess(spec, log_dir)
            sp.start()
        for spec in specs:
            _wait_ready(servers[spec.key], control, timeout=60.0)
            say(f"{spec.label} consuming after {servers[spec.key].ready_after:.1f} s")

        plan: list[tuple[Cell, int, ServerSpec]] = []
        for cell in cells:
            reps = settings.repeat if repeated(cell) else 1
            members = []
            for spec in specs:
                ok, reason = applies(spec, cell, max_workers)
                if ok:
                    members.append(spec)
                elif reason:
                    not_run.append({"server": spec.key, "cell": cell.id, "reason": reason})
            for r in range(reps):
                for spec in members:
                    plan.append((cell, r, spec))

        task = progress.add_task("benchmark", total=len(plan)) if progress is not None else None
        for cell, r, spec in plan:
            if progress is not None:
                reps = settings.repeat if repeated(cell) else 1
                progress.update(task, description=f"{spec.label:<24} {cell.label}" + (f" [{r + 1}/{reps}]" if reps > 1 else ""))
            sp = servers[spec.key]
            if not sp.alive():
                raise BenchFailure(f"server {spec.key} died (exit {sp.proc.poll()}); log tail:\n{sp.log_tail()}")
            params = cell_params(settings, spec, cell)
            clients = loads[:1] if (cell.mode == "seq" or cell.api in PAIRED_ROWS) else loads[: settings.clients]
            m = _measure(settings, sp, cell, r, params, clients, broker, distinct_blocks)
            measurements.append(m)
            if progress is not None:
                progress.advance(task)
            if console is not None and not console.is_terminal:
                # no live progress bar in a log: one line per measurement instead
                sm = summarize(m)
                p50 = (sm["latency_us"] or {}).get("p50")
                say(f"[{len(measurements)}/{len(plan)}] {spec.label}, {cell.label}"
                    + (f" [{r + 1}/{settings.repeat}]" if repeated(cell) and settings.repeat > 1 else "")
                    + f": {sm['throughput_rps']:,.1f} replies/s" + (f", p50 {p50 / 1000:.2f} ms" if p50 else ""))
    except BenchFailure as exc:
        failure = str(exc)
    except KeyboardInterrupt as exc:
        failure = f"interrupted ({exc or 'SIGINT'})"
    finally:
        signal.signal(signal.SIGTERM, old_term)
        for ld in loads:
            ld.stop()
        for sp in servers.values():
            sp.stop()
        for spec in specs:
            control.delete(spec.queue)
        control.close()

    return {
        "run_id": run_id,
        "started": t_begin,
        "duration_s": time.time() - t_begin,
        "settings": settings.to_json(),
        "environment": env,
        "servers": [
            {
                "key": s.key, "kind": s.kind, "label": s.label, "workers": s.workers,
                "cache": s.cache if s.kind == "fastfib" else None, "queue": s.queue,
                "command": shlex.join(["python"] + s.argv[1:]),
                "startup_s": servers[s.key].ready_after if s.key in servers else None,
            }
            for s in specs
        ],
        "measurements": measurements,
        "not_run": not_run,
        "notes": notes,
        "failure": failure,
        "kernel": kernel,
        "fastfib": {"serve": fastfib_ok, "serve_reason": fastfib_why, "client": client_ok, "client_reason": client_why},
    }


def _wait_ready(sp: ServerProcess, control: Control, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    want = sp.spec.consumers
    while True:
        if not sp.alive():
            raise BenchFailure(
                f"server {sp.spec.key} exited with code {sp.proc.poll()} before consuming; "
                f"command: {shlex.join(sp.spec.argv)}\nlog tail:\n{sp.log_tail()}"
            )
        count = control.consumer_count(sp.spec.queue)
        if count is not None and count >= want:
            sp.ready_after = time.perf_counter() - sp.started_at
            return
        if time.perf_counter() > deadline:
            raise BenchFailure(
                f"server {sp.spec.key} has {count} of {want} consumers on {sp.spec.queue} after {timeout:.0f} s\n"
                f"log tail:\n{sp.log_tail()}"
            )
        control.sleep(0.05)


def _measure(settings, sp: ServerProcess, cell: Cell, repeat: int, params: dict, clients: list[LoadProcess],
             broker, distinct_blocks: dict[str, int]) -> Measurement:
    key = sp.spec.key
    for ld, spec in zip(clients, workload_specs(cell, key, len(clients), distinct_blocks), strict=True):
        cell_doc = dict(params, repeat=repeat, workload=spec)
        ld.send({"cmd": "prepare", "cell": cell_doc})
    for ld in clients:
        msg = ld.receive(timeout=300)
        if not msg.get("ready"):
            raise BenchFailure(f"{sp.spec.label}, {cell.label}: load process {ld.index} could not prepare: "
                               f"{msg.get('result', {}).get('error')}")
    procs = sp.processes()
    cpu0 = {p.pid: (p.name(), *_cpu(p)) for p in procs}
    b0 = _cpu(broker) if broker else None
    l0 = [ld.cpu_times() for ld in clients]
    t0 = time.perf_counter()
    for ld in clients:
        ld.send({"cmd": "go"})
    budget = params["warmup"] + params["max_duration"] + params["lost_timeout"] + 300
    results = []
    errors = []
    for ld in clients:
        res = ld.receive(timeout=budget)["result"]
        results.append(res)
        if not res.get("ok"):
            errors.append(f"load process {ld.index}: {res.get('error')}")
    wall = time.perf_counter() - t0
    if errors:
        raise BenchFailure(
            f"{sp.spec.label} ({sp.spec.queue}), {cell.label}: the replies did not check out:\n  " + "\n  ".join(errors)
        )
    server_cpu = {}
    for p in sp.processes():
        try:
            name = p.name()
        except psutil.Error:
            continue
        u, s = _cpu(p)
        _, u0, s0 = cpu0.get(p.pid, (name, 0.0, 0.0))
        server_cpu[p.pid] = (name, u - u0, s - s0)
    b1 = _cpu(broker) if broker else None
    broker_cpu = (b1[0] - b0[0], b1[1] - b0[1]) if broker else None
    load_cpu = [(ld.proc.pid, a[0] - b[0], a[1] - b[1]) for ld, a, b in zip(clients, [c.cpu_times() for c in clients], l0, strict=True)]
    return Measurement(key, cell, repeat, results, server_cpu, broker_cpu, load_cpu, wall, params)


# --- aggregation ---------------------------------------------------------------------------

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


def merge_hists(results: list[dict]) -> HdrHistogram | None:
    merged = None
    for res in results:
        if not res.get("hist"):
            continue
        h = HdrHistogram.decode(res["hist"].encode("ascii"))
        if merged is None:
            merged = h
        else:
            merged.add(h)
    return merged


def summarize(m: Measurement) -> dict:
    """One measurement (all clients of one cell run) as numbers."""
    count = sum(r["count"] for r in m.results)
    t_start = min(r["t_start"] for r in m.results)
    t_end = max(r["t_end"] for r in m.results)
    if all("busy_s" in r for r in m.results):
        span = max(max(r["busy_s"] for r in m.results), 1e-9)  # an interleaved side: its own time only
    else:
        span = max(t_end - t_start, 1e-9)
    verified = sum(r["verified"] for r in m.results)
    cpu_replies = sum(r.get("pair_verified", r["verified"]) for r in m.results)  # an interleaved pair: both sides
    h = merge_hists(m.results)
    lat = None
    if h is not None and h.get_total_count():
        lat = {name: h.get_value_at_percentile(p) for name, p in PERCENTILES}
        lat["mean"] = h.get_mean_value()
        lat["max"] = h.get_max_value()
    server_cpu = sum(u + s for _, u, s in m.server_cpu.values())
    load_cpu = sum(u + s for _, u, s in m.load_cpu)
    # a paired cell: each side's own CPU time over its own replies (bench.load, bench.aio_load)
    side_cpu = sum(r["side_cpu_s"] for r in m.results) if all("side_cpu_s" in r for r in m.results) else None
    broker_cpu = sum(m.broker_cpu) if m.broker_cpu else None
    return {
        "repeat": m.repeat,
        "count": count,
        "verified": verified,
        "stray": sum(r.get("stray", 0) for r in m.results),
        "seconds": span,
        "throughput_rps": count / span,
        "latency_us": lat,
        "min_count_reached": all(r.get("min_count_reached", True) for r in m.results),
        "cpu": {
            "server_s": server_cpu,
            "server_us_per_reply": 1e6 * server_cpu / cpu_replies if cpu_replies else None,
            "load_s": load_cpu,
            "load_us_per_reply": 1e6 * load_cpu / cpu_replies if cpu_replies else None,
            "broker_s": broker_cpu,
            "side_us_per_reply": 1e6 * side_cpu / count if side_cpu is not None and count else None,
            "wall_s": m.wall,
            "processes": (
                [{"role": "server", "pid": pid, "name": name, "user_s": u, "system_s": s} for pid, (name, u, s) in m.server_cpu.items()]
                + [{"role": "load", "pid": pid, "user_s": u, "system_s": s} for pid, u, s in m.load_cpu]
                + ([{"role": "broker", "name": "beam.smp", "user_s": m.broker_cpu[0], "system_s": m.broker_cpu[1]}] if m.broker_cpu else [])
            ),
        },
    }


def cdf_points(h: HdrHistogram, max_points: int = 150) -> list[list[float]]:
    """[[percentile, latency_us], ...]: the cumulative distribution, one point per recorded bucket (thinned)."""
    total = h.get_total_count()
    pts = []
    for item in h.get_recorded_iterator():
        pts.append([round(100.0 * item.total_count_to_this_value / total, 4), h.get_highest_equivalent_value(item.value_iterated_to)])
    if len(pts) > max_points:
        step = len(pts) / max_points
        pts = [pts[int(i * step)] for i in range(max_points)] + [pts[-1]]
    return pts


def aggregate(raw: dict) -> list[dict]:
    """Rows: one per (server, cell), two for a client cell (the client, its baseline); medians over the repeats."""
    servers = {s["key"]: s for s in raw["servers"]}
    groups: dict[tuple[str, Cell], list[Measurement]] = {}
    for m in raw["measurements"]:
        groups.setdefault((m.server, m.cell), []).append(m)
    rows = []
    for (key, cell), ms in groups.items():
        srv = servers[key]
        if cell.api in PAIRED_ROWS:
            # one paired cell, two rows: the client under test and, in the same process, its peer
            (row, label), (base_row, base_label) = PAIRED_ROWS[cell.api]
            rows.append(_aggregate_row(row, label + srv["label"], srv, cell, ms))
            bare = [dataclasses.replace(m, results=[r["baseline"] for r in m.results]) for m in ms]
            rows.append(_aggregate_row(base_row, base_label + srv["label"], srv, cell, bare))
        else:
            rows.append(_aggregate_row(key, srv["label"], srv, cell, ms))
    for nr in raw["not_run"]:
        srv = servers[nr["server"]]
        cell = next((m.cell for m in raw["measurements"] if m.cell.id == nr["cell"]), None) or _cell_from_id(nr["cell"])
        rows.append({
            "id": f"{nr['server']}|{nr['cell']}",
            "server": nr["server"], "server_label": srv["label"], "server_kind": srv["kind"], "pool": nr["server"],
            "workers": srv["workers"], "cache": srv["cache"],
            "cell": nr["cell"], "cell_label": cell.label, "workload": cell.workload, "n": cell.n,
            "ns": [cell.n] if cell.workload == "fixed" else None,
            "format": cell.fmt, "mode": cell.mode, "api": cell.api,
            "status": "not_run", "reason": nr["reason"],
        })
    return rows


def _aggregate_row(row_server: str, label: str, srv: dict, cell: Cell, ms: list[Measurement]) -> dict:
    """One row: the medians over the repeats of one (server, cell), or of one side of a client cell."""
    runs = [summarize(m) for m in ms]
    lat_runs = [r["latency_us"] for r in runs if r["latency_us"]]
    latency = {name: median([lr[name] for lr in lat_runs]) for name, _ in PERCENTILES + (("mean", 0), ("max", 0))} if lat_runs else None
    h = merge_hists([res for m in ms for res in m.results])
    return {
        "id": f"{row_server}|{cell.id}",
        "server": row_server,
        "server_label": label,
        "server_kind": srv["kind"],
        "pool": srv["key"],
        "workers": srv["workers"],
        "cache": srv["cache"],
        "cell": cell.id,
        "cell_label": cell.label,
        "workload": cell.workload,
        "n": cell.n,
        "ns": list(HOT_NS) if cell.workload == "hot" else (list(DISTINCT_RANGE) if cell.workload == "distinct" else [cell.n]),
        "format": cell.fmt,
        "mode": cell.mode,
        "api": cell.api,
        "clients": len(ms[0].results),
        "window": ms[0].params["window"],
        "status": "ok",
        "repeats": len(runs),
        "throughput_rps": median([r["throughput_rps"] for r in runs]),
        "latency_us": latency,
        "count": sum(r["count"] for r in runs),
        "verified": sum(r["verified"] for r in runs),
        "cpu": {
            "server_s": median([r["cpu"]["server_s"] for r in runs]),
            "server_us_per_reply": median([r["cpu"]["server_us_per_reply"] for r in runs]),
            "load_s": median([r["cpu"]["load_s"] for r in runs]),
            "load_us_per_reply": median([r["cpu"]["load_us_per_reply"] for r in runs]),
            "broker_s": median([r["cpu"]["broker_s"] for r in runs]),
            "side_us_per_reply": median([r["cpu"].get("side_us_per_reply") for r in runs]),
        },
        "runs": runs,
        "cdf": cdf_points(h) if h is not None and h.get_total_count() else None,
        "params": {k: v for k, v in ms[0].params.items() if k not in ("queue",)},
        "notes": _row_notes(srv, cell, runs),
    }


def _cell_from_id(cid: str) -> Cell:
    parts = cid.split("/")
    what, fmt, mode = parts[0], parts[1], parts[2]
    api = parts[3] if len(parts) > 3 else "pika"
    if what.startswith("n="):
        return Cell("fixed", fmt, mode, int(what[2:]), api)
    return Cell(what, fmt, mode, None, api)


def _row_notes(srv: dict, cell: Cell, runs: list[dict]) -> list[str]:
    notes = []
    if srv["kind"] == "naive" and cell.fmt == "binary":
        notes.append("the tutorial's server ignores `accept`: its replies are decimal text (verified as such)")
    if srv["kind"] == "naive" and cell.n == NAIVE_MAX_N:
        notes.append("count-bounded: a few calls, each measured")
    if not all(r["min_count_reached"] for r in runs):
        notes.append("the minimum count was not reached within max_duration")
    if any(r["stray"] for r in runs):
        notes.append(f"{sum(r['stray'] for r in runs)} stray replies (unknown or repeated correlation id) dropped")
    if cell.api == "client":
        notes.append("interleaved with the other side of this client cell in one process: replies/s is over "
                     "this side's own time; the load CPU per reply is over the replies of both sides, "
                     "the client CPU per reply over this side's own")
    if cell.api == "aio":
        notes.append("one side after the other in one process (the order alternates by repeat): replies/s and "
                     "the client CPU per reply are over this side's own calls")
        if cell.mode == "pipe":
            notes.append("batches of pipelined requests: throughput only, no per-request latency")
    return notes
