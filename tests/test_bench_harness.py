"""The benchmark harness (issue 5): `python -m bench` in a small setting, and its reply checks.

The run test drives the real harness end to end against the broker (a quick
grid with very short windows: the numbers mean nothing, the structure does).
The load tests prove that a wrong or a lost reply fails a cell loudly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gmpy2
import pika
import pytest

from bench import harness, load, report

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- no broker -----------------------------------------------------------------------------


def test_a_ratio_is_never_shown_equal_to_the_threshold_it_misses():
    # b2 of 2026-12-01: 1.0991 against >= 1.1 was shown as a failing "1.10×"
    assert report.fmt_ratio({"ratio": 1.0991, "threshold": 1.1}) == "1.099×"
    assert report.fmt_ratio({"ratio": 0.74986, "threshold": 0.75}) == "0.7499×"
    assert report.fmt_ratio({"ratio": 1.24, "threshold": 1.1}) == "1.24×"
    assert report.fmt_ratio({"ratio": 1.1, "threshold": 1.1}) == "1.10×"
    assert report.fmt_ratio({"ratio": None, "threshold": 1.1}) == "–"


def test_distinct_workload_never_repeats_within_a_run():
    lo, hi = harness.DISTINCT_RANGE
    seen = set()
    for block in range(3):
        w = load.Workload({"kind": "distinct", "lo": lo, "hi": hi, "block": block}, "binary", "fib")
        for _ in range(5000):
            n = w.next_n()
            assert lo <= n <= hi
            seen.add(n)
    assert len(seen) == 15000


def _props(content_type=None, headers=None):
    return pika.BasicProperties(content_type=content_type, headers=headers)


def test_verify_accepts_right_replies_in_every_encoding():
    w = load.Workload({"kind": "fixed", "n": 1000}, "binary", "fib")
    w.prepare()
    f = gmpy2.fib(1000)
    w.verify(1000, _props(load.BINARY), load.fib_binary(f), b"1000", strict_format=True)
    # the tutorial's server: no content_type, decimal text, whatever was asked
    w.verify(1000, _props(None), str(f).encode(), b"1000", strict_format=False)


@pytest.mark.parametrize(
    "props, body, strict, match",
    [
        (_props(load.BINARY), load.fib_binary(gmpy2.fib(1001)), True, "WRONG"),
        (_props(load.DECIMAL), str(gmpy2.fib(1000)).encode() + b"0", False, "WRONG"),
        (_props(load.DECIMAL), str(gmpy2.fib(1000)).encode(), True, "asked for binary"),
        (_props("application/json", {"x-error": "internal"}), b'{"error": "internal"}', True, "error reply"),
        (_props("text/html"), b"<p>", False, "unknown content_type"),
    ],
)
def test_verify_rejects_wrong_replies(props, body, strict, match):
    w = load.Workload({"kind": "fixed", "n": 1000}, "binary", "fib")
    w.prepare()
    with pytest.raises(load.CellFailed, match=match):
        w.verify(1000, props, body, b"1000", strict_format=strict)


def test_distinct_replies_are_checked_after_the_window():
    w = load.Workload({"kind": "distinct", "lo": 100_000, "hi": 1_000_000}, "binary", "fib")
    n = w.next_n()
    w.verify(n, _props(load.BINARY), load.fib_binary(gmpy2.fib(n)), str(n).encode(), strict_format=True)
    assert w.verify_deferred() == 1
    w.verify(n, _props(load.BINARY), load.fib_binary(gmpy2.fib(n + 1)), str(n).encode(), strict_format=True)
    with pytest.raises(load.CellFailed, match="WRONG"):
        w.verify_deferred()


def test_echo_check():
    w = load.Workload({"kind": "fixed", "n": 20}, "decimal", "echo")
    w.verify(20, _props(), b"20", b"20", strict_format=False)
    with pytest.raises(load.CellFailed):
        w.verify(20, _props(), b"6765", b"20", strict_format=False)


def test_grid_and_naive_cells_not_run():
    full = harness.build_cells(quick=False, kinds={"client"})
    fixed = {(c.n, c.fmt, c.mode) for c in full if c.workload == "fixed" and c.api == "pika"}
    assert fixed == {(n, f, m) for n in (20, 30, 1000, 100_000, 1_000_000) for f in ("decimal", "binary") for m in ("seq", "pipe")}
    assert {c.workload for c in full} == {"fixed", "hot", "distinct"}
    naive = harness.ServerSpec("naive", "naive", "naive")
    ok, reason = harness.applies(naive, harness.Cell("fixed", "decimal", "seq", 1000), max_workers=2)
    assert not ok and reason.startswith("not run") and "10^209" in reason
    assert harness.applies(naive, harness.Cell("fixed", "decimal", "seq", 30), max_workers=2) == (True, None)


def _drawn(spec: dict, count: int) -> set[int]:
    w = load.Workload(spec, "binary", "fib")
    return {w.next_n() for _ in range(count)}


def test_compute_bound_cell_draws_fresh_n_in_every_repeat():
    """Each repeat (and each client) of the distinct-n cell asks one server only n it never asked before."""
    cell = harness.Cell("distinct", "binary", "pipe")
    blocks: dict[str, int] = {}
    seen: dict[str, set[int]] = {"fastfib-w2": set(), "gmpy2": set()}
    for _repeat in range(3):
        for server in seen:  # the servers of one repeat run in turn, as in the plan
            for spec in harness.workload_specs(cell, server, 2, blocks):
                drawn = _drawn(spec, 3000)  # more than a measurement window asks at this n
                assert len(drawn) == 3000
                assert not drawn & seen[server], "a repeat asked an n that an earlier one had asked"
                seen[server] |= drawn
    # fixed cells keep their one n
    assert harness.workload_specs(harness.Cell("fixed", "binary", "pipe", 20), "gmpy2", 2, blocks) == [{"kind": "fixed", "n": 20}] * 2


def test_compute_bound_cell_refuses_to_repeat_n():
    cell = harness.Cell("distinct", "binary", "pipe")
    blocks: dict[str, int] = {}
    fresh = (harness.DISTINCT_RANGE[1] - harness.DISTINCT_RANGE[0] + 1) // load.DISTINCT_BLOCK
    harness.workload_specs(cell, "gmpy2", fresh, blocks)
    with pytest.raises(harness.BenchFailure, match="fresh values"):
        harness.workload_specs(cell, "gmpy2", 1, blocks)


def test_plain_processes_for_each_worker_count_and_the_asyncio_cell():
    settings = harness.Settings(quick=True, url="amqp://x", out=Path("/tmp"), duration=1, warmup=0, repeat=1, clients=1,
                                window=32, workers=[1, 2, 4], servers=["gmpy2", "fastfib", "aio"], naive_calls=1,
                                lost_timeout=5, cache_bytes=None)
    specs = {s.key: s for s in harness.server_specs(settings, "run", fastfib_ok=True)}
    assert {"gmpy2", "gmpy2-p2", "gmpy2-p4"} <= set(specs)
    assert specs["gmpy2-p2"].argv[-2:] == ["--procs", "2"] and specs["gmpy2-p4"].workers == 4
    distinct = harness.Cell("distinct", "binary", "pipe")
    assert harness.applies(specs["gmpy2-p2"], distinct, 4) == (True, None)
    assert harness.applies(specs["gmpy2-p2"], harness.Cell("fixed", "decimal", "pipe", 20), 4)[0] is False
    assert harness.cell_params(settings, specs["fastfib-w2"], distinct)["window"] == 8
    aio = [c for c in harness.build_cells(True, {"aio"}) if c.api == "aio"]
    assert [c.id for c in aio] == ["n=20/decimal/pipe/aio"]
    assert harness.applies(specs["fastfib-w4"], aio[0], 4) == (True, None)
    assert harness.applies(specs["fastfib-w2"], aio[0], 4)[0] is False
    params = harness.cell_params(settings, specs["fastfib-w4"], aio[0])
    assert (params["calls"], params["inflight"]) == (4000, 64)


def test_asyncio_cell_rows_and_target():
    cell = harness.Cell("fixed", "decimal", "pipe", 20, api="aio")
    pool = {"key": "fastfib-w2", "kind": "fastfib", "label": "fastfib w=2", "workers": 2, "cache": True}

    def side(seconds: float, cpu: float) -> dict:
        return {"count": 4000, "verified": 4200, "t_start": 1.0, "t_end": 2.0, "busy_s": seconds, "hist": None,
                "stray": 0, "min_count_reached": True, "side_cpu_s": cpu}

    ms = [harness.Measurement("fastfib-w2", cell, r, [{**side(1.0, 0.5), "baseline": side(3.5 + r, 3.0)}], {}, None,
                              [(1, 1.0, 0.1)], 5.0, {"window": 64}) for r in range(3)]
    rows = harness.aggregate({"servers": [pool], "measurements": ms, "not_run": []})
    by_server = {r["server"]: r for r in rows}
    assert set(by_server) == {harness.AIO_ROW, harness.AIO_BASELINE_ROW}
    assert by_server[harness.AIO_ROW]["cpu"]["side_us_per_reply"] == pytest.approx(125.0)
    t = next(t for t in report.compute_targets(rows, [pool], {"serve": True, "client": True}) if t["key"] == "aio")
    assert t["ratios_by_repeat"] == pytest.approx([3.5, 4.5, 5.5]) and t["ratio"] == pytest.approx(4.5) and t["passed"]


def test_report_says_what_passes_and_what_the_exit_status_means(tmp_path):
    targets = [
        {"key": "a", "group": "g", "description": "thing A at least 2×", "op": ">=", "threshold": 2.0, "status": "measured",
         "ratio": 2.5, "passed": True, "ratios_by_repeat": [2.5]},
        {"key": "b", "group": "g", "description": "thing B at most 1.0×", "op": "<=", "threshold": 1.0, "status": "measured",
         "ratio": 1.2, "passed": False, "ratios_by_repeat": [1.2]},
        {"key": "c", "group": "g", "description": "thing C", "op": ">=", "threshold": 1.0, "status": "not_measured",
         "ratio": None, "passed": None, "reason": "not measured: x not run"},
    ]
    for quick in (False, True):
        text = "\n".join(report.summary_lines({"targets": targets, "settings": {"quick": quick}}))
        assert "1 of 3 targets pass, 1 fail, 1 were not measured" in text
        assert "thing B at most 1.0×: measured 1.20×, needs <= 1.0×" in text
        assert ("indicative" in text) == quick
    assert report.verdict(targets[1], quick=True) == "FAIL (indicative: --quick)"
    assert report.verdict(targets[0]) == "PASS"


def test_cli_rejects_bad_arguments():
    p = subprocess.run([sys.executable, "-m", "bench", "--servers", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "unknown server" in p.stderr


# --- against the broker -------------------------------------------------------------------


@pytest.fixture
def reference_server(broker_url, queue_name):
    """Start `python -m bench.servers KIND ...` on this test's queue; yields a starter."""
    procs = []

    def start(kind: str, *extra: str) -> str:
        proc = subprocess.Popen([sys.executable, "-m", "bench.servers", kind, "--queue", queue_name, "--url", broker_url, *extra],
                                cwd=ROOT, start_new_session=True)
        procs.append(proc)
        control = harness.Control(broker_url)
        try:
            deadline = time.time() + 30
            while control.consumer_count(queue_name) != 1:
                assert proc.poll() is None, f"server exited with {proc.returncode}"
                assert time.time() < deadline, "server did not start consuming"
                control.sleep(0.05)
        finally:
            control.close()
        return queue_name

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)
    control = harness.Control(broker_url)
    control.delete(queue_name)
    control.close()


