"""fastfib.wire against pika's own marshalling (pika.frame, pika.spec, pika.data), with hypothesis.

Encoding must give pika's bytes exactly; decoding must give what pika decodes,
or, where pika raises, a BadDelivery (never an exception, never a Delivery).
"""

from __future__ import annotations

import decimal
import struct
import subprocess
import sys
from datetime import datetime

import pytest
from _amqp_tables import nested_table
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pika import frame, spec
from pika.compat import long
from pika.spec import BasicProperties

from fastfib import wire

PROPERTY_NAMES = ("content_type", "content_encoding", "headers", "delivery_mode", "priority", "correlation_id",
                  "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id", "cluster_id")

shortstr = st.text(max_size=20).filter(lambda s: len(s.encode()) <= 255) | st.just("x" * 255) | st.just("ünï" * 10)
table_key = st.text(max_size=12)
scalar = st.one_of(
    st.text(max_size=30), st.binary(max_size=30), st.booleans(), st.none(),
    st.integers(-(2**31), 2**31 - 1), st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 2**63 - 1).map(long),
    st.decimals(allow_nan=False, allow_infinity=False, places=3, min_value=-(10**5), max_value=10**5),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)).map(lambda d: d.replace(microsecond=0)),
)
values = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(table_key, inner, max_size=4),
                      max_leaves=12)
tables = st.dictionaries(table_key, values, max_size=6)


@st.composite
def properties(draw) -> dict:
    chosen = draw(st.sets(st.sampled_from(PROPERTY_NAMES)))
    props = {}
    for name in chosen:
        if name == "headers":
            props[name] = draw(tables)
        elif name in ("delivery_mode", "priority"):
            props[name] = draw(st.integers(0, 255))
        elif name == "timestamp":
            props[name] = draw(st.integers(0, 2**64 - 1))
        else:
            props[name] = draw(shortstr)
    return props


bodies = st.one_of(st.just(b""), st.binary(max_size=64), st.binary(min_size=100, max_size=3000))
frame_maxes = st.one_of(st.integers(9, 64), st.just(4096), st.just(131072))


def pika_publish(channel, exchange, routing_key, body, frame_max, props, mandatory=False) -> bytes:
    """What pika's Connection._send_message marshals for basic_publish."""
    out = [frame.Method(channel, spec.Basic.Publish(exchange=exchange, routing_key=routing_key,
                                                    mandatory=mandatory)).marshal(),
           frame.Header(channel, len(body), BasicProperties(**props)).marshal()]
    body_max = frame_max - 8
    for start in range(0, len(body), body_max):
        out.append(frame.Body(channel, body[start:start + body_max]).marshal())
    return b"".join(out)


def pika_delivery(channel, consumer_tag, tag, redelivered, body, frame_max, header_payload: bytes) -> bytes:
    method = frame.Method(channel, spec.Basic.Deliver(consumer_tag=consumer_tag, delivery_tag=tag,
                                                      redelivered=redelivered, exchange="ex",
                                                      routing_key="rpc_queue")).marshal()
    header = struct.pack(">BHI", 2, channel, len(header_payload)) + header_payload + b"\xce"
    body_max = frame_max - 8
    bodies = [frame.Body(channel, body[s:s + body_max]).marshal() for s in range(0, len(body), body_max)]
    return method + header + b"".join(bodies)


def header_payload(body_size: int, props: dict) -> bytes:
    return struct.pack(">HxxQ", 60, body_size) + b"".join(BasicProperties(**props).encode())


def pika_decoded_properties(payload: bytes):
    """pika's decoding of a content header payload: its BasicProperties, or the exception it raises."""
    props = BasicProperties()
    try:
        props.decode(payload, 12)
    except Exception as exc:  # noqa: BLE001 - compared with ours
        return exc
    return props


def same_properties(ours: wire.Properties, theirs: BasicProperties) -> None:
    for name in PROPERTY_NAMES:
        assert getattr(ours, name) == getattr(theirs, name), name


