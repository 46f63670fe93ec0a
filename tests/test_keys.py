from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmcache.errors import InvalidArgumentError
from lmcache.keys import CacheKey, ChunkHasher, KeyScope

_SCRIPT = """
import sys
from lmcache.keys import ChunkHasher, KeyScope
tokens = list(range(1000, 1000 + 1300))
hasher = ChunkHasher(chunk_size=256, save_partial_chunks=True)
for key in hasher.keys(tokens, KeyScope.create("m", tags={"tenant": "a"})):
    print(key.to_string())
"""


def _keys_in_subprocess(seed: str) -> list[str]:
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_keys_identical_across_processes_with_different_hash_seeds() -> None:
    a = _keys_in_subprocess("1")
    b = _keys_in_subprocess("12345")
    assert len(a) == 6  # five full chunks and the partial tail
    assert a == b
    here = [
        k.to_string()
        for k in ChunkHasher(256, save_partial_chunks=True).keys(
            list(range(1000, 2300)), KeyScope.create("m", tags={"tenant": "a"})
        )
    ]
    assert here == a


def test_chained_hashes_depend_on_the_whole_prefix() -> None:
    h = ChunkHasher(chunk_size=4)
    a = h.hashes([1, 2, 3, 4, 5, 6, 7, 8])
    b = h.hashes([9, 2, 3, 4, 5, 6, 7, 8])
    assert a[0] != b[0]
    assert a[1] != b[1]  # same tokens in chunk 2, different prefix
    assert h.hashes([1, 2, 3, 4]) == a[:1]  # a prefix of the sequence shares its chunk hashes


def test_partial_tail_is_configurable() -> None:
    tokens = list(range(10))
    assert [(c.start, c.end) for c in ChunkHasher(4).chunks(tokens)] == [(0, 4), (4, 8)]
    chunks = ChunkHasher(4, save_partial_chunks=True).chunks(tokens)
    assert [(c.start, c.end) for c in chunks] == [(0, 4), (4, 8), (8, 10)]
    # A full chunk's hash is the same whether or not partial chunks are kept.
    assert chunks[1].hash == ChunkHasher(4).chunks(tokens)[1].hash


def test_seed_and_extra_change_hashes() -> None:
    tokens = list(range(8))
    assert ChunkHasher(4, seed="a").hashes(tokens) != ChunkHasher(4, seed="b").hashes(tokens)
    assert ChunkHasher(4, extra=b"x").hashes(tokens) != ChunkHasher(4).hashes(tokens)


@pytest.mark.parametrize(
    "tokens",
    [
        list(range(600)),
        np.arange(600, dtype=np.int32),
        np.arange(600, dtype=np.uint16),
        torch.arange(600, dtype=torch.int64),
        torch.arange(600, dtype=torch.int32),
        tuple(range(600)),
    ],
)
def test_token_containers_hash_alike(tokens: object) -> None:
    assert ChunkHasher(256).hashes(tokens) == ChunkHasher(256).hashes(list(range(600)))


@pytest.mark.parametrize(
    "bad",
    [
        [1.0, 2.0],
        np.array([1.5, 2.5]),
        torch.tensor([1.0, 2.0]),
        [[1, 2], [3, 4]],
        [-1, 2],
        "hello",
        [True, False],
        12,
    ],
)
def test_bad_tokens_are_typed_errors(bad: object) -> None:
    with pytest.raises(InvalidArgumentError):
        ChunkHasher(4).chunks(bad)


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_chunk_size(size: object) -> None:
    with pytest.raises(InvalidArgumentError):
        ChunkHasher(size)  # type: ignore[arg-type]


def test_empty_tokens() -> None:
    assert ChunkHasher(4, save_partial_chunks=True).chunks([]) == []


def test_cache_key_string_round_trip_and_isolation() -> None:
    scope = KeyScope.create("org/model@v1 x", world_size=2, rank=1, dtype="bfloat16", tags={"lora": "a/b", "t": "1"})
    key = scope.key(b"\x01" * 32)
    text = key.to_string()
    assert "/" not in text and " " not in text
    assert CacheKey.from_string(text) == key
    assert len(key.digest()) == 40
    other = KeyScope.create("org/model@v1 x", world_size=2, rank=1, dtype="bfloat16", tags={"lora": "c"}).key(
        b"\x01" * 32
    )
    assert other != key and other.to_string() != text and other.digest() != key.digest()
    # Tag order does not matter.
    assert KeyScope.create("m", tags={"a": "1", "b": "2"}) == KeyScope.create("m", tags={"b": "2", "a": "1"})


@pytest.mark.parametrize("text", ["", "a@b", "m@1@0@f16@zz", "m@x@0@f16@" + "00" * 32])
def test_bad_key_strings(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        CacheKey.from_string(text)


def test_cache_key_validation() -> None:
    with pytest.raises(InvalidArgumentError):
        CacheKey("m", 1, 0, b"short", "float16")
    with pytest.raises(InvalidArgumentError):
        CacheKey("m", 2, 2, b"\0" * 32, "float16")
    with pytest.raises(InvalidArgumentError):
        CacheKey("", 1, 0, b"\0" * 32, "float16")
