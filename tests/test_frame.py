from __future__ import annotations

import numpy as np
import pytest

from lmcache.errors import IntegrityError
from lmcache.keys import CacheKey, KeyScope
from lmcache.serde import frame
from lmcache.serde.frame import decode_frame, encode_header, frame_size, needed_header_bytes, parse_header

KEY = KeyScope.create("m").key(b"\x07" * 32)
OTHER = KeyScope.create("m").key(b"\x08" * 32)


def _frame(payload: bytes, meta: bytes = b"", alignment: int = 64) -> bytearray:
    return bytearray(encode_header(KEY, payload, meta, alignment) + payload)


@pytest.mark.parametrize("size", [0, 1, 1000, 1 << 20])
@pytest.mark.parametrize("alignment", [64, 4096])
def test_round_trip(size: int, alignment: int) -> None:
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    frame = _frame(payload, b"geometry", alignment)
    assert len(frame) == frame_size(KEY, size, b"geometry", alignment)
    header, view = decode_frame(frame, KEY)
    assert header.payload_offset % alignment == 0
    assert bytes(view) == payload and header.meta == b"geometry" and header.key == KEY.to_string()
    assert needed_header_bytes(frame[:48]) <= header.payload_offset


def test_every_single_bit_flip_is_detected() -> None:
    payload = bytes(range(200))
    clean = _frame(payload, b"meta")
    header = parse_header(clean)
    # Flip one bit in every meaningful byte: header fields, key, meta and payload.
    meaningful = [*range(40), *range(48, 48 + len(KEY.to_string()) + 4), *range(header.payload_offset, len(clean))]
    for i in meaningful:
        frame = bytearray(clean)
        frame[i] ^= 0x10
        with pytest.raises(IntegrityError):
            decode_frame(frame, KEY)


def test_truncation_and_wrong_key_are_detected() -> None:
    frame = _frame(b"x" * 100)
    for cut in (0, 10, 47, 60, len(frame) - 1):
        with pytest.raises(IntegrityError):
            decode_frame(frame[:cut], KEY)
    with pytest.raises(IntegrityError):
        decode_frame(frame + b"extra", KEY)
    with pytest.raises(IntegrityError, match="another key"):
        decode_frame(frame, OTHER)
    with pytest.raises(IntegrityError):
        decode_frame(b"not a frame at all, definitely not" * 3, KEY)


@pytest.mark.parametrize("n", [0, 1, 4095, frame.COPY_CHUNK, frame.COPY_CHUNK + 1, 3 * frame.COPY_CHUNK - 7])
def test_copy_with_checksum_copies_and_matches_the_one_pass_checksum(n: int) -> None:
    src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    dst = np.zeros(n, dtype=np.uint8)
    got = frame.copy_with_checksum(dst, src)
    assert dst.tobytes() == src.tobytes()
    assert got == frame.payload_checksum(src.tobytes())


def test_copy_with_checksum_refuses_a_length_mismatch() -> None:
    with pytest.raises(ValueError):
        frame.copy_with_checksum(np.zeros(10, dtype=np.uint8), np.zeros(11, dtype=np.uint8))


def test_a_precomputed_checksum_makes_the_same_header_and_is_verified() -> None:
    key = CacheKey("m", 1, 0, bytes(32), "float16")
    payload = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)
    head = frame.encode_header(key, payload, checksum=frame.payload_checksum(payload))
    assert head == frame.encode_header(key, payload.tobytes())
    header = frame.parse_header(head, key)
    header.verify_checksum(frame.payload_checksum(payload))
    with pytest.raises(IntegrityError):
        header.verify_checksum(frame.payload_checksum(payload) ^ 1)


def test_a_key_too_long_for_the_frame_is_an_invalid_argument() -> None:
    from lmcache.errors import InvalidArgumentError
    from lmcache.keys import MAX_KEY_BYTES

    long_key = KeyScope.create("m" * MAX_KEY_BYTES).key(b"\x07" * 32)
    with pytest.raises(InvalidArgumentError, match="65535"):
        encode_header(long_key, b"payload")
    # The longest key that fits still round-trips.
    fixed = len(KEY.to_string()) - 1
    edge = KeyScope.create("m" * (MAX_KEY_BYTES - fixed)).key(b"\x07" * 32)
    assert len(edge.to_string()) == MAX_KEY_BYTES
    header, view = decode_frame(encode_header(edge, b"p") + b"p", edge)
    assert bytes(view) == b"p" and header.key == edge.to_string()