def _cell(queue, mode, **kw):
    cell = {"queue": queue, "mode": mode, "window": 8, "duration": 0.5, "warmup": 0.1, "min_count": 10,
            "lost_timeout": 3.0, "check": "fib", "strict_format": True, "format": "decimal",
            "workload": {"kind": "fixed", "n": 1000}}
    cell.update(kw)
    return cell


def _run_cell(url, cell):
    client = load.LoadClient(url)
    try:
        w = load.Workload(cell["workload"], cell["format"], cell["check"])
        w.prepare()
        return client.run(cell, w)
    finally:
        client.close()


@pytest.mark.broker
def test_distinct_replies_are_counted_once(broker_url, reference_server):
    # verified is the denominator of CPU per reply: a reply checked after the window counts once.
    queue = reference_server("gmpy2")
    cell = _cell(queue, "pipe", format="binary", workload={"kind": "distinct", "lo": 100_000, "hi": 200_000})
    client = load.LoadClient(broker_url)
    try:
        w = load.Workload(cell["workload"], cell["format"], cell["check"])
        res = client.run(cell, w)
    finally:
        client.close()
    assert res["ok"] and res["count"] >= 10
    assert res["count"] <= res["verified"] <= w.i  # no more replies checked than requests sent


@pytest.mark.broker
@pytest.mark.parametrize("mode", ["seq", "pipe"])
def test_load_measures_a_correct_server(broker_url, reference_server, mode):
    queue = reference_server("gmpy2")
    res = _run_cell(broker_url, _cell(queue, mode, format="binary"))
    assert res["ok"] and res["count"] >= 10 and res["verified"] >= res["count"]
    assert res["throughput"] > 0 and res["hist"]


