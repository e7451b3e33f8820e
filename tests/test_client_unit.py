"""Client pieces that need no broker: argument checks and the requests as the client encodes them."""

from __future__ import annotations

import time

import gmpy2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pika import frame, spec
from pika.spec import BasicProperties

from fastfib import protocol
from fastfib.rpc_base import check_n, check_timeout, check_window
from fastfib.wire import RequestEncoder


def reference(reply_to, accept, corr, expiration, deadline):
    return BasicProperties(
        reply_to=reply_to,
        correlation_id=corr,
        expiration=expiration,
        headers={protocol.HEADER_ACCEPT: accept, protocol.HEADER_DEADLINE: deadline},
    )


def encoded(reply_to, accept, corr, expiration, deadline, body=b"20"):
    """A request as the client's fast wire writes it (fastfib.wire.RequestEncoder): (method, header) frames."""
    pieces = RequestEncoder(1, 131072, "rpc_queue", reply_to, accept, mandatory=True).frames(
        corr, expiration, deadline, body)
    return pieces[0], pieces[1]


@given(
    reply_to=st.sampled_from([protocol.DIRECT_REPLY_TO, "amq.gen-JzTY20BRgKO-HjmUJj0wLg", "q" * 255]),
    accept=st.sampled_from([protocol.CONTENT_BINARY, protocol.CONTENT_DECIMAL, "text/html"]),
    corr=st.text(alphabet="0123456789abcdef", min_size=0, max_size=64),
    expiration=st.integers(1, 2**31).map(str),
    deadline=st.integers(2**31, 2**63 - 1),
)
def test_request_properties_encode_exactly_like_pika(reply_to, accept, corr, expiration, deadline):
    method, header = encoded(reply_to, accept, corr, expiration, deadline)
    ref = reference(reply_to, accept, corr, expiration, deadline)
    assert header == frame.Header(1, 2, ref).marshal()
    assert method == frame.Method(1, spec.Basic.Publish(exchange="", routing_key="rpc_queue",
                                                        mandatory=True)).marshal()
    decoded = BasicProperties()
    decoded.decode(header[7 + 12:-1])  # after class, weight and body size
    assert (decoded.reply_to, decoded.correlation_id, decoded.expiration) == (reply_to, corr, expiration)
    assert decoded.headers == {protocol.HEADER_ACCEPT: accept, protocol.HEADER_DEADLINE: deadline}
    assert decoded.content_type is None and decoded.delivery_mode is None


def test_small_deadline_falls_back_to_pika():
    # Not a real Unix-epoch-ms deadline, but the encoder must never encode it differently from pika.
    _, header = encoded(protocol.DIRECT_REPLY_TO, protocol.CONTENT_BINARY, "c", "5", 12345)
    ref = reference(protocol.DIRECT_REPLY_TO, protocol.CONTENT_BINARY, "c", "5", 12345)
    assert header == frame.Header(1, 2, ref).marshal()


def test_current_deadline_is_64_bit():
    deadline = protocol.deadline_header(30)
    assert deadline > 2**31
    _, header = encoded(protocol.DIRECT_REPLY_TO, protocol.CONTENT_BINARY, "c", "30000", deadline)
    assert protocol.HEADER_DEADLINE.encode() + b"l" + deadline.to_bytes(8, "big") in header


@pytest.mark.parametrize("n", [0, 1, 10**63, 10**64 - 1, gmpy2.mpz(7)])
def testcheck_n_accepts(n):
    assert check_n(n) == n
    assert type(check_n(n)) is int


@pytest.mark.parametrize("n", [True, False, 1.0, "1", b"1", None, [1], 1j])
def testcheck_n_type_errors(n):
    with pytest.raises(TypeError):
        check_n(n)


@pytest.mark.parametrize("n", [-1, -(10**70), 10**64, gmpy2.mpz(-3)])
def testcheck_n_value_errors(n):
    with pytest.raises(ValueError):
        check_n(n)


def testcheck_timeout_and_window():
    assert check_timeout(1) == 1.0
    assert check_timeout(0.001) == 0.001
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            check_timeout(bad)
    for bad in ("1", None, True):
        with pytest.raises(TypeError):
            check_timeout(bad)
    assert check_window(1) == 1
    with pytest.raises(ValueError):
        check_window(0)
    with pytest.raises(TypeError):
        check_window(2.0)


def test_deadline_header_matches_protocol_helper():
    before = time.time()
    deadline = protocol.deadline_header(5)
    assert int((before + 5) * 1000) <= deadline <= int((time.time() + 5) * 1000)
