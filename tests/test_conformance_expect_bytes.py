"""``expect_bytes``: the conformance suite's byte comparison says where values differ, briefly."""

from __future__ import annotations

import pytest
from lmcache_conformance import expect_bytes

MiB = 1 << 20


def test_equal_values_pass() -> None:
    expect_bytes(b"abc", b"abc")
    expect_bytes(bytearray(b"abc"), b"abc")


def test_a_miss_is_named() -> None:
    with pytest.raises(AssertionError, match=r"read back: got a miss \(None\), expected 3 bytes"):
        expect_bytes(None, b"abc", "read back")


def test_a_length_mismatch_is_named() -> None:
    with pytest.raises(AssertionError, match="got 2 bytes, expected 3"):
        expect_bytes(b"ab", b"abc")


def test_the_first_differing_byte_is_named_and_the_message_stays_short() -> None:
    want = bytes(2 * MiB)
    got = bytearray(want)
    got[1_500_000] = 0xCD
    got[1_900_000] = 0x01
    with pytest.raises(AssertionError) as info:
        expect_bytes(bytes(got), want, "dst 0")
    message = str(info.value)
    assert message == "dst 0: 2097152 bytes, differing from byte 1500000 (0xcd != 0x00)"