@pytest.mark.broker
@pytest.mark.parametrize("mode", ["seq", "pipe"])
def test_load_fails_loudly_on_a_wrong_reply(broker_url, reference_server, mode):
    queue = reference_server("faulty", "--fault", "wrong", "--every", "7")
    with pytest.raises(load.CellFailed, match="WRONG reply for n=1000"):
        _run_cell(broker_url, _cell(queue, mode))


@pytest.mark.broker
@pytest.mark.parametrize("mode", ["seq", "pipe"])
def test_load_fails_loudly_on_a_lost_reply(broker_url, reference_server, mode):
    queue = reference_server("faulty", "--fault", "lose", "--every", "7")
    with pytest.raises(load.CellFailed, match="LOST repl"):
        _run_cell(broker_url, _cell(queue, mode, lost_timeout=1.0))


@pytest.mark.broker
@pytest.mark.parametrize("mode", ["seq", "pipe"])
def test_client_cell_interleaves_the_client_and_the_same_round_trip(broker_url, reference_server, mode):
    queue = reference_server("gmpy2")
    res = _run_cell(broker_url, _cell(queue, mode, api="client", format="binary", chunk=16))
    bare = res["baseline"]
    assert res["ok"] and bare["ok"]
    # the same requests, side by side: both sides count the same replies
    assert res["count"] == bare["count"] >= 10 and res["verified"] == bare["verified"] >= res["count"]
    assert res["pair_verified"] == res["verified"] + bare["verified"]
    # each side's own time: both took some, and together no more than the window they shared
    assert res["busy_s"] > 0 and bare["busy_s"] > 0
    assert res["busy_s"] + bare["busy_s"] <= res["t_end"] - res["t_start"] + 1e-3
    if mode == "seq":
        # one latency per counted call, on each side
        for side in (res, bare):
            assert load.HdrHistogram.decode(side["hist"].encode("ascii")).get_total_count() == side["count"]
    else:
        assert res["hist"] is None and bare["hist"] is None  # batches: no per-request latency