def joined(pieces) -> bytes:
    return b"".join(bytes(p) for p in pieces)


# ------------------------------------------------------------------------------ encoding


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(props=properties(), body=bodies, frame_max=frame_maxes, channel=st.integers(1, 65535),
       exchange=shortstr, routing_key=shortstr, mandatory=st.booleans())
def test_encode_publish_is_pikas_bytes(props, body, frame_max, channel, exchange, routing_key, mandatory):
    pieces = wire.encode_publish(channel, exchange, routing_key, body, frame_max, mandatory=mandatory, **props)
    assert joined(pieces) == pika_publish(channel, exchange, routing_key, body, frame_max, props, mandatory)
    assert wire.frame_count(pieces) == 2 + (len(body) + frame_max - 9) // (frame_max - 8)


@settings(max_examples=200)
@given(body=bodies, frame_max=frame_maxes, correlation_id=st.none() | shortstr | st.binary(max_size=40),
       fmt=st.sampled_from(["decimal", "binary"]), reply_to=shortstr)
def test_reply_encoder_and_encode_reply_are_pikas_bytes(body, frame_max, correlation_id, fmt, reply_to):
    from fastfib import protocol

    expected = pika_publish(5, "", reply_to, body, frame_max,
                            {"content_type": protocol.CONTENT_TYPES[fmt], "correlation_id": correlation_id})
    encoder = wire.ReplyEncoder(5, frame_max - 8)
    for _ in range(2):  # the second time from the method frame cache
        pieces = encoder.frames(reply_to, wire.CONTENT_TYPE_SHORTSTR[fmt], correlation_id, body)
        assert joined(pieces) == expected
    assert joined(wire.encode_reply(5, reply_to, body, frame_max, content_type=protocol.CONTENT_TYPES[fmt],
                                    correlation_id=correlation_id)) == expected


def test_an_empty_body_has_no_body_frame():
    pieces = wire.ReplyEncoder(1, 131064).frames("q", wire.CONTENT_TYPE_SHORTSTR["decimal"], "c", b"")
    assert wire.frame_count(pieces) == 2 and len(pieces) == 2
    assert joined(pieces) == pika_publish(1, "", "q", b"", 131072, {"content_type": "text/plain",
                                                                    "correlation_id": "c"})
    assert len(wire.encode_request(1, "rpc_queue", b"", 131072, reply_to="r", correlation_id="c")) == 2


def test_large_bodies_are_cut_as_views_not_copies():
    body = bytes(1_000_000)
    pieces = wire.encode_reply(1, "q", body, 131072, content_type="text/plain")
    views = [p for p in pieces if isinstance(p, memoryview)]
    assert len(views) == 8 and all(v.obj is body for v in views)


def test_encode_request_is_pikas_bytes():
    props = {"reply_to": "amq.rabbitmq.reply-to", "correlation_id": "abc", "headers": {"x-deadline-ms": 2**45},
             "expiration": "5000"}
    assert joined(wire.encode_request(7, "rpc_queue", b"20", 131072, **props)) == pika_publish(
        7, "", "rpc_queue", b"20", 131072, props)


@settings(max_examples=200)
@given(body=bodies, frame_max=frame_maxes, cid=shortstr, expiration=st.text("0123456789", max_size=9),
       deadline=st.integers(0, 2**63 - 1), accept=st.sampled_from(["text/plain", "application/octet-stream"]),
       queue=shortstr, reply_to=shortstr, mandatory=st.booleans())
def test_request_encoder_is_encode_request_and_pika(body, frame_max, cid, expiration, deadline, accept, queue,
                                                    reply_to, mandatory):
    headers = {"accept": accept, "x-deadline-ms": deadline}
    encoder = wire.RequestEncoder(2, frame_max, queue, reply_to, accept, mandatory=mandatory)
    got = joined(encoder.frames(cid, expiration, deadline, body))
    assert got == joined(wire.encode_request(2, queue, body, frame_max, reply_to=reply_to, correlation_id=cid,
                                             expiration=expiration, headers=headers, mandatory=mandatory))
    assert got == pika_publish(2, "", queue, body, frame_max, {"reply_to": reply_to, "correlation_id": cid,
                                                                "expiration": expiration, "headers": headers},
                               mandatory)


