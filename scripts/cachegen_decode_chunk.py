"""One SmolLM2 chunk's cachegen decode, timed whole and in parts (issue 21, stop 22).

Encodes the first 256-token chunk of a real document's SmolLM2-135M KV (``[30, 2, 256, 3, 64]``
bfloat16, 5.9 MB) with ``cachegen`` and decodes it repeatedly with ``decode_value`` on this
thread, timed in thread CPU time (GB per second of one core, of the 16-bit chunk), with a
memcpy of the chunk for reference. Where the working tree's decoder has them, the parts are
timed too: parsing the body, and the C loop alone at each SIMD level (scalar, AVX-512 with
``vpgatherdd``, AVX-512 with scalar-load table fetches) for bfloat16, float32 and symbols.

Only ``decode_value`` is used for the whole figure, so the same script times an older checkout
(run it from that checkout's root: ``python -m``'s path puts the checkout first).

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/cachegen_decode_chunk.py [--repeat 30]``.
Figures: docs/codecs.md (stop 22).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch


def _median_s(fn: Callable[[], object], repeat: int) -> float:
    """Median thread CPU seconds of ``fn`` over ``repeat`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return float(np.median(times))


def main() -> None:
    """Encode the chunk, then print the decode figures (one line each)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="timed runs per figure (median)")
    args = parser.parse_args()

    from lmcache.bench import codec as bc
    from lmcache.bench.realmodel import real_documents
    from lmcache.serde import cachegen
    from lmcache.serde.codec import ChunkGeometry, decode_value, encode_value, make_codec, parse_codec_header

    torch.set_num_threads(1)
    model, tok = bc._load_smollm2()
    kv = bc._kv_of(model, real_documents(tok, 1, 1024)[0])
    layers, parts, _tokens, heads, dim = kv.shape
    g = ChunkGeometry(layers, parts, 256, heads, dim, "bfloat16")
    raw = bc._chunks(kv, 256)[0]
    codec = make_codec(bc.parse_spec("cachegen"), owner="scripts/cachegen_decode_chunk.py")
    enc = bytes(encode_value(codec, memoryview(raw), g))
    header = parse_codec_header(memoryview(enc))
    out = bytearray(g.nbytes)
    src, dst = np.frombuffer(raw, dtype=np.uint8), np.empty(len(raw), dtype=np.uint8)

    def row(name: str, seconds: float) -> None:
        print(f"{name:34s} {seconds * 1e6:9.0f} us  {g.nbytes / seconds / 1e9:6.2f} GB/s")

    print(f"chunk {list(g.shape)} {g.dtype}: {g.nbytes} bytes, encoded {len(enc)} ({g.nbytes / len(enc):.2f}x)")
    row(
        "decode_value (whole decode)",
        _median_s(lambda: decode_value(memoryview(enc), memoryview(out), header, codec), args.repeat),
    )
    row("memcpy", _median_s(lambda: np.copyto(dst, src), args.repeat))
    body = memoryview(enc)[header.body_offset :]
    row("  parse_body", _median_s(lambda: cachegen.parse_body(body, g, header.body_version), args.repeat))
    from lmcache.serde import cachegen_native as cn

    lib = cn.library()
    levels = getattr(cn, "SIMD_LEVELS", None)
    if lib is None or levels is None:
        return  # an older decoder: the whole figure only
    p = cachegen.parse_body(body, g, header.body_version)
    for kind, dtype, name in (
        (cn.OUT_BF16, np.uint16, "bf16"),
        (cn.OUT_F32, np.float32, "f32"),
        (cn.OUT_SYMBOLS, np.uint8, "symbols"),
    ):
        buf = np.empty(g.numel, dtype=dtype)
        for simd in levels:
            reps = args.repeat if simd else max(2, args.repeat // 10)
            row(
                f"  C loop {name}, simd level {simd}",
                _median_s(lambda k=kind, b=buf, s=simd: cachegen._c_decode(lib, p, k, b, simd=s), reps),
            )


if __name__ == "__main__":
    main()
