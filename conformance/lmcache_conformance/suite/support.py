"""What every conformance mixin uses: fresh keys and values, buffers of each kind, byte checks.

Nothing here is a test. Keys come from :func:`random_key`, which also records them for the
current test so the suite can delete what a test stored on a shared or persistent backend.

This module may import only ``lmcache``'s public contract (keys) and the suite's own test
dependencies (pytest, numpy; torch and hypothesis when installed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from lmcache.keys import CacheKey

__all__ = [
    "DEST_KINDS",
    "SCOPE_VARIANTS",
    "SENTINEL",
    "SOURCE_KINDS",
    "dest_bytes",
    "expect_bytes",
    "make_dest",
    "make_source",
    "random_key",
    "random_value",
    "scoped_key",
    "untouched",
]

KiB = 1 << 10
MiB = 1 << 20

#: Byte that destination buffers are filled with, to see what a call wrote.
SENTINEL = 0xA5

#: Kinds of source buffer :func:`make_source` makes.
SOURCE_KINDS = ("bytes", "bytearray", "memoryview", "numpy", "torch")
#: Kinds of destination buffer :func:`make_dest` makes.
DEST_KINDS = ("bytearray", "memoryview", "numpy", "torch")
# Sizes by name, resolved against the class attributes at run time so subclasses can tune them.
SIZES: dict[str, int | str] = {"empty": 0, "one_byte": 1, "kv_chunk": "large_value_bytes", "odd": "odd_value_bytes"}

#: Each way a key's scope can differ while its chunk hash stays the same: every one of them must
#: name another value (rule 9 of the house plan: tenants never see each other's KV).
SCOPE_VARIANTS: dict[str, Callable[[CacheKey], CacheKey]] = {
    "model": lambda k: dataclasses.replace(k, model=k.model + "-other-model"),
    "world_size": lambda k: dataclasses.replace(k, world_size=k.world_size * 2),
    "rank": lambda k: dataclasses.replace(k, rank=k.rank + 1),
    "dtype": lambda k: dataclasses.replace(k, dtype="bfloat16"),
    "tag_value": lambda k: dataclasses.replace(k, tags=(("tenant", "tenant-b"),)),
    "tag_name": lambda k: dataclasses.replace(k, tags=(("team", "tenant-a"),)),
    "no_tags": lambda k: dataclasses.replace(k, tags=()),
    "extra_tag": lambda k: dataclasses.replace(k, tags=(("lora", "adapter-1"), ("tenant", "tenant-a"))),
}

# Keys handed out by random_key() during the current suite test (one list while a test runs,
# none outside), so the suite can delete what a test stored from a shared or persistent backend.
issued_keys: list[list[CacheKey]] = []


def random_key(tag: str = "") -> CacheKey:
    """A fresh key nobody else holds (32 random bytes of hash)."""
    key = CacheKey(f"lmcache-conformance{('/' + tag) if tag else ''}", 1, 0, os.urandom(32), "uint8")
    if issued_keys:
        issued_keys[-1].append(key)
    return key


def scoped_key() -> CacheKey:
    """A fresh key with a non-trivial scope (world size 2, rank 0, float16, tenant tag)."""
    base = random_key("scope")
    key = dataclasses.replace(base, world_size=2, dtype="float16", tags=(("tenant", "tenant-a"),))
    if issued_keys:
        issued_keys[-1].append(key)
        issued_keys[-1].extend(variant(key) for variant in SCOPE_VARIANTS.values())
    return key


def random_value(n: int, rng: np.random.Generator | None = None) -> bytes:
    """``n`` random bytes (fast for MiB sizes)."""
    return (rng or np.random.default_rng()).bytes(n)


def import_torch() -> Any:
    """``torch``, or skip the test with the install command."""
    return pytest.importorskip("torch", reason="torch is not installed (pip install torch)")


def make_source(kind: str, data: bytes) -> Any:
    """``data`` as a source buffer of ``kind`` (bytes, bytearray, memoryview, numpy, torch)."""
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        # A view into the middle of a larger buffer: backends must honour its offset and length.
        parent = bytearray(b"\x00" * 7 + data + b"\x00" * 9)
        return memoryview(parent)[7 : 7 + len(data)]
    if kind == "numpy":
        arr = np.frombuffer(data, dtype=np.uint8).copy()
        # A realistic KV chunk is a half-precision array; a byte-sized one covers odd lengths.
        return arr.view(np.float16).reshape(2, -1) if len(data) % 4 == 0 and data else arr
    if kind == "torch":
        torch = import_torch()
        t = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        return t.view(torch.float16) if len(data) % 2 == 0 and data else t
    raise ValueError(f"unknown source kind {kind!r}")


def make_dest(kind: str, n: int) -> Any:
    """A writable destination of ``n`` bytes of ``kind``, filled with :data:`SENTINEL`."""
    if kind == "bytearray":
        return bytearray([SENTINEL]) * n
    if kind == "memoryview":
        parent = bytearray([SENTINEL]) * (n + 16)
        return memoryview(parent)[8 : 8 + n]
    if kind == "numpy":
        return np.full(n, SENTINEL, dtype=np.uint8)
    if kind == "torch":
        torch = import_torch()
        return torch.full((n,), SENTINEL, dtype=torch.uint8)
    raise ValueError(f"unknown destination kind {kind!r}")


def dest_bytes(dst: Any) -> bytes:
    """The current contents of a destination made by :func:`make_dest` (or a numpy array)."""
    if hasattr(dst, "data_ptr") and hasattr(dst, "numpy"):
        return dst.numpy().tobytes()
    return bytes(memoryview(dst).cast("B"))


def untouched(data: bytes) -> bool:
    """Whether ``data`` still holds only :data:`SENTINEL` bytes (nothing wrote into it)."""
    return data.count(SENTINEL) == len(data)


def expect_bytes(got: bytes | bytearray | None, want: bytes | bytearray, what: str = "wrong bytes") -> None:
    """Fail with a short description unless ``got`` equals ``want``.

    A plain ``assert got == want`` on megabyte values makes pytest build a full difflib diff
    of their reprs when it fails, which is quadratic and runs for minutes (pytest skips
    truncating that diff when the ``CI`` environment variable is set). This says where the
    bytes first differ instead.
    """
    if got == want:
        return
    if got is None:
        raise AssertionError(f"{what}: got a miss (None), expected {len(want)} bytes")
    if len(got) != len(want):
        raise AssertionError(f"{what}: got {len(got)} bytes, expected {len(want)}")
    at = int(np.flatnonzero(np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8))[0])
    raise AssertionError(f"{what}: {len(want)} bytes, differing from byte {at} (0x{got[at]:02x} != 0x{want[at]:02x})")


@contextlib.contextmanager
def private_hypothesis_home() -> Iterator[None]:
    """Point Hypothesis's storage (its cache of source constants) at a temporary folder.

    ``database=None`` is not enough: Hypothesis still writes ``.hypothesis/constants/`` into the
    working directory, which would litter a user's project in zero-code mode. Where that folder
    exists already, it is used as it is.
    """
    try:
        from hypothesis import configuration
    except ImportError:  # pragma: no cover - the caller skipped already
        yield
        return
    set_home = getattr(configuration, "set_hypothesis_home_dir", None)
    current = getattr(configuration, "storage_directory", None)
    if set_home is None or current is None:  # an older Hypothesis: leave it alone
        yield
        return
    previous = getattr(current(intent_to_write=False), "home_directory", None)
    if previous is None or previous.exists():
        # The project keeps a Hypothesis folder already: using it adds nothing new, and its
        # cache saves re-reading every local module's source on each run.
        yield
        return
    with tempfile.TemporaryDirectory(prefix="lmcache-conformance-hypothesis-") as home:
        set_home(home)
        try:
            yield
        finally:
            set_home(previous)
