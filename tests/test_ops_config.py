"""Configuration and logging of ``fastfib serve`` (no broker): flag > environment > default,
bad variables as usage errors, ``--help``, the queue declaration, JSON logs and masked passwords.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import subprocess
import sys

import pytest
from _ops_helpers import ROOT, blocked_prometheus_path, clean_env, run_serve

from fastfib import config as cfg
from fastfib.cli import build_parser
from fastfib.logs import JsonFormatter, TextFormatter, configure_logging, mask_secrets
from fastfib.server.settings import WorkerConfig


def settings(argv: list[str], env: dict[str, str] | None = None) -> cfg.ServeSettings:
    args = build_parser().parse_args(["serve", *argv])
    return cfg.serve_settings(args, env or {})


# ------------------------------------------------------------------------------ precedence


def test_defaults_without_flags_or_environment():
    s = settings([])
    w = s.worker
    assert w.urls == ("amqp://guest:guest@localhost:5672/%2F",)
    assert (w.queue, w.prefetch, w.max_n, w.inline_max_n, w.log_level, w.log_format) == \
        ("rpc_queue", 64, 1_000_000, 20_000, "INFO", "text")
    assert w.cache_bytes == 64 * 1024 * 1024 and s.workers >= 1
    assert s.metrics_port is None and s.metrics_host == "127.0.0.1" and not w.metrics
    # Issue 14: the current tutorial's declaration (durable, quorum), not the seed tutorial's transient one.
    assert w.queue_declaration() == (True, {"x-queue-type": "quorum"})
    assert w.max_reply_bytes == 16 * 1024 * 1024


def test_environment_beats_default_and_flag_beats_environment():
    env = {"FASTFIB_QUEUE": "env-q", "FASTFIB_WORKERS": "3", "FASTFIB_PREFETCH": "7", "FASTFIB_MAX_N": "500",
           "FASTFIB_CACHE_BYTES": "0", "FASTFIB_INLINE_MAX_N": "10", "FASTFIB_LOG_LEVEL": "debug",
           "FASTFIB_LOG_FORMAT": "JSON", "FASTFIB_METRICS_PORT": "9100", "FASTFIB_METRICS_HOST": "0.0.0.0",
           "FASTFIB_QUEUE_DURABLE": "yes", "FASTFIB_URL": "amqp://a:1@h1/%2F, amqp://a:1@h2/%2F"}
    s = settings([], env)
    w = s.worker
    assert (w.queue, s.workers, w.prefetch, w.max_n, w.cache_bytes, w.inline_max_n) == ("env-q", 3, 7, 500, 0, 10)
    assert (w.log_level, w.log_format, s.metrics_port, s.metrics_host) == ("DEBUG", "json", 9100, "0.0.0.0")
    assert w.urls == ("amqp://a:1@h1/%2F", "amqp://a:1@h2/%2F") and w.queue_durable and w.metrics

    s = settings(["--queue", "flag-q", "--workers", "1", "--prefetch", "2", "--log-format", "text",
                  "--queue-type", "classic", "--no-queue-durable", "--url", "amqp://b:2@h3/%2F", "--metrics-port", "0"], env)
    w = s.worker
    assert (w.queue, s.workers, w.prefetch, w.log_format, w.queue_durable) == ("flag-q", 1, 2, "text", False)
    assert w.urls == ("amqp://b:2@h3/%2F",) and s.metrics_port == 0
    assert w.max_n == 500  # not given as a flag: still the environment's


def test_every_serve_flag_has_a_variable_and_appears_in_help():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    flags = {opt for action in serve._actions for opt in action.option_strings} - {"-h", "--help"}
    declared = {o.flag for o in cfg.SERVE_OPTIONS} | {"--no-queue-durable"}
    assert flags == declared
    help_text = " ".join(serve.format_help().split())  # argparse wraps lines
    for opt in cfg.SERVE_OPTIONS:
        assert opt.env.startswith("FASTFIB_") and f"env {opt.env})" in help_text
    for shown in ("default: rpc_queue", "default: 64", "default: 1000000", "default: the CPU count",
                  "default: off", "default: 127.0.0.1", "default: text", "default: quorum",
                  "default: 16777216 (16 MiB)"):
        assert shown in help_text


def test_empty_variable_counts_as_unset():
    s = settings([], {"FASTFIB_PREFETCH": "", "FASTFIB_QUEUE": "  "})
    assert s.worker.prefetch == 64 and s.worker.queue == "rpc_queue"


def test_a_flag_wins_even_over_a_bad_variable():
    assert settings(["--workers", "2"], {"FASTFIB_WORKERS": "many"}).workers == 2


@pytest.mark.parametrize("var, raw, says", [
    ("FASTFIB_WORKERS", "abc", "not an integer"),
    ("FASTFIB_WORKERS", "0", "at least 1"),
    ("FASTFIB_PREFETCH", "-3", "must not be negative"),
    ("FASTFIB_QUEUE_DURABLE", "maybe", "not a boolean"),
    ("FASTFIB_LOG_FORMAT", "xml", "invalid choice"),
    ("FASTFIB_METRICS_PORT", "70000", "not a TCP port"),
    ("FASTFIB_QUEUE_TYPE", "stream", "invalid choice"),
    ("FASTFIB_MAX_REPLY_BYTES", "0", "at least 1"),
])
def test_bad_variable_is_a_config_error_naming_it(var, raw, says):
    with pytest.raises(cfg.ConfigError) as info:
        settings([], {var: raw})
    assert var in str(info.value) and says in str(info.value)


def test_bad_variable_exits_2_from_the_command_line():
    out = run_serve(env=clean_env(FASTFIB_WORKERS="lots", FASTFIB_URL="amqp://guest:secret@127.0.0.1:1/%2F"))
    assert out.returncode == 2, out
    assert "FASTFIB_WORKERS='lots'" in out.stderr and "not an integer" in out.stderr
    assert "usage: fastfib serve" in out.stderr and "secret" not in out.stderr + out.stdout


def test_bad_url_in_the_environment_is_a_usage_error_without_the_password():
    out = run_serve(env=clean_env(FASTFIB_URL="amqp://guest:hunter2@127.0.0.1:notaport/%2F"))
    assert out.returncode == 2 and "bad broker URL" in out.stderr and "hunter2" not in out.stderr, out


@pytest.mark.parametrize("argv, says", [
    (["--queue-type", "classic", "--delivery-limit", "3"], "needs --queue-type quorum"),
    (["--no-queue-durable"], "needs --queue-type classic"),
    (["--dead-letter-routing-key", "k"], "needs --dead-letter-exchange"),
    (["--max-n", str(10**10)], "above the kernel's limit"),
    (["--max-n", "642228068"], "decimal reply fits"),
    (["--prefetch", "65536"], "above 65535"),
    (["--inline-max-n", "2000001"], "I/O thread"),
])
def test_inconsistent_settings_are_usage_errors(argv, says):
    with pytest.raises(cfg.ConfigError, match=says):
        settings(argv)


def test_inconsistent_settings_exit_2():
    out = run_serve("--queue-type", "classic", "--delivery-limit", "3")
    assert out.returncode == 2 and "needs --queue-type quorum" in out.stderr, out


@pytest.mark.parametrize("argv, says", [
    (["--prefetch", "70000"], "--prefetch 70000 is above 65535"),
    (["--inline-max-n", "10000000"], "--inline-max-n 10000000 is above 2000000"),
    (["--max-n", "700000000"], "--max-n 700000000 is above 642228067"),
])
def test_settings_out_of_bounds_exit_2_with_a_clear_message(argv, says):
    out = run_serve(*argv)
    assert out.returncode == 2 and says in out.stderr, out


def test_the_bounds_themselves_are_accepted():
    v = settings(["--prefetch", "65535", "--inline-max-n", str(2 * 10**6), "--max-n", "642228067"]).worker
    assert (v.prefetch, v.inline_max_n, v.max_n) == (65535, 2 * 10**6, 642228067)


# ------------------------------------------------------------------------------ queues


def test_queue_declarations():
    assert WorkerConfig().queue_declaration() == (True, {"x-queue-type": "quorum"})  # the current tutorial's
    assert WorkerConfig(queue_type="classic", queue_durable=False).queue_declaration() == (False, None)  # the seed's
    assert WorkerConfig(queue_type="classic").queue_declaration() == (True, None)
    assert WorkerConfig(queue_type="quorum").queue_declaration() == (True, {"x-queue-type": "quorum"})
    assert WorkerConfig(queue_type="quorum", dead_letter_exchange="dlx", dead_letter_routing_key="dead",
                        delivery_limit=5).queue_declaration() == (True, {
                            "x-queue-type": "quorum", "x-dead-letter-exchange": "dlx",
                            "x-dead-letter-routing-key": "dead", "x-delivery-limit": 5})
    assert WorkerConfig(queue_type="classic", queue_durable=False, dead_letter_exchange="dlx").queue_declaration() \
        == (False, {"x-dead-letter-exchange": "dlx"})
    assert "seed tutorial" in WorkerConfig(queue_type="classic", queue_durable=False).describe_queue()
    assert WorkerConfig().describe_queue() == "durable quorum"
    assert WorkerConfig(queue_type="quorum", delivery_limit=5).describe_queue() == "durable quorum, x-delivery-limit=5"


# ------------------------------------------------------------------------------ prometheus_client optional


def test_metrics_port_without_prometheus_client_is_a_clear_usage_error(tmp_path):
    env = clean_env(PYTHONPATH=blocked_prometheus_path(tmp_path))
    out = run_serve("--metrics-port", "0", "--url", "amqp://guest:guest@127.0.0.1:1/%2F", env=env)
    assert out.returncode == 2, out
    assert "needs prometheus_client" in out.stderr and "pip install prometheus_client" in out.stderr


def test_nothing_imports_prometheus_client_without_metrics():
    code = ("import sys; from fastfib.cli import build_parser; from fastfib import config, supervisor, health; from fastfib.server import lifecycle, settings;"
            "a = build_parser().parse_args(['serve']); config.serve_settings(a, {});"
            "w = lifecycle.Worker(settings.WorkerConfig()); w._flush_metrics();"
            "print(sorted(m for m in sys.modules if m.startswith('prometheus')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=clean_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ logging


def _record(msg: str, *args, level=logging.WARNING, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("fastfib.server.lifecycle", level, __file__, 1, msg, args, exc_info)


def test_mask_secrets_in_any_text():
    text = "lost amqp://guest:s3cret@h:5672/%2F and amqps://u:p%40ss@h2/v, not http://a:b@c"
    masked = mask_secrets(text)
    assert "s3cret" not in masked and "p%40ss" not in masked
    assert "amqp://guest:***@h:5672/%2F" in masked and "amqps://u:***@h2/v" in masked
    assert "http://a:b@c" in masked  # only AMQP URLs are ours to mask
    assert mask_secrets("amqp://host/%2F") == "amqp://host/%2F"


def test_json_formatter_fields_and_masking():
    fmt = JsonFormatter("worker-3", 3)
    line = fmt.format(_record("cannot connect to %s", "amqp://guest:topsecret@h:5672/%2F"))
    entry = json.loads(line)
    assert set(entry) >= {"time", "level", "logger", "message", "worker", "pid"}
    assert entry["level"] == "WARNING" and entry["logger"] == "fastfib.server.lifecycle" and entry["worker"] == 3
    assert entry["time"].endswith("Z") and "T" in entry["time"]
    assert entry["message"] == "cannot connect to amqp://guest:***@h:5672/%2F" and "topsecret" not in line
    try:
        raise RuntimeError("boom at amqp://u:pw123@x/")
    except RuntimeError:
        line = fmt.format(_record("failed", level=logging.ERROR, exc_info=sys.exc_info()))
    entry = json.loads(line)
    assert "RuntimeError" in entry["exception"] and "pw123" not in line and "\n" not in line


def test_text_formatter_masks_tracebacks_too():
    fmt = TextFormatter("supervisor[1]")
    try:
        raise ValueError("amqp://guest:pw@host/")
    except ValueError:
        text = fmt.format(_record("oops %s", "amqp://a:b@c/", exc_info=sys.exc_info()))
    assert "supervisor[1]: oops amqp://a:***@c/" in text and ":pw@" not in text and ":b@" not in text


def test_configure_logging_json_writes_one_object_per_line(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", "worker-1", log_format="json", worker=1)
        logging.getLogger("fastfib.test").info("hello %s\nworld", "there")
        logging.getLogger("fastfib.test").debug("not shown")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["message"] == "hello there\nworld" and entry["worker"] == 1 and entry["process"] == "worker-1"


def test_choice_parser_messages():
    with pytest.raises(argparse.ArgumentTypeError, match="choose from text, json"):
        cfg.choice("text", "json")("yaml")


def test_wire_from_flag_env_and_default():
    assert settings([]).worker.wire == "fast"
    assert settings([], {"FASTFIB_WIRE": "pika"}).worker.wire == "pika"
    assert settings(["--wire", "fast"], {"FASTFIB_WIRE": "pika"}).worker.wire == "fast"
    with pytest.raises(cfg.ConfigError, match="FASTFIB_WIRE"):
        settings([], {"FASTFIB_WIRE": "fastest"})


def test_one_url_flag_may_hold_several_urls_like_the_variable():
    """`--url "A B C"` is split as FASTFIB_URL is (it used to be read as one URL whose vhost was `/ amqp:`)."""
    a, b, c = "amqp://a:1@h1:5681/%2F", "amqp://a:1@h2:5682/%2F", "amqp://a:1@h3:5683/%2F"
    assert settings(["--url", f"{a} {b} {c}"]).worker.urls == (a, b, c)
    assert settings(["--url", f"{a},{b}", "--url", c]).worker.urls == (a, b, c)
    with pytest.raises(SystemExit):
        settings(["--url", " , "])
