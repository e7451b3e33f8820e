"""Protocol v1 parsing and decoding, as the contract (docs/protocol.md) defines them."""

from __future__ import annotations

import json

import gmpy2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastfib import errors, protocol


@pytest.mark.parametrize(
    "body, n",
    [(b"0", 0), (b"30", 30), (b" 30\n", 30), (b"\t\r\n 7 \x0b\x0c", 7), (b"007", 7), (b"-0", 0), (b"1000000", 10**6)],
)
def test_parse_valid(body, n):
    assert protocol.parse_n(body) == n


@pytest.mark.parametrize(
    "body",
    [b"", b"   ", b"abc", b"1e3", b"30.0", b"1_000", b"+5", b"0x10", b"3 0", b"--1", b"-", "٣٠".encode(),
     "３０".encode(), b"\xff\xfe", b"30\x00", b"1" * 65, b" " * 60 + b"12345"],
)
def test_parse_invalid_argument(body):
    with pytest.raises(errors.InvalidArgument) as info:
        protocol.parse_n(body)
    assert info.value.kind == "invalid_argument"
    assert isinstance(info.value, ValueError)


def test_body_limit_is_64_bytes():
    assert protocol.parse_n(b" " * 62 + b"12") == 12
    with pytest.raises(errors.InvalidArgument, match="65 bytes; at most 64"):
        protocol.parse_n(b" " * 63 + b"12")


def test_negative_says_negative():
    with pytest.raises(errors.OutOfRange, match="must not be negative, got -5$"):
        protocol.parse_n(b"-5")


def test_above_max_names_the_max():
    with pytest.raises(errors.OutOfRange, match=r"at most 1000 \(the server's maximum\), got 1001$"):
        protocol.parse_n(b"1001", max_n=1000)
    assert protocol.parse_n(b"1000", max_n=1000) == 1000


def test_huge_number_message_is_short():
    with pytest.raises(errors.OutOfRange) as info:
        protocol.parse_n(b"9" * 60)
    assert "(60 digits)" in info.value.message and len(info.value.message) < 120


@given(st.binary(max_size=80))
def test_parse_never_raises_anything_else(body):
    try:
        n = protocol.parse_n(body)
    except (errors.InvalidArgument, errors.OutOfRange):
        return
    assert 0 <= n <= protocol.DEFAULT_MAX_N
    assert body.strip().lstrip(b"-").isdigit()


@pytest.mark.parametrize(
    "headers, fmt",
    [(None, "decimal"), ({}, "decimal"), ({"accept": "text/plain"}, "decimal"),
     ({"accept": "application/octet-stream"}, "binary"), ({"accept": b"application/octet-stream"}, "binary")],
)
def test_reply_format(headers, fmt):
    assert protocol.reply_format(headers) == fmt


@pytest.mark.parametrize("accept", ["application/json", "TEXT/PLAIN", "", 5, "text/plain; charset=ascii"])
def test_reply_format_unsupported(accept):
    with pytest.raises(errors.UnsupportedFormat) as info:
        protocol.reply_format({"accept": accept})
    assert info.value.kind == "unsupported_format"


def test_deadline():
    assert not protocol.deadline_passed(None)
    assert not protocol.deadline_passed({"x-deadline-ms": "soon"})
    assert protocol.deadline_passed({"x-deadline-ms": 1000}, now_ms=1001)
    assert not protocol.deadline_passed({"x-deadline-ms": 1000}, now_ms=999)
    assert protocol.deadline_header(2.5, now=100.0) == 102500
    assert protocol.expiration(2.5) == "2500"
    assert protocol.expiration(0.0001) == "1"


def test_error_body_is_protocol_json():
    doc = json.loads(protocol.error_body("out_of_range", "too big"))
    assert doc == {"error": "out_of_range", "message": "too big"}


@pytest.mark.parametrize("kind, cls", [("invalid_argument", errors.InvalidArgument), ("out_of_range", errors.OutOfRange),
                                       ("unsupported_format", errors.UnsupportedFormat),
                                       ("internal", errors.InternalServerError), ("brand_new", errors.RemoteError)])
def test_decode_error_reply(kind, cls):
    with pytest.raises(cls) as info:
        protocol.decode_reply("application/json", {"x-error": kind}, protocol.error_body(kind, "msg"))
    assert type(info.value) is cls
    assert info.value.kind == kind and info.value.message == "msg"
    assert isinstance(info.value, errors.RpcError)


def test_decode_success():
    big = gmpy2.fib(10**5)
    assert protocol.decode_reply(None, None, b"832040") == 832040  # the tutorial's server: no content_type
    assert protocol.decode_reply("text/plain", {}, big.digits().encode()) == big  # > 4300 digits
    assert protocol.decode_reply("application/octet-stream", None, b"\x00") == 0
    assert protocol.decode_reply("application/octet-stream", None, b"\x01\x00") == 256
    for bad in [(None, None, b"12a"), ("application/octet-stream", None, b""), ("image/png", None, b"1")]:
        with pytest.raises(errors.ProtocolError):
            protocol.decode_reply(*bad)


def test_error_hierarchy():
    assert issubclass(errors.RpcTimeout, TimeoutError) and issubclass(errors.RpcTimeout, errors.RpcError)
    assert issubclass(errors.OutOfRange, ValueError) and issubclass(errors.OutOfRange, errors.RemoteError)
    assert issubclass(errors.Unroutable, errors.RpcError)
    assert issubclass(errors.RemoteError, errors.RpcError) and issubclass(errors.RpcError, errors.FastFibError)