@pytest.mark.broker
@pytest.mark.parametrize("mode", ["seq", "pipe"])
def test_client_cell_fails_loudly_on_a_wrong_reply(broker_url, reference_server, mode):
    queue = reference_server("faulty", "--fault", "wrong", "--every", "7")
    with pytest.raises(load.CellFailed, match="WRONG"):
        _run_cell(broker_url, _cell(queue, mode, api="client", chunk=16))


def test_client_cell_rows_and_targets_come_from_one_measurement():
    """aggregate() splits a client cell into the client's row and the bare loop's; the p50 target divides the two."""
    cell = harness.Cell("fixed", "binary", "seq", 20, api="client")
    pool = {"key": "fastfib-w1", "kind": "fastfib", "label": "fastfib w=1", "workers": 1, "cache": True}

    def side(p50_us: int, busy_s: float) -> dict:
        h = load.new_histogram()
        for _ in range(100):
            h.record_value(p50_us)
        return {"count": 100, "verified": 100, "t_start": 10.0, "t_end": 11.0, "busy_s": busy_s,
                "hist": h.encode().decode("ascii"), "stray": 0, "min_count_reached": True}

    result = {**side(440, 0.044), "baseline": side(400, 0.040)}
    m = harness.Measurement("fastfib-w1", cell, 0, [result], {}, None, [(1, 0.5, 0.1)], 1.0, {"window": 1})
    rows = harness.aggregate({"servers": [pool], "measurements": [m], "not_run": []})
    by_server = {r["server"]: r for r in rows}
    assert set(by_server) == {harness.CLIENT_ROW, harness.CLIENT_BASELINE_ROW}
    # throughput over each side's own busy time, not over the shared window
    assert by_server[harness.CLIENT_ROW]["throughput_rps"] == pytest.approx(100 / 0.044)
    assert by_server[harness.CLIENT_BASELINE_ROW]["throughput_rps"] == pytest.approx(100 / 0.040)
    t41 = next(t for t in report.compute_targets(rows, [pool], {"serve": True, "client": True}) if t["key"] == "client-call-p50")
    assert t41["status"] == "measured" and t41["ratio"] == pytest.approx(1.1, rel=0.01) and t41["ratios_by_repeat"]


