from __future__ import annotations

import numpy as np
import pytest

from lmcache.errors import IntegrityError
from lmcache.keys import KeyScope
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
