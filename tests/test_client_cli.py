"""`fastfib call`: output and exit codes (0 ok, 2 bad arguments, 3 remote error, 4 no answer)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from _client_helpers import (
    ROOT,
    FixtureServer,
    conformant_handler,
    decimal,
    declare,
    fib,
    naive_handler,
)
from _net import TcpProxy

from fastfib.cli import EXIT_OK, EXIT_REMOTE_ERROR, EXIT_TIMEOUT, EXIT_USAGE, main

pytestmark = pytest.mark.broker


def fastfib_call(*argv: str) -> int:
    try:
        return main(["call", *argv])
    except SystemExit as exc:  # argparse
        return exc.code


@pytest.mark.parametrize("fmt", ["binary", "decimal"])
def test_prints_one_value_per_line(broker_url, queue, capsys, fmt):
    with FixtureServer(queue, conformant_handler()):
        code = fastfib_call("10", "0", "100", " 7 ", "--url", broker_url, "--queue", queue, "--format", fmt)
    out = capsys.readouterr()
    assert code == EXIT_OK, out.err
    assert out.out == "55\n0\n354224848179261915075\n13\n"


def test_large_value_against_the_tutorial_server(broker_url, queue, capsys):
    with FixtureServer(queue, naive_handler):
        assert fastfib_call("20000", "--url", broker_url, "--queue", queue) == EXIT_OK
    assert capsys.readouterr().out == decimal(fib(20000)) + "\n"  # more than 4300 digits


def test_url_from_the_environment(broker_url, queue, capsys, monkeypatch):
    monkeypatch.setenv("FASTFIB_URL", broker_url)
    with FixtureServer(queue, conformant_handler()):
        assert fastfib_call("12", "--queue", queue) == EXIT_OK
    assert capsys.readouterr().out == "144\n"


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no N
        ["-5"],
        ["1", "-1"],
        ["abc"],
        ["1.5"],
        ["1e3"],
        ["+3"],
        ["١٢"],  # non-ASCII digits
        ["1" * 65],
        ["3", "--timeout", "0"],
        ["3", "--timeout", "-1"],
        ["3", "--timeout", "soon"],
        ["3", "--format", "hex"],
        ["3", "--url", "nonsense://x:y:z"],
    ],
)
def test_bad_arguments_exit_2(queue, capsys, argv):
    assert fastfib_call(*argv, "--queue", queue) == EXIT_USAGE
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err


def test_remote_error_exit_3(broker_url, queue, capsys):
    with FixtureServer(queue, conformant_handler(max_n=100)):
        code = fastfib_call("5", "101", "--url", broker_url, "--queue", queue)
    out = capsys.readouterr()
    assert code == EXIT_REMOTE_ERROR
    assert out.out == ""  # all or nothing
    assert "out_of_range" in out.err and "at most 100" in out.err


def test_timeout_exit_4(broker_url, queue, capsys):
    declare(queue)
    code = fastfib_call("5", "--url", broker_url, "--queue", queue, "--timeout", "0.5")
    out = capsys.readouterr()
    assert code == EXIT_TIMEOUT
    assert "no consumer" in out.err


def test_unroutable_exit_4(broker_url, queue, capsys):
    code = fastfib_call("5", "--url", broker_url, "--queue", queue, "--timeout", "30")
    out = capsys.readouterr()
    assert code == EXIT_TIMEOUT
    assert "could not route" in out.err


def test_unreachable_broker_exit_4(queue, capsys):
    with TcpProxy() as proxy:
        url = proxy.url
    assert fastfib_call("5", "--url", url, "--queue", queue) == EXIT_TIMEOUT
    assert "connect" in capsys.readouterr().err


def test_as_a_command(broker_url, queue):
    """python -m fastfib call, end to end, in a process of its own."""
    env = {**os.environ, "FASTFIB_URL": broker_url}
    with FixtureServer(queue, conformant_handler()):
        proc = subprocess.run(
            [sys.executable, "-m", "fastfib", "call", "30", "31", "--queue", queue],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )
    assert (proc.returncode, proc.stdout) == (0, "832040\n1346269\n"), proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "fastfib", "call", "-3", "--queue", queue],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == EXIT_USAGE
    assert "negative" in proc.stderr


def test_queue_from_the_environment(broker_url, queue, capsys, monkeypatch):
    monkeypatch.setenv("FASTFIB_QUEUE", queue)
    with FixtureServer(queue, conformant_handler()):
        assert fastfib_call("12", "--url", broker_url) == EXIT_OK
    assert capsys.readouterr().out == "144\n"


def test_url_list_fails_over_to_the_next_url(broker_url, queue, capsys):
    with TcpProxy() as proxy:
        dead = proxy.url.replace("guest:guest@", "guest:s3cret@")
    with FixtureServer(queue, conformant_handler()):
        assert fastfib_call("10", "--url", f"{dead}, {broker_url}", "--queue", queue) == EXIT_OK
    assert capsys.readouterr().out == "55\n"


def test_unreachable_urls_are_each_named_with_the_password_masked(queue, capsys):
    with TcpProxy() as one, TcpProxy() as two:
        urls = [one.url.replace("guest:guest@", "guest:s3cret@"), two.url]
    assert fastfib_call("5", "--url", " ".join(urls), "--queue", queue) == EXIT_TIMEOUT
    err = capsys.readouterr().err
    for proxy in (one, two):
        assert f"127.0.0.1:{proxy.port} (ConnectionRefusedError" in err, err
    assert "s3cret" not in err


def test_no_consumer_warns_at_once_then_waits_for_a_server(broker_url, queue):
    """The warning comes while the call still waits; a server that starts then answers it."""
    declare(queue)
    env = {**os.environ, "FASTFIB_URL": broker_url, "FASTFIB_QUEUE": queue}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastfib", "call", "10", "--timeout", "120"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        warning = proc.stderr.readline()
        assert "has no consumer" in warning and repr(queue) in warning
        assert proc.poll() is None  # still waiting for its reply
        with FixtureServer(queue, conformant_handler()):
            out, err = proc.communicate(timeout=120)
        assert (proc.returncode, out) == (EXIT_OK, "55\n"), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
