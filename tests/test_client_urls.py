"""Broker URL lists (fastfib.urls) and publisher-confirm bookkeeping (fastfib.rpc_base.Confirms): no broker."""

from __future__ import annotations

import pytest

from fastfib.protocol import DEFAULT_URL
from fastfib.urls import client_urls, describe_failures, endpoint, split_urls

A = "amqp://guest:secret@node-a:5681/%2F"
B = "amqp://guest:secret@node-b:5682/%2F"
C = "amqps://u:p@[::1]/vhost"


@pytest.mark.parametrize("value", [f"{A} {B}", f"{A},{B}", f" {A} ,\t{B} ", [A, B], (A, B), [f"{A} {B}"]])
def test_split_urls(value):
    assert split_urls(value) == [A, B]


@pytest.mark.parametrize("value", ["", "  , ", [], ["", " "]])
def test_split_urls_refuses_an_empty_list(value):
    with pytest.raises(ValueError, match="no broker URL"):
        split_urls(value)


@pytest.mark.parametrize("value", [b"amqp://x", [A, 3], 5])
def test_split_urls_refuses_non_strings(value):
    with pytest.raises(TypeError):
        split_urls(value)


def test_client_urls_reads_the_environment_then_the_default():
    assert client_urls(None, {"FASTFIB_URL": f"{A}, {B}"}) == [A, B]
    assert client_urls(None, {"FASTFIB_URL": "  "}) == [DEFAULT_URL]
    assert client_urls(None, {}) == [DEFAULT_URL]
    assert client_urls(B, {"FASTFIB_URL": A}) == [B]  # an explicit url wins


def test_endpoint():
    assert endpoint(A) == "node-a:5681"
    assert endpoint("amqp://localhost") == "localhost:5672"
    assert endpoint(C) == "[::1]:5671"
    assert endpoint("amqp://h:notaport/") == "<unparsable URL>"


def test_describe_failures_names_each_endpoint_and_masks_passwords():
    inner = ConnectionRefusedError(111, "Connection refused")
    wrapped = RuntimeError(RuntimeError(inner))  # the way pika nests its connection errors
    text = describe_failures([(A, wrapped), (B, OSError(f"cannot reach {B}"))])
    assert text.startswith("node-a:5681 (ConnectionRefusedError: [Errno 111] Connection refused); node-b:5682 (")
    assert "secret" not in text and "guest:***@node-b" in text


def test_confirms_single_multiple_and_unknown_tags():
    from fastfib.rpc_base import Confirms

    c = Confirms()
    for corr in "abcdef":
        c.published(corr)
    assert c.settle(2, multiple=False) == ["b"]
    assert c.settle(4, multiple=True) == ["a", "c", "d"]
    assert c.settle(4, multiple=True) == []
    assert c.settle(99, multiple=False) == []
    assert len(c) == 2
    assert c.settle(6, multiple=True) == ["e", "f"] and len(c) == 0