@pytest.mark.broker
@pytest.mark.slow
def test_quick_benchmark_run_writes_the_report(broker_url, tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--url", broker_url,
           "--duration", "0.3", "--warmup", "0.1", "--workers", "1", "--naive-calls", "2"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-5000:]}"

    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == 1 and report["status"] == "ok" and report["failure"] is None
    env = report["environment"]
    for key in ("machine", "python", "packages", "gmp", "rabbitmq", "git"):
        assert env[key], key
    assert env["packages"]["pika"] and env["packages"]["gmpy2"] and "GMP" in env["gmp"]
    assert env["rabbitmq"]["server_properties"]["version"]
    assert env["machine"]["cpu_count"] >= 1 and env["git"]["commit"]
    assert report["fastfib"]["serve"], f"fastfib serve was not measured: {report['fastfib']['serve_reason']}"

    rows = report["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["server"] for r in ok} >= {"echo", "naive", "gmpy2", "fastfib-w1"}
    for r in ok:
        assert r["throughput_rps"] > 0 and r["count"] > 0 and r["verified"] >= r["count"], r["id"]
        assert r["cpu"]["server_s"] is not None and r["cpu"]["load_s"] is not None, r["id"]
        if r["api"] == "pika" or (r["api"] == "client" and r["mode"] == "seq"):  # pipelined clients: rates only
            assert set(r["latency_us"]) >= {"p50", "p90", "p99", "p99.9"}, r["id"]
            assert r["latency_us"]["p50"] <= r["latency_us"]["p99"] <= r["latency_us"]["p99.9"]
            assert r["cdf"] and r["cdf"][-1][0] == pytest.approx(100.0)
    if report["fastfib"]["client"]:
        for side in (harness.CLIENT_ROW, harness.CLIENT_BASELINE_ROW):
            assert {r["cell"] for r in ok if r["server"] == side} == {"n=20/binary/seq/client", "n=20/binary/pipe/client"}, side
        keys = ("client-call-p50", "client-many-cpu", "client-many-rate")
        client_targets = {t["key"]: t for t in report["targets"] if t["key"] in keys}
        assert set(client_targets) == set(keys) and all(t["status"] == "measured" for t in client_targets.values())
    else:
        assert any("client rows" in n for n in report["notes"])
    # the naive server: measured at n=30 with a few calls, never at n >= 1000
    naive30 = next(r for r in ok if r["server"] == "naive" and r["cell"] == "n=30/decimal/seq")
    assert naive30["count"] == 2
    not_run = [r for r in rows if r["status"] == "not_run"]
    assert not_run and all(r["server"] == "naive" and r["reason"].startswith("not run") for r in not_run)
    # the targets are there, as ratios or with the reason they are not
    keys = {t["key"] for t in report["targets"]}
    assert {"n20-naive-w1", "n20-seq-w1", "hot-w1", "compute-w1", "encode-binary", "threads-10M"} <= keys
    for t in report["targets"]:
        assert t["status"] in ("measured", "not_measured")
        if t["status"] == "measured":
            assert t["ratio"] > 0 and isinstance(t["passed"], bool)
        else:
            assert t["reason"]

    md = (out / "report.md").read_text()
    for heading in ("# fastfib benchmark report", "## Machine and versions", "## Targets", "## Results"):
        assert heading in md
    assert set(report["plots"]) == {"latency_cdf_sequential.png", "latency_cdf_pipelined.png",
                                    "throughput_vs_workers.png", "speedup_vs_naive.png"}
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in md
    assert "targets" in p.stdout  # the rich table at the end

    # the report can be rebuilt from report.json alone
    (out / "report.md").unlink()
    p = subprocess.run([sys.executable, "-m", "bench", "report", str(out), "--no-plots"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (out / "report.md").exists()


@pytest.mark.broker
def test_a_wrong_reply_fails_the_run_and_the_servers_are_stopped(broker_url, tmp_path, monkeypatch):
    real_specs = harness.server_specs

    def faulty_specs(settings, run_id, fastfib_ok):
        specs = real_specs(settings, run_id, fastfib_ok)
        for s in specs:  # the "gmpy2" server answers F(n+1) every 5th request
            s.argv += ["--prefetch", "8"]
            s.argv[s.argv.index("gmpy2")] = "faulty"
            s.argv += ["--fault", "wrong", "--every", "5"]
        return specs

    monkeypatch.setattr(harness, "server_specs", faulty_specs)
    settings = harness.Settings(quick=True, url=broker_url, out=tmp_path, duration=0.3, warmup=0.05, repeat=1,
                                clients=1, window=4, workers=[1], servers=["gmpy2"], naive_calls=2,
                                lost_timeout=5.0, cache_bytes=None)
    raw = harness.run(settings)
    assert raw["failure"] and "WRONG reply" in raw["failure"] and "gmpy2" in raw["failure"]
    from bench import report

    rep = report.build_report(raw)
    assert rep["status"] == "failed" and rep["notes"][0].startswith("RUN FAILED")
    # the server was killed and its queue deleted
    queue = raw["servers"][0]["queue"]
    control = harness.Control(broker_url)
    try:
        assert control.consumer_count(queue) is None
    finally:
        control.close()
    log = (tmp_path / "logs" / "server-gmpy2.log").read_text()
    assert "Traceback" not in log


def _kernel_doc(threshold, end=None):
    enc = {"repeats": 3, "binary_vs_gmpy2_fib": 1.0, "decimal_vs_gmpy2_digits": 1.0,
           "quartiles": {"binary_vs_gmpy2_fib": [1, 1, 1], "decimal_vs_gmpy2_digits": [1, 1, 1]}}
    cal = {"threads_min_n": threshold, "ms": 60.0, "rungs": [], "runs": 1, "retry_in_s": None}
    return {"encoding": enc, "threads_min_n": threshold, "threads_calibration": cal,
            "threads_calibration_end": end, "threads": []}


def test_kernel_report_says_when_two_threads_were_not_used_and_measured_again():
    from fastfib import _kernel

    never = _kernel.THREADS_NEVER
    text = "\n".join(report.kernel_lines(_kernel_doc(never)))
    assert "found no size where two threads won" in text and str(never) not in text
    assert "timings chose one or two threads size by size" in text
    assert "measured again" not in text
    end = {"threads_min_n": 262144, "ms": 30.0, "rungs": [], "runs": 3, "retry_in_s": None}
    text = "\n".join(report.kernel_lines(_kernel_doc(never, end)))
    assert "measured again 2 time(s) during the rounds, the last time: calibrated threshold n ≥ 262144" in text
    assert "calibrated threshold n ≥ 524288" in "\n".join(report.kernel_lines(_kernel_doc(524288)))