@pytest.mark.parametrize("bad", [{"reply_to": "x" * 256}, {"headers": {"k": 1.5}}, {"headers": {"k": 2**64}},
                                 {"headers": {"k" * 256: 1}}])
def test_what_amqp_cannot_carry_is_an_encode_error(bad):
    with pytest.raises(wire.EncodeError):
        wire.encode_publish(1, "", "q", b"x", 131072, **bad)


# ------------------------------------------------------------------------------ decoding


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(props=properties(), body=bodies, frame_max=frame_maxes, tag=st.integers(1, 2**64 - 1),
       redelivered=st.booleans(), consumer_tag=shortstr)
def test_decode_delivery_is_pikas_decoding(props, body, frame_max, tag, redelivered, consumer_tag):
    payload = header_payload(len(body), props)
    data = pika_delivery(3, consumer_tag, tag, redelivered, body, frame_max, payload)
    expected = pika_decoded_properties(payload)
    assert not isinstance(expected, Exception)
    got = wire.decode_delivery(b"junk" + data + b"\x08more", 4, 3, consumer_tag.encode())
    assert isinstance(got, wire.Delivery), got
    assert (got.delivery_tag, got.redelivered, got.consumer_tag, got.exchange, got.routing_key) == (
        tag, redelivered, consumer_tag, "ex", "rpc_queue")
    assert got.body == body and type(got.body) is bytes
    assert got.end == 4 + len(data)
    assert got.frames == 2 + (len(body) + frame_max - 9) // (frame_max - 8)
    same_properties(got.properties, expected)
    assert wire.decode_delivery(data, 0, 3, None).delivery_tag == tag  # any consumer tag
    assert wire.decode_delivery(data, 0, 3, b"other") is None  # another consumer's: not ours
    mine = consumer_tag.encode()
    assert wire.decode_delivery(data, 0, 3, (mine + b"x", mine)).delivery_tag == tag  # one of our tags
    assert wire.decode_delivery(data, 0, 3, (mine + b"x", b"\x00" + mine)) is None  # none of them
    assert wire.decode_delivery(data, 0, 4, None) is None  # another channel's
    if body:  # a body over max_body is left to the generic decoder
        assert wire.decode_delivery(data, 0, 3, None, max_body=len(body) - 1) is None
    assert isinstance(wire.decode_delivery(data, 0, 3, None, max_body=len(body)), wire.Delivery)


@settings(max_examples=100)
@given(props=properties(), body=st.binary(max_size=300), frame_max=st.integers(9, 40), data=st.data())
def test_every_prefix_of_a_delivery_is_incomplete(props, body, frame_max, data):
    stream = pika_delivery(1, "c", 1, False, body, frame_max, header_payload(len(body), props))
    cut = data.draw(st.integers(0, len(stream) - 1))
    assert wire.decode_delivery(stream[:cut], 0, 1, b"c") is wire.INCOMPLETE
    assert isinstance(wire.decode_delivery(stream, 0, 1, b"c"), wire.Delivery)
    assert wire.decode_delivery(bytearray(stream), 0, 1, b"c").body == body  # a bytearray buffer too


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(flags=st.integers(0, 0xFFFE), raw=st.binary(max_size=80), reply_to=st.none() | shortstr)
def test_any_properties_payload_decodes_as_pika_or_is_a_bad_delivery(flags, raw, reply_to):
    """Unusual or malformed property bytes: never an exception. A Delivery only when pika decodes the
    same; when pika raises, a BadDelivery."""
    payload = struct.pack(">HxxQH", 60, 2, flags) + raw
    data = pika_delivery(1, "c", 9, True, b"20", 131072, payload)
    got = wire.decode_delivery(data, 0, 1, b"c")
    expected = pika_decoded_properties(payload)
    assert isinstance(got, (wire.Delivery, wire.BadDelivery)), got
    if isinstance(got, wire.Delivery):
        assert not isinstance(expected, Exception)
        same_properties(got.properties, expected)
    else:
        assert got.delivery_tag == 9 and got.redelivered and got.end == len(data)
        assume(isinstance(expected, Exception))


