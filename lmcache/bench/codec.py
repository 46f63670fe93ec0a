"""``lmcache bench codec``: size, speed and model quality of each KV codec on real KV.

KV comes from real models: SmolLM2-135M-Instruct (:mod:`lmcache.bench.realmodel`) over documents
of real English text, and the random ~125M Llama of the QA workloads (for size and speed; its
"quality" is reported too but means little). The KV is taken in bfloat16 (the 16-bit baseline)
in the chunk format and cut into chunks of ``--chunk-size`` tokens. Per codec:

* **ratio**: 16-bit bytes of the KV over the bytes stored (codec header included);
* **encode/decode GB/s** on one thread (torch and numpy at one thread; GB of 16-bit KV per
  second), against a same-run memcpy of the same chunks;
* **quality** (SmolLM2): the document's KV is loaded through the codec (encode, decode), then
  the model reads a question of ``--question-tokens`` real-text tokens and 32 greedy decode
  steps (the tokens raw KV produced, teacher-forced); at each of those positions the next-token
  distribution is compared with the one from raw bf16 KV: mean KL(raw || codec) and the share of
  positions whose top-1 token agrees.

The table, a JSON file and a PNG (ratio against mean KL per codec) are written. Not measured
here: warm TTFT of ``long-doc-qa`` from a real ``redis://`` tier per codec (see docs/codecs.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmcache.bench import positive_int, report
from lmcache.errors import ConfigError, MissingDependencyError

__all__ = ["DEFAULT_CODECS", "DESCRIPTION", "add_parser", "bench_codecs", "parse_spec", "run_cli"]

DESCRIPTION = "KV codecs: compression ratio, encode/decode GB/s vs memcpy, model quality (KL, top-1) vs raw"

#: Codec specs measured by default: ``name`` or ``name?option=value&…``.
DEFAULT_CODECS = (
    "raw",
    "zstd",
    "zstd?codec_shuffle=false",
    "lz4",
    "lz4?codec_shuffle=false",
    "fp8",
    "int8",
    "int4",
    "cachegen",
    "cachegen?codec_bits=5",
    "cachegen?codec_bits=3",
    "cachegen?codec_anchor=16",
)


def parse_spec(spec: str) -> dict[str, str]:
    """``"zstd?codec_level=9"`` → ``{"codec": "zstd", "codec_level": "9"}``."""
    name, _, query = spec.partition("?")
    opts = {"codec": name}
    for part in filter(None, query.split("&")):
        k, sep, v = part.partition("=")
        if not sep:
            raise ConfigError(f"codec spec {spec!r}: option {part!r} has no value")
        opts[k if k.startswith("codec_") else f"codec_{k}"] = v
    return opts


def _load_smollm2() -> tuple[Any, Any]:
    import torch
    import transformers

    from lmcache.bench.realmodel import smollm2_checkpoint

    path = smollm2_checkpoint()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok


def _kv_of(model: Any, ids: list[int]) -> Any:
    """bf16 KV of ``ids``: a tensor ``[layers, 2, tokens, heads, dim]``."""
    import torch

    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    per_layer = [torch.stack([layer.keys[0], layer.values[0]]).permute(0, 2, 1, 3) for layer in cache.layers]
    return torch.stack(per_layer).to(torch.bfloat16).contiguous()


def _chunks(kv: Any, chunk: int) -> list[bytes]:
    import torch

    out = []
    for start in range(0, kv.shape[2] - chunk + 1, chunk):
        out.append(kv[:, :, start : start + chunk].contiguous().view(torch.int16).numpy().tobytes())
    return out


def _from_chunks(chunks: list[bytes], shape: tuple[int, ...]) -> Any:
    import torch

    L, P, _, H, D = shape
    parts = [
        torch.frombuffer(bytearray(c), dtype=torch.bfloat16).view(L, P, -1, H, D) for c in chunks
    ]  # bytearray: a writable copy
    return torch.cat(parts, dim=2)


def _cache(model: Any, kv: Any) -> Any:
    from transformers import DynamicCache

    x = kv.float()
    data = [
        (x[i, 0].permute(1, 0, 2)[None].contiguous(), x[i, 1].permute(1, 0, 2)[None].contiguous())
        for i in range(x.shape[0])
    ]
    return DynamicCache(ddp_cache_data=data, config=model.config)


def _continuation_logits(model: Any, kv: Any, tokens: list[int]) -> Any:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([tokens]), past_key_values=_cache(model, kv), use_cache=True)
    return out.logits[0].float()


def _greedy(model: Any, kv: Any, question: list[int], steps: int) -> list[int]:
    import torch

    cache = _cache(model, kv)
    with torch.no_grad():
        out = model(torch.tensor([question]), past_key_values=cache, use_cache=True)
        toks: list[int] = []
        for _ in range(steps):
            nxt = int(out.logits[0, -1].argmax())
            toks.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return toks


def _round_trip(codec: Any, chunks: list[bytes], g: Any) -> tuple[list[bytes], int]:
    from lmcache.serde.codec import decode_value, encode_value

    out, stored = [], 0
    for c in chunks:
        enc = encode_value(codec, memoryview(c), g)
        stored += len(enc)
        if enc is not None and bytes(enc[:4]) == b"LMCC":
            buf = bytearray(len(c))
            decode_value(memoryview(bytes(enc)), memoryview(buf), None, codec)
            out.append(bytes(buf))
        else:
            out.append(bytes(enc))
    return out, stored


def _speed(codec: Any, chunks: list[bytes], g: Any, repeat: int) -> dict[str, float | None]:
    """Median seconds to encode and to decode all chunks, and to memcpy them (one thread)."""
    from lmcache.serde.codec import decode_value, encode_value, parse_codec_header

    encoded = [encode_value(codec, memoryview(c), g) for c in chunks]
    outs = [bytearray(len(c)) for c in chunks]
    srcs = [np.frombuffer(c, dtype=np.uint8) for c in chunks]
    dsts = [np.frombuffer(o, dtype=np.uint8) for o in outs]
    enc_t, dec_t, cpy_t = [], [], []
    for _ in range(repeat):
        t = time.perf_counter()
        for c in chunks:
            encode_value(codec, memoryview(c), g)
        enc_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        for e, o in zip(encoded, outs, strict=True):
            h = parse_codec_header(e)
            if h is not None:
                decode_value(memoryview(e), memoryview(o), h, codec)
            else:
                memoryview(o)[:] = e
        dec_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        for s, d in zip(srcs, dsts, strict=True):
            np.copyto(d, s)
        cpy_t.append(time.perf_counter() - t)
    nbytes = sum(len(c) for c in chunks)
    enc, dec, cpy = report.median(enc_t), report.median(dec_t), report.median(cpy_t)
    return {
        "encode_gbps": nbytes / enc / 1e9 if enc else None,
        "decode_gbps": nbytes / dec / 1e9 if dec else None,
        "memcpy_gbps": nbytes / cpy / 1e9 if cpy else None,
    }


def _quality(model: Any, raw_kv: Any, decoded_kv: Any, tokens: list[int], ref_logits: Any) -> tuple[float, float]:
    import torch

    logits = _continuation_logits(model, decoded_kv, tokens)
    lp_ref = torch.log_softmax(ref_logits, dim=-1)
    lp = torch.log_softmax(logits, dim=-1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(dim=-1)
    agree = (ref_logits.argmax(dim=-1) == logits.argmax(dim=-1)).float()
    return float(kl.mean()), float(agree.mean())


def bench_codecs(
    codecs: list[str],
    *,
    docs: int = 2,
    doc_tokens: int = 1024,
    question_tokens: int = 32,
    decode_steps: int = 32,
    chunk_size: int = 256,
    repeat: int = 3,
    models: tuple[str, ...] = ("smollm2", "random-125m"),
    progress: bool = True,
) -> dict[str, Any]:
    """Measure each codec spec on KV of each model; returns the JSON-ready result."""
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("torch", "torch", "lmcache bench codec") from exc
    from lmcache.bench.realmodel import real_documents
    from lmcache.serde.codec import ChunkGeometry, make_codec

    torch.set_num_threads(1)  # per-core speed; and logits that do not depend on the load
    made = {spec: make_codec(parse_spec(spec), owner=f"--codec {spec}") for spec in codecs}
    results: dict[str, Any] = {"models": {}, "codecs": list(codecs)}
    for model_name in models:
        if model_name == "smollm2":
            model, tok = _load_smollm2()
            texts = real_documents(tok, docs * 2, doc_tokens)
            doc_ids = texts[:docs]
            questions = [t[:question_tokens] for t in texts[docs:]]
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            from lmcache.bench.qa.common import DEFAULT_MODEL

            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**DEFAULT_MODEL)).eval()
            rng = np.random.default_rng(0)
            doc_ids = [rng.integers(0, DEFAULT_MODEL["vocab_size"], doc_tokens).tolist() for _ in range(docs)]
            questions = [rng.integers(0, DEFAULT_MODEL["vocab_size"], question_tokens).tolist() for _ in range(docs)]
        per_codec: dict[str, dict[str, Any]] = {
            s: {"raw_bytes": 0, "stored_bytes": 0, "kl": [], "top1": [], "speed": []} for s in codecs
        }
        geometry = None
        for d, (ids, question) in enumerate(zip(doc_ids, questions, strict=True)):
            if progress:
                print(f"[{model_name}] document {d + 1}/{len(doc_ids)}: {len(ids)} tokens", flush=True)
            kv = _kv_of(model, ids)
            L, P, _T, H, D = kv.shape
            geometry = ChunkGeometry(L, P, chunk_size, H, D, "bfloat16")
            chunks = _chunks(kv, chunk_size)
            raw_kv = _from_chunks(chunks, tuple(kv.shape))
            greedy = _greedy(model, raw_kv, question, decode_steps)
            tokens = question + greedy
            ref_logits = _continuation_logits(model, raw_kv, tokens)
            for spec, codec in made.items():
                decoded, stored = _round_trip(codec, chunks, geometry)
                row = per_codec[spec]
                row["raw_bytes"] += sum(len(c) for c in chunks)
                row["stored_bytes"] += stored
                kl, top1 = _quality(model, raw_kv, _from_chunks(decoded, tuple(kv.shape)), tokens, ref_logits)
                row["kl"].append(kl)
                row["top1"].append(top1)
                if d == 0:
                    row["speed"].append(_speed(codec, chunks, geometry, repeat))
        rows = {}
        for spec, row in per_codec.items():
            speed = row["speed"][0] if row["speed"] else {}
            rows[spec] = {
                "ratio": row["raw_bytes"] / max(1, row["stored_bytes"]),
                "bits_per_value": 16 * row["stored_bytes"] / max(1, row["raw_bytes"]),
                "mean_kl": float(np.mean(row["kl"])),
                "top1_agreement": float(np.mean(row["top1"])),
                **speed,
                "decode_vs_memcpy": (speed.get("decode_gbps") or 0) / (speed.get("memcpy_gbps") or 1),
            }
            if spec.startswith("cachegen") and geometry is not None:
                from lmcache.serde.cachegen import DEFAULT_BITS, layer_bits

                opts = made[spec].settings
                rows[spec]["layer_bits_plan"] = layer_bits(geometry.layers, opts.codec_bits or DEFAULT_BITS)
        results["models"][model_name] = {
            "geometry": None if geometry is None else list(geometry.shape),
            "docs": len(doc_ids),
            "doc_tokens": doc_tokens,
            "question_tokens": question_tokens,
            "decode_steps": decode_steps,
            "codecs": rows,
        }
    return results


def print_table(result: dict[str, Any]) -> None:
    """One table per model."""
    for model_name, m in result["models"].items():
        rows = []
        for spec, r in m["codecs"].items():
            rows.append(
                [
                    spec,
                    report.format_float(r["ratio"]),
                    report.format_float(r["bits_per_value"]),
                    report.format_float(r.get("encode_gbps"), 3),
                    report.format_float(r.get("decode_gbps"), 3),
                    report.format_float(r.get("memcpy_gbps"), 2),
                    f"{r['mean_kl']:.5f}",
                    f"{100 * r['top1_agreement']:.1f}%",
                ]
            )
        headers = ["codec", "ratio", "bits/value", "enc GB/s", "dec GB/s", "memcpy GB/s", "mean KL", "top-1"]
        print(report.render_table(headers, rows, title=f"{model_name}: KV {m['geometry']}, {m['docs']} docs"))


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Ratio against mean KL per codec (one series per model); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for model_name, m in result["models"].items():
        xs = [max(r["mean_kl"], 1e-7) for r in m["codecs"].values()]
        ys = [r["ratio"] for r in m["codecs"].values()]
        ax.scatter(xs, ys, label=model_name)
        for spec, x, y in zip(m["codecs"], xs, ys, strict=True):
            ax.annotate(spec, (x, y), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("mean KL of next-token distribution vs raw (log)")
    ax.set_ylabel("compression ratio vs 16-bit")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench codec``."""
    p = subparsers.add_parser("codec", help=DESCRIPTION, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--codec",
        action="append",
        default=None,
        help="codec spec, repeatable: name or name?option=value (default: every built-in and variants)",
    )
    p.add_argument("--docs", type=positive_int, default=2, help="documents per model (default 2)")
    p.add_argument("--doc-tokens", type=positive_int, default=1024, help="tokens per document (default 1024)")
    p.add_argument("--question-tokens", type=positive_int, default=32, help="question tokens (default 32)")
    p.add_argument("--decode-steps", type=positive_int, default=32, help="greedy decode steps compared (default 32)")
    p.add_argument("--chunk-size", type=positive_int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--repeat", type=positive_int, default=3, help="speed rounds, median reported (default 3)")
    p.add_argument(
        "--model", action="append", choices=("smollm2", "random-125m"), default=None, help="KV source (default both)"
    )
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write results here (default bench-results/…)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of ratio vs KL (default beside the JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``bench codec`` from parsed arguments."""
    codecs = args.codec or list(DEFAULT_CODECS)
    if "raw" not in codecs:
        codecs = ["raw", *codecs]
    result = bench_codecs(
        codecs,
        docs=args.docs,
        doc_tokens=args.doc_tokens,
        question_tokens=args.question_tokens,
        decode_steps=args.decode_steps,
        chunk_size=args.chunk_size,
        repeat=args.repeat,
        models=tuple(args.model or ("smollm2", "random-125m")),
        progress=not args.no_progress,
    )
    result["machine"] = report.machine_info()
    print_table(result)
    path = report.write_json(args.json_path or report.default_json_path("codec", "kv"), result)
    print(f"results: {path}")
    png = plot(result, args.plot or path.with_suffix(".png"))
    if png is not None:
        print(f"plot: {png}")
    return 0
