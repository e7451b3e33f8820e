"""Client pieces that need no broker: argument checks and the request-properties encoder."""

from __future__ import annotations

import time

import gmpy2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pika import frame
from pika.spec import BasicProperties

from fastfib import protocol
from fastfib.rpc_base import PropertiesTemplate, check_n, check_timeout, check_window


def reference(reply_to, accept, corr, expiration, deadline):
    return BasicProperties(
        reply_to=reply_to,
        correlation_id=corr,
        expiration=expiration,
        headers={protocol.HEADER_ACCEPT: accept, protocol.HEADER_DEADLINE: deadline},
    )


@given(
    reply_to=st.sampled_from([protocol.DIRECT_REPLY_TO, "amq.gen-JzTY20BRgKO-HjmUJj0wLg", "q" * 255]),
    accept=st.sampled_from([protocol.CONTENT_BINARY, protocol.CONTENT_DECIMAL, "text/html"]),
    corr=st.text(alphabet="0123456789abcdef", min_size=0, max_size=64),
    expiration=st.integers(1, 2**31).map(str),
    deadline=st.integers(2**31, 2**63 - 1),
)
def test_request_properties_encode_exactly_like_pika(reply_to, accept, corr, expiration, deadline):
    props = PropertiesTemplate(accept, reply_to)(corr, expiration, deadline)
    ref = reference(reply_to, accept, corr, expiration, deadline)
    assert b"".join(props.encode()) == b"".join(ref.encode())
    assert frame.Header(1, 10, props).marshal() == frame.Header(1, 10, ref).marshal()
    decoded = BasicProperties()
    decoded.decode(b"".join(props.encode()))
    assert (decoded.reply_to, decoded.correlation_id, decoded.expiration) == (reply_to, corr, expiration)
    assert decoded.headers == {protocol.HEADER_ACCEPT: accept, protocol.HEADER_DEADLINE: deadline}
    # What a reader of the request sees.
    assert (props.reply_to, props.correlation_id, props.expiration, props.headers) == (
        reply_to,
        corr,
        expiration,
        decoded.headers,
    )
    assert props.content_type is None and props.delivery_mode is None


def test_small_deadline_falls_back_to_pika():
    # Not a real Unix-epoch-ms deadline, but the template must never encode it differently from pika.
    props = PropertiesTemplate(protocol.CONTENT_BINARY, protocol.DIRECT_REPLY_TO)("c", "5", 12345)
    ref = reference(protocol.DIRECT_REPLY_TO, protocol.CONTENT_BINARY, "c", "5", 12345)
    assert b"".join(props.encode()) == b"".join(ref.encode())


def test_current_deadline_is_64_bit():
    deadline = protocol.deadline_header(30)
    assert deadline > 2**31
    props = PropertiesTemplate(protocol.CONTENT_BINARY, protocol.DIRECT_REPLY_TO)("c", "30000", deadline)
    assert repr(props).startswith("<RequestProperties")


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
