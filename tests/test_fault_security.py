"""Security (issue 6, part 7).

(a) Nothing from the wire is evaluated or unpickled: an ``ast`` scan of
    fastfib/*.py (and a text scan of the Cython kernel) for eval, exec,
    compile, __import__, pickle, marshal, shelve, yaml.load and friends.
(b) Credentials from the URL never appear in a log: the server (DEBUG level),
    ``fastfib call`` and the client library at DEBUG run with a password that
    is a unique random string, also when the broker refuses it.
(c) ``amqps://`` with TLS options in the URL: the local RabbitMQ gets a TLS
    listener on a free port at runtime (``rabbit_networking:start_ssl_listener``,
    no configuration change, removed afterwards), with a CA and a server
    certificate made by the test; the pool and the clients work over it, and
    refuse a server they cannot verify.
(d) Least privilege: users with exactly the permissions docs/reliability.md
    gives for the server and for clients; everything works with them, and
    what they must not do is refused (403).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import uuid
from pathlib import Path

import pika
import pytest
from _fault_helpers import (
    URL,
    Pool,
    amqp_url,
    broker_user,
    delete_queue,
    free_port,
    make_tls_files,
    rabbitmqctl,
    tls_listener,
    unique,
)

from fastfib import FibonacciRpcClient
from fastfib.errors import ConnectionLost

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastfib"

# ------------------------------------------------------------------------ (a) no eval, no pickle

#: Builtins that run code given as data.
_CODE_BUILTINS = {"eval", "exec", "compile", "__import__", "execfile", "input"}
#: Modules that turn bytes into arbitrary objects (or code).
_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle"}
#: Attribute calls that do the same: yaml.load (not safe_load), pickle.loads via another name, ...
_UNSAFE_ATTRIBUTES = {("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("pickle", "loads"),
                      ("pickle", "load"), ("marshal", "loads"), ("marshal", "load"), ("importlib", "import_module")}


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """Every use of code evaluation or unsafe deserialization in ``source``, as "file:line: what"."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in _CODE_BUILTINS:
                found.append(f"{where}: {func.id}()")
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if (func.value.id, func.attr) in _UNSAFE_ATTRIBUTES or (
                        func.value.id == "builtins" and func.attr in _CODE_BUILTINS):
                    found.append(f"{where}: {func.value.id}.{func.attr}()")
        elif isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in _UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in _UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
    return found


def test_the_scanner_finds_what_it_looks_for():
    planted = (
        "import pickle\nfrom marshal import loads\nimport yaml\n"
        "def handle(body):\n    eval(body)\n    exec(body)\n    yaml.load(body)\n    pickle.loads(body)\n"
        "    __import__(body)\n    builtins.eval(body)\n    yaml.safe_load(body)\n"
    )
    found = unsafe_calls(planted)
    assert len(found) == 8, found  # everything but "import yaml" and yaml.safe_load
    assert not unsafe_calls("import json\nimport ast\njson.loads(b)\nast.literal_eval(s)\n")


def test_no_eval_exec_or_unsafe_deserialization_in_fastfib():
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) >= 10, "the package was not found"
    found = [hit for path in files for hit in unsafe_calls(path.read_text(), path.name)]
    assert not found, "code evaluation or unsafe deserialization in fastfib:\n" + "\n".join(found)
    # The Cython kernel: ast cannot parse it; a text scan for the same names.
    for pyx in PACKAGE.glob("*.pyx"):
        text = pyx.read_text()
        for word in ("eval(", "exec(", "pickle", "marshal", "__import__", "yaml"):
            assert word not in text, f"{word!r} in {pyx.name}"


# ----------------------------------------------------------------------------- (b) no secrets in logs