@settings(max_examples=300)
@given(table=tables)
def test_tables_round_trip_through_pika(table):
    from pika import data as pdata

    ours: list = []
    wire.encode_table(ours, table)
    theirs: list = []
    pdata.encode_table(theirs, table)
    encoded = b"".join(ours)
    assert encoded == b"".join(theirs)
    assert wire.decode_table(encoded, 0) == pdata.decode_table(encoded, 0)


@pytest.mark.parametrize("headers, error", [
    (nested_table(5000), RecursionError),
    (struct.pack(">I", 11) + b"\x01kd" + struct.pack(">d", float("nan")), ValueError),  # pika: int(nan)
    (struct.pack(">I", 11) + b"\x01kd" + struct.pack(">d", float("inf")), OverflowError),  # pika: int(inf)
    (struct.pack(">I", 3) + b"\x01kZ", Exception),  # unknown field type (pika: InvalidFieldTypeException)
])
def test_undecodable_properties_give_a_bad_delivery_with_reply_to(headers, error):
    flags = 0x2000 | 0x0400 | 0x0200  # headers, correlation_id, reply_to
    payload = struct.pack(">HxxQH", 60, 2, flags) + headers + b"\x03cid" + b"\x07replies"
    data = pika_delivery(1, "c", 4, False, b"20", 131072, payload)
    assert isinstance(pika_decoded_properties(payload), error)
    got = wire.decode_delivery(data + b"tail", 0, 1, b"c")
    assert isinstance(got, wire.BadDelivery) and isinstance(got.error, error)
    assert (got.delivery_tag, got.reply_to, got.correlation_id, got.end) == (4, "replies", "cid", len(data))


def test_a_corrupt_frame_structure_is_left_to_the_generic_decoder():
    data = bytearray(pika_delivery(1, "c", 1, False, b"20", 131072, header_payload(2, {"reply_to": "q"})))
    data[-1] = 0  # the body frame's frame-end octet
    assert wire.decode_delivery(bytes(data), 0, 1, b"c") is None


@given(tag=st.integers(0, 2**64 - 1), multiple=st.booleans(), channel=st.integers(1, 65535))
def test_decode_ack_reads_pikas_basic_ack(tag, multiple, channel):
    raw = frame.Method(channel, spec.Basic.Ack(delivery_tag=tag, multiple=multiple)).marshal()
    assert wire.decode_ack(raw + b"rest", 0, channel) == (tag, multiple, len(raw))
    assert wire.decode_ack(raw, 0, channel % 65535 + 1) is None  # another channel
    assert wire.decode_ack(raw[:-1], 0, channel) is None  # not whole yet
    nack = frame.Method(channel, spec.Basic.Nack(delivery_tag=tag, multiple=multiple)).marshal()
    assert wire.decode_ack(nack, 0, channel) is None  # nacks go to pika


def test_decimal_and_timestamp_values_decode_as_pika():
    from pika import data as pdata

    table = {"d": decimal.Decimal("-12.345"), "t": datetime(2020, 5, 1, 12, 0, 0), "l": long(5), "n": None}
    encoded: list = []
    wire.encode_table(encoded, table)
    raw = b"".join(encoded)
    assert wire.decode_table(raw, 0) == pdata.decode_table(raw, 0)


def test_the_codec_imports_no_pika():
    code = "import sys, fastfib.wire; print(sorted(m for m in sys.modules if m.split('.')[0] == 'pika'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out
    from fastfib import wire as w

    assert w.IMPLEMENTATION == "python"