def _run(args: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


_CLIENT_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
from fastfib import FibonacciRpcClient
from fastfib.errors import RpcError
try:
    with FibonacciRpcClient(sys.argv[1], sys.argv[2], timeout=5) as client:
        print(client.call(20))
except RpcError as exc:
    logging.getLogger("probe").error("call failed: %s", exc, exc_info=True)
    sys.exit(4)
"""


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_credentials_never_appear_in_logs(broker_url):
    queue = unique("secrets")
    wrong = f"wrong-{uuid.uuid4().hex}"
    try:
        with broker_user(".*", ".*", ".*", tag="secrets") as (user, password):
            url = amqp_url(user, password)
            logs: dict[str, str] = {}
            with Pool(queue, "--log-level", "DEBUG", url=url, workers=2) as pool:
                pool.wait_ready()
                # The CLI, and the library with DEBUG logging (pika's lines included), right and wrong password.
                ok = _run([sys.executable, "-m", "fastfib", "call", "10", "20", "--url", url, "--queue", queue])
                assert ok.returncode == 0 and ok.stdout.split() == ["55", "6765"], ok.stderr
                logs["cli"] = ok.stdout + ok.stderr
                refused = _run([sys.executable, "-m", "fastfib", "call", "10", "--url", amqp_url(user, wrong),
                                "--queue", queue, "--timeout", "5"])
                assert refused.returncode == 4 and "refused" in refused.stderr, refused.stderr
                logs["cli refused"] = refused.stdout + refused.stderr
                lib = _run([sys.executable, "-c", _CLIENT_SCRIPT, url, queue])
                assert lib.returncode == 0 and lib.stdout.strip() == "6765", lib.stderr
                logs["library"] = lib.stdout + lib.stderr
                lib_refused = _run([sys.executable, "-c", _CLIENT_SCRIPT, amqp_url(user, wrong), queue])
                assert lib_refused.returncode == 4, lib_refused.stderr
                logs["library refused"] = lib_refused.stdout + lib_refused.stderr
                # The broker drops the workers' connections: the reconnect lines name the URL.
                for line in rabbitmqctl("list_connections", "pid", "user").splitlines():
                    if line.rstrip().endswith(user):
                        rabbitmqctl("close_connection", line.split("\t")[0], "test: reconnect", check=False)
                pool.wait_ready(count=2, timeout=30)
                logs["server"] = pool.text()
                assert f"{user}:***@" in logs["server"] and "reconnecting to" in logs["server"]
            with Pool(queue, "--log-level", "DEBUG", url=amqp_url(user, wrong), workers=1) as pool:
                assert pool.wait(30) == 77
                logs["server refused"] = pool.text()
                assert "credentials refused" in logs["server refused"]
    finally:
        delete_queue(queue)
    for name, text in logs.items():
        assert password not in text, f"the password is in the {name} log"
        assert wrong not in text, f"the refused password is in the {name} log"


# ----------------------------------------------------------------------------------------- (c) TLS


@pytest.fixture
def tls_files():
    # Not pytest's tmp_path: its parents are 0700, and the broker (user rabbitmq) must read the files.
    directory = Path(tempfile.mkdtemp(prefix="fastfib-test-tls-"))
    try:
        yield make_tls_files(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _tls_url(port: int, ssl_options: dict, host: str = "localhost") -> str:
    return f"amqps://guest:guest@{host}:{port}/%2F?ssl_options={urllib.parse.quote(repr(ssl_options))}"


def _tls_connections() -> dict[str, bool]:
    """connection name -> whether the broker sees it over TLS."""
    result = {}
    for line in rabbitmqctl("list_connections", "ssl", "client_properties").splitlines():
        ssl, _, props = line.partition("\t")
        m = re.search(r'\{"connection_name","([^"]*)"\}', props)
        if m:
            result[m.group(1)] = ssl.strip() == "true"
    return result


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_amqps_with_a_ca_from_the_url_serves_and_verifies_the_server(broker_url, tls_files):
    port = free_port()
    queue = unique("tls")
    ca = str(tls_files["ca"])
    url = _tls_url(port, {"ca_certs": ca})
    try:
        with tls_listener(port, tls_files):
            with Pool(queue, url=url, workers=1) as pool:
                pool.wait_ready()
                with FibonacciRpcClient(_tls_url(port, {"ca_certs": ca}, host="127.0.0.1"), queue, timeout=10,
                                        connection_name=f"fastfib-test-tls-client-{queue}") as client:
                    assert client.call(30) == 832040
                    assert client.call_many([10, 1000])[0] == 55
                    tls = _tls_connections()
                    assert tls.get(f"fastfib-test-tls-client-{queue}") is True
                    assert any(name.startswith("fastfib-worker-0") and f"queue={queue}" in name and over_tls
                               for name, over_tls in tls.items()), tls
                cli = _run([sys.executable, "-m", "fastfib", "call", "30", "--url", url, "--queue", queue])
                assert cli.returncode == 0 and cli.stdout.strip() == "832040", cli.stderr
                # Verification is on: no CA (the system's store does not know ours), or a name the
                # certificate does not carry, and the connection is refused.
                for bad in (f"amqps://guest:guest@localhost:{port}/%2F",
                            _tls_url(port, {"ca_certs": ca, "server_hostname": "not-localhost.example"})):
                    with pytest.raises(ConnectionLost, match="(?i)certificate|hostname|verify"):
                        FibonacciRpcClient(bad, queue, timeout=5)
                assert "reconnecting" not in pool.text()
    finally:
        delete_queue(queue)
    assert port not in {int(p) for p in _listening_ports()}, "the TLS listener is still there"


def _listening_ports() -> list[str]:
    out = rabbitmqctl("eval", "[P || {listener, _, _, _, _, P, _} <- rabbit_networking:active_listeners()].")
    return [p for p in out.strip().strip("[]").split(",") if p.strip().isdigit()]


# ----------------------------------------------------------------------------- (d) least privilege


def _refused(conn, action) -> int:
    """Run ``action(channel)`` on a new channel of ``conn``; the reply code the broker closed it with (0: allowed)."""
    try:
        action(conn.channel())
    except pika.exceptions.ChannelClosedByBroker as exc:
        return exc.reply_code
    return 0


def _as(url: str):
    """A channel factory for ``url``; every connection is closed by the caller's ``with``."""
    return pika.BlockingConnection(pika.URLParameters(url))


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_least_privilege_server_and_client_users(broker_url):
    queue = unique("perm")
    q = queue.replace(".", r"\.")
    other = unique("perm-other")
    guest = pika.BlockingConnection(pika.URLParameters(URL))
    guest.channel().queue_declare(other, auto_delete=False)
    try:
        with broker_user(f"^{q}$", r"^amq\.default$", f"^{q}$", tag="server") as server, \
                broker_user("^$", r"^amq\.default$", "^$", tag="client") as direct_client, \
                broker_user(r"^amq\.gen-.*", r"^amq\.default$", r"^amq\.gen-.*", tag="client-excl") as excl_client:
            server_url, client_url, excl_url = (amqp_url(*server), amqp_url(*direct_client), amqp_url(*excl_client))
            with Pool(queue, url=server_url, workers=2) as pool:
                pool.wait_ready()
                with FibonacciRpcClient(client_url, queue, timeout=10) as client:
                    assert client.call(30) == 832040
                    assert client.call_many(range(50)) == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377,
                                                           610, 987, 1597, 2584, 4181, 6765, 10946, 17711, 28657,
                                                           46368, 75025, 121393, 196418, 317811, 514229, 832040,
                                                           1346269, 2178309, 3524578, 5702887, 9227465, 14930352,
                                                           24157817, 39088169, 63245986, 102334155, 165580141,
                                                           267914296, 433494437, 701408733, 1134903170, 1836311903,
                                                           2971215073, 4807526976, 7778742049]
                with FibonacciRpcClient(excl_url, queue, timeout=10, reply_queue="exclusive") as client:
                    assert client.call(40) == 102334155
                assert "refused" not in pool.text() and "ACCESS_REFUSED" not in pool.text()

                # What a client must not do: read, declare, purge or delete the service queue, publish elsewhere.
                for url in (client_url, excl_url):
                    conn = _as(url)
                    try:
                        assert _refused(conn, lambda ch: ch.basic_get(queue)) == 403
                        assert _refused(conn, lambda ch: ch.basic_consume(queue, lambda *a: None)) == 403
                        assert _refused(conn, lambda ch: ch.queue_declare(queue)) == 403
                        assert _refused(conn, lambda ch: ch.queue_purge(queue)) == 403
                        assert _refused(conn, lambda ch: ch.queue_delete(queue)) == 403
                        assert _refused(conn, lambda ch: _publish_confirmed(ch, "amq.direct", queue)) == 403
                        assert _refused(conn, lambda ch: ch.basic_get(other)) == 403
                    finally:
                        conn.close()
                # What the server must not do: other queues, other exchanges.
                conn = _as(server_url)
                try:
                    assert _refused(conn, lambda ch: ch.basic_get(other)) == 403
                    assert _refused(conn, lambda ch: ch.queue_declare(unique("perm-new"))) == 403
                    assert _refused(conn, lambda ch: ch.queue_delete(other)) == 403
                    assert _refused(conn, lambda ch: _publish_confirmed(ch, "amq.topic", "x")) == 403
                    assert _refused(conn, lambda ch: ch.exchange_declare(unique("perm-x"))) == 403
                finally:
                    conn.close()
            # With the client's permissions a pool cannot even declare its queue: a clear fatal error.
            with Pool(unique("perm-denied"), url=client_url, workers=1) as pool:
                assert pool.wait(30) == 77
                assert "permission refused" in pool.text()
    finally:
        try:
            guest.channel().queue_delete(other)
        finally:
            guest.close()
        delete_queue(queue)


def _publish_confirmed(channel, exchange: str, routing_key: str) -> None:
    """Publish and wait for the broker's verdict (a refused publish closes the channel asynchronously)."""
    channel.confirm_delivery()
    channel.basic_publish(exchange, routing_key, json.dumps({"n": 1}).encode())
