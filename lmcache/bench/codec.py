"""``lmcache bench codec``: size, speed and model quality of each KV codec on real KV.

KV comes from real models: SmolLM2-135M-Instruct (:mod:`lmcache.bench.realmodel`) over documents
of real English text, and the random ~125M Llama of the QA workloads (for size and speed; its
"quality" is reported too but means little). The KV is taken in bfloat16 (the 16-bit baseline)
in the chunk format and cut into chunks of ``--chunk-size`` tokens. Per codec:

* **ratio**: 16-bit bytes of the KV over the bytes stored (codec header included);
* **encode/decode GB/s** on one thread (torch and numpy at one thread; GB of 16-bit KV per
  second of that thread's CPU time, i.e. per core, so other jobs on the host do not halve it;
  wall-clock figures are in the JSON), against a same-run memcpy of the same chunks;
* **quality** (SmolLM2): the document's KV is loaded through the codec (encode, decode), then
  the model reads a question of ``--question-tokens`` real-text tokens and 32 greedy decode
  steps (the tokens raw KV produced, teacher-forced); at each of those positions the next-token
  distribution is compared with the one from raw bf16 KV: mean KL(raw || codec) and the share of
  positions whose top-1 token agrees (also counting only flips where raw's top-1 led by at least
  :data:`DECISIVE_LEAD` logits; the JSON lists raw's lead at every flip).

With ``--e2e-redis URL`` (``auto``: a throwaway local ``redis-server``), the end-to-end rows
too (:func:`bench_e2e`): warm TTFT of long-doc-qa prompts (a document, then a question) with the
KV on that Redis tier alone, per codec, against ``raw`` in the same run.

The tables, a JSON file and a PNG (ratio against mean KL per codec) are written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmcache.backends.urls import redact_url
from lmcache.bench import non_negative_int, positive_int, report
from lmcache.errors import ConfigError, MissingDependencyError

__all__ = [
    "DEFAULT_CODECS",
    "DESCRIPTION",
    "E2E_CODECS",
    "add_parser",
    "bench_codecs",
    "bench_e2e",
    "read_trace_summary",
    "local_redis",
    "parse_spec",
    "run_cli",
    "tier_url",
]

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


#: A top-1 flip where raw's top-1 token leads its second by less than this (logits) is a near-tie.
DECISIVE_LEAD = 0.1

#: Codecs of the end-to-end rows by default (``--e2e-redis``).
E2E_CODECS = ("raw", "zstd", "lz4", "fp8", "int8", "int4", "cachegen")


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


def _random_model_prompts(
    n_questions: int, docs: int, doc_tokens: int, question_tokens: int
) -> tuple[Any, list[list[int]], list[list[int]]]:
    """The random ~125M Llama of the QA workloads, ``docs`` random documents and ``n_questions`` questions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmcache.bench.qa.common import DEFAULT_MODEL

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**DEFAULT_MODEL)).eval()
    rng = np.random.default_rng(0)
    vocab = DEFAULT_MODEL["vocab_size"]
    doc_ids = [rng.integers(0, vocab, doc_tokens).tolist() for _ in range(docs)]
    questions = [rng.integers(0, vocab, question_tokens).tolist() for _ in range(n_questions)]
    return model, doc_ids, questions


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
    """GB/s (of 16-bit KV) to encode, decode and memcpy all chunks on one thread.

    Timed in this thread's CPU time (``time.thread_time``): GB per second *of one core*, which a
    host shared with other jobs does not halve the way it halves wall-clock figures (those are
    reported too, as ``*_wall_gbps``).
    """
    from lmcache.serde.codec import decode_value, encode_value, parse_codec_header

    encoded = [encode_value(codec, memoryview(c), g) for c in chunks]
    outs = [bytearray(len(c)) for c in chunks]
    srcs = [np.frombuffer(c, dtype=np.uint8) for c in chunks]
    dsts = [np.frombuffer(o, dtype=np.uint8) for o in outs]
    times: dict[str, list[float]] = {f"{op}{kind}": [] for op in ("enc", "dec", "cpy") for kind in ("", "_wall")}

    def timed(name: str, fn: Any) -> None:
        w, c = time.perf_counter(), time.thread_time()
        fn()
        times[name].append(time.thread_time() - c)
        times[name + "_wall"].append(time.perf_counter() - w)

    def encode_all() -> None:
        for c in chunks:
            encode_value(codec, memoryview(c), g)

    def decode_all() -> None:
        for e, o in zip(encoded, outs, strict=True):
            h = parse_codec_header(e)
            if h is not None:
                decode_value(memoryview(e), memoryview(o), h, codec)
            else:
                memoryview(o)[:] = e

    def copy_all() -> None:
        for s, d in zip(srcs, dsts, strict=True):
            np.copyto(d, s)

    decode_all()  # warm: per-thread scratch buffers, first-touch of the outputs
    for _ in range(repeat):
        timed("enc", encode_all)
        timed("dec", decode_all)
        timed("cpy", copy_all)
    nbytes = sum(len(c) for c in chunks)
    out: dict[str, float | None] = {}
    for op, name in (("enc", "encode"), ("dec", "decode"), ("cpy", "memcpy")):
        for kind in ("", "_wall"):
            t = report.median(times[op + kind])
            out[f"{name}{kind}_gbps"] = nbytes / t / 1e9 if t else None
    return out


def _quality(
    model: Any, raw_kv: Any, decoded_kv: Any, tokens: list[int], ref_logits: Any
) -> tuple[list[float], list[bool], list[float]]:
    """Per position: KL(raw || codec), whether the top-1 tokens agree, and raw's top-1 lead in logits."""
    import torch

    logits = _continuation_logits(model, decoded_kv, tokens)
    lp_ref = torch.log_softmax(ref_logits, dim=-1)
    lp = torch.log_softmax(logits, dim=-1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(dim=-1)
    agree = ref_logits.argmax(dim=-1) == logits.argmax(dim=-1)
    top2 = ref_logits.topk(2, dim=-1).values
    return kl.tolist(), agree.tolist(), (top2[:, 0] - top2[:, 1]).tolist()


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
    first_doc: int = 0,
) -> dict[str, Any]:
    """Measure each codec spec on KV of each model; returns the JSON-ready result.

    ``first_doc`` skips that many real-text documents (SmolLM2): a codec's choices can be fitted
    on one document set (``first_doc=64``) and reported on another (the default, 0).
    """
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
            texts = real_documents(tok, first_doc + docs * 2, doc_tokens)[first_doc:]
            doc_ids = texts[:docs]
            questions = [t[:question_tokens] for t in texts[docs:]]
        else:
            model, doc_ids, questions = _random_model_prompts(docs, docs, doc_tokens, question_tokens)
        per_codec: dict[str, dict[str, Any]] = {
            s: {"raw_bytes": 0, "stored_bytes": 0, "kl": [], "top1": [], "flips": [], "speed": []} for s in codecs
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
                kl, agree, lead = _quality(model, raw_kv, _from_chunks(decoded, tuple(kv.shape)), tokens, ref_logits)
                row["kl"].extend(kl)
                row["top1"].extend(agree)
                # raw's top-1 lead (logits) where the codec's top-1 differs: near-ties flip under any noise
                row["flips"].extend(round(m, 4) for m, a in zip(lead, agree, strict=True) if not a)
                row["near_ties"] = row.get("near_ties", 0) + sum(m < DECISIVE_LEAD for m in lead)
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
                "positions": len(row["top1"]),
                # Agreement where raw's top-1 leads by >= DECISIVE_LEAD logits: flips closer than that
                # are near-ties that any perturbation (even another summation order) can flip.
                "top1_agreement_decisive": 1 - sum(m >= DECISIVE_LEAD for m in row["flips"]) / max(1, len(row["top1"])),
                "flip_margins": row["flips"],
                # positions where raw's top-1 leads by < DECISIVE_LEAD: where top-1 can flip under any noise
                "near_ties": row.get("near_ties", 0),
                **speed,
                "decode_vs_memcpy": (speed.get("decode_gbps") or 0) / (speed.get("memcpy_gbps") or 1),
            }
            if spec.startswith("cachegen") and geometry is not None:
                from lmcache.serde.cachegen import DEFAULT_BITS, layer_report, plan_bits

                opts = made[spec].settings
                bits = opts.codec_bits or DEFAULT_BITS
                rows[spec]["layer_bits_plan"] = plan_bits(geometry.layers, geometry.parts, bits)
                # where the bits go per layer (keys, values, side information), on the last document's first chunk
                rows[spec]["layer_report"] = layer_report(chunks[0], geometry, bits, opts.codec_anchor)
        results["models"][model_name] = {
            "geometry": None if geometry is None else list(geometry.shape),
            "docs": len(doc_ids),
            "first_doc": first_doc,
            "doc_tokens": doc_tokens,
            "question_tokens": question_tokens,
            "decode_steps": decode_steps,
            "codecs": rows,
        }
    return results


@contextlib.contextmanager
def local_redis() -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port (no persistence); yields its URL.

    Raises:
        MissingDependencyError: No ``redis-server`` (or ``valkey-server``) on the PATH.
    """
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        raise MissingDependencyError("redis-server", "redis-server (apt-get install redis-server)", "--e2e-redis auto")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with tempfile.TemporaryDirectory(prefix="lmcache-bench-redis-") as folder:
        argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen([*argv, "--dir", folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def tier_url(base: str, spec: str) -> str:
    """``base`` with the codec options of ``spec`` (``fp8``, ``zstd?codec_level=9``) in its query."""
    query = "&".join(f"{k}={v}" for k, v in parse_spec(spec).items())
    return base + ("&" if "?" in base else "?") + query


def bench_e2e(
    codecs: list[str],
    redis_url: str,
    *,
    model_name: str = "smollm2",
    docs: int = 2,
    doc_tokens: int = 2048,
    questions: int = 3,
    question_tokens: int = 32,
    chunk_size: int = 256,
    read_rounds: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    """Warm TTFT of long-doc-qa prompts with the KV on one ``redis://`` tier, per codec, same run.

    One engine per codec, each with only the Redis tier (``?codec=<spec>``) and its own hash seed
    (so codecs never read each other's values). Per document: a cold question's KV, computed once,
    is stored through every engine, then each warm question runs through every engine in turn (codecs interleaved,
    so a change in the host's load hits them alike). A ``memory://`` engine gives the warm TTFT
    with no tier to read from: ``load_s`` = warm TTFT minus that is the time to fetch and decode
    the KV, and ``kv_gbps`` = 16-bit KV bytes loaded / ``load_s``. Then the tier read alone
    (:func:`_tier_reads`: the first document's chunks read back through each codec
    ``read_rounds`` times, no model): ``read_gbps`` and ``read_vs_raw``.
    """
    import torch

    from lmcache.config import LMCacheConfig
    from lmcache.integrations.transformers import CachedCausalLM, ContiguousKV
    from lmcache.serde.codec import DTYPE_SIZES

    torch.set_num_threads(1)
    if model_name == "smollm2":
        from lmcache.bench.realmodel import real_documents

        model, tok = _load_smollm2()
        texts = real_documents(tok, docs * (1 + questions), doc_tokens)
        doc_ids = texts[:docs]
        question_ids = [t[:question_tokens] for t in texts[docs:]]
    else:
        model, doc_ids, question_ids = _random_model_prompts(docs * questions, docs, doc_tokens, question_tokens)
    # bfloat16 weights, so the engine's KV (what each tier stores raw) is 16-bit, as the ratios
    # and the goals are stated (a float32 model's raw KV would be twice as large).
    model = model.to(torch.bfloat16)
    run_id = secrets.token_hex(4)
    rows = ["memory", *codecs]
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in rows}
    with contextlib.ExitStack() as stack:
        engines = {}
        for r in rows:
            tier = "memory://?capacity=4GiB" if r == "memory" else tier_url(redis_url, r)
            # Generous tier budgets: this measures how long a load takes, not the engine's
            # give-up policy (on a loaded host the defaults turn slow loads into misses).
            cfg = LMCacheConfig.load(
                environ={},
                tiers=[tier],
                chunk_size=chunk_size,
                hash_seed=f"bench-codec-e2e-{run_id}-{r}",
                tier_timeout=300.0,
                lookup_budget=300.0,
            )
            engines[r] = stack.enter_context(CachedCausalLM(model, config=cfg))
        geometry = next(iter(engines.values())).geometry
        per_token = geometry.num_layers * geometry.kv_parts * geometry.num_kv_heads * geometry.head_dim
        per_token *= DTYPE_SIZES[geometry.dtype]
        for d, doc in enumerate(doc_ids):
            if progress:
                print(f"[e2e] document {d + 1}/{len(doc_ids)}: {len(doc)} tokens", flush=True)
            # Cold: the memory engine computes the prompt once; every engine stores that KV.
            cold = doc + question_ids[d * questions]
            cache = engines["memory"].prefill(torch.tensor([cold])).cache
            kv = ContiguousKV([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])
            for eng in engines.values():
                if eng is not engines["memory"]:
                    eng.engine.store(cold, kv).result()
                eng.engine.flush()
            for q in range(questions):
                ids = torch.tensor([doc + question_ids[d * questions + q]])
                for r, eng in engines.items():
                    res = eng.prefill(ids)
                    eng.engine.flush()  # its stores finish before the next engine's clock starts
                    runs[r].append({"ttft_s": res.ttft_s, "cached_tokens": res.cached_tokens})
    out: dict[str, Any] = {}
    # Median and best (minimum) of the warm prompts: on a host shared with other jobs the best is
    # the closest to an unloaded run; both are reported.
    for stat, pick in (("", report.median), ("_best", min)):
        base = pick([x["ttft_s"] for x in runs["memory"]])
        for r in rows:
            row = out.setdefault(r, {"runs": runs[r]})
            ttft = pick([x["ttft_s"] for x in runs[r]])
            cached = report.median([x["cached_tokens"] for x in runs[r]]) or 0
            # A load no slower than the memory run's is lost in the noise: no figure, not a huge one.
            load = ttft - base if ttft > base else None
            row.update({"cached_tokens": cached, "kv_bytes": cached * per_token, f"warm_ttft{stat}_s": ttft})
            if r != "memory":
                row[f"load{stat}_s"] = load
                row[f"kv{stat}_gbps"] = cached * per_token / load / 1e9 if load else None
    raw = out.get("raw")
    for r in codecs:
        row = out[r]
        for stat in ("", "_best"):
            row[f"ttft_vs_raw{stat}"] = raw[f"warm_ttft{stat}_s"] / row[f"warm_ttft{stat}_s"] if raw else None
            kv, kv_raw = row[f"kv{stat}_gbps"], raw and raw[f"kv{stat}_gbps"]
            row[f"kv_per_s_vs_raw{stat}"] = kv / kv_raw if kv and kv_raw else None
    # The tier read alone (no model): the same chunks read back through each codec, many rounds.
    kv_doc = _kv_of(model, doc_ids[0])  # bfloat16, as the engine's (the key names that geometry)
    chunks = _chunks(kv_doc, chunk_size)
    reads = asyncio.run(_tier_reads(codecs, redis_url, chunks, geometry.key_model(f"bench-{run_id}"), read_rounds))
    for r in codecs:
        out[r].update(reads[r])
        raw_read = reads.get("raw", {}).get("read_gbps")
        out[r]["read_vs_raw"] = reads[r]["read_gbps"] / raw_read if raw_read else None
    return {
        "redis": redact_url(redis_url),
        "model": model_name,
        "geometry": geometry.identity,
        "docs": len(doc_ids),
        "doc_tokens": doc_tokens,
        "questions": questions,
        "question_tokens": question_tokens,
        "chunk_size": chunk_size,
        "rows": out,
    }


async def _tier_reads(
    specs: list[str], redis_url: str, chunks: list[bytes], key_model: str, rounds: int
) -> dict[str, dict[str, Any]]:
    """Seconds to read ``chunks`` back from Redis through each codec (``get_into``, decode included).

    Each codec's values are put once under its own keys; then ``rounds`` rounds read every
    codec's chunks in turn (interleaved, as the warm prompts are). The keys are deleted after.
    Besides wall time, the CPU time this process spent per read (all its threads: receiving,
    checking, decoding) is recorded: unlike wall time, other jobs on the host barely move it.
    """
    from lmcache.backends.registry import open_backend
    from lmcache.keys import CacheKey
    from lmcache.serde.layer import CodecBackend

    backends = {spec: open_backend(tier_url(redis_url, spec)) for spec in specs}
    keys = {spec: [CacheKey(key_model, 1, 0, secrets.token_bytes(32), "bfloat16") for _ in chunks] for spec in specs}
    dsts = [bytearray(len(c)) for c in chunks]
    times: dict[str, list[float]] = {spec: [] for spec in specs}
    cpu: dict[str, list[float]] = {spec: [] for spec in specs}
    traces: dict[str, list[dict[str, float]]] = {spec: [] for spec in specs}
    try:
        for spec, b in backends.items():
            await b.open()
            if not all(r.ok for r in await b.put(keys[spec], chunks)):
                raise RuntimeError(f"bench codec: {spec} values were not stored in {redact_url(redis_url)}")
        for _ in range(rounds):
            for spec, b in backends.items():
                if isinstance(b, CodecBackend):
                    b.read_trace = []  # per-group timings of pipelined reads (a raw tier has none)
                t, c = time.perf_counter(), time.process_time()
                got = await b.get_into(keys[spec], dsts)
                times[spec].append(time.perf_counter() - t)
                cpu[spec].append(time.process_time() - c)
                if None in got:
                    raise RuntimeError(f"bench codec: a {spec} value was not read back")
                if isinstance(b, CodecBackend) and b.read_trace:
                    traces[spec].append(read_trace_summary(b.read_trace))
    finally:
        for spec, b in backends.items():
            with contextlib.suppress(Exception):
                await b.delete(keys[spec])
            await b.aclose()
    nbytes = sum(len(c) for c in chunks)
    out = {}
    for spec, ts in times.items():
        p50, best = report.median(ts), min(ts)
        out[spec] = {
            "read_chunks": len(chunks),
            "read_s": p50,
            "read_best_s": best,
            "read_gbps": nbytes / p50 / 1e9,
            "read_best_gbps": nbytes / best / 1e9,
            "read_cpu_s_per_gb": report.median(cpu[spec]) / (nbytes / 1e9),
        }
        if traces[spec]:  # where a read's time went: medians over the rounds
            out[spec]["read_trace_ms"] = {k: report.median([t[k] for t in traces[spec]]) * 1e3 for k in traces[spec][0]}
    return out


def read_trace_summary(trace: list[dict[str, float]]) -> dict[str, float]:
    """Where one pipelined read's time went, from its ``CodecBackend.read_trace`` (seconds).

    ``first_landed``: the first group off the wire; ``wire_busy``: first fetch start to last
    fetch end; ``decode_cpu``: worker CPU time decoding, summed over groups; ``decode_wall``:
    the same in wall time (above ``decode_cpu`` when the workers wait for a core);
    ``worker_wait_max``: the longest a landed group waited for a worker; ``tail``: the read's
    end after the last fetch's (the decode left over once the wire is done); ``total``.
    """
    decoded = [r for r in trace if "decode_start" in r]
    last_wire = max(r["wire_end"] for r in trace)
    return {
        "first_landed": min(r["wire_end"] for r in trace),
        "wire_busy": last_wire - min(r["wire_start"] for r in trace),
        "decode_cpu": sum(r["decode_cpu"] for r in decoded),
        "decode_wall": sum(r["decode_end"] - r["decode_start"] for r in decoded),
        "worker_wait_max": max((r["decode_start"] - r["wire_end"] for r in decoded), default=0.0),
        "tail": max(r["done"] for r in trace) - last_wire,
        "total": max(r["done"] for r in trace),
    }


def print_e2e_table(e2e: dict[str, Any]) -> None:
    """The end-to-end rows: warm TTFT from Redis per codec against raw (median, and best)."""
    rows = []
    for spec, r in e2e["rows"].items():
        ms = [r.get(k) and r[k] * 1e3 for k in ("warm_ttft_s", "warm_ttft_best_s", "load_s", "load_best_s")]
        rows.append(
            [
                "memory:// (no tier read)" if spec == "memory" else spec,
                int(r["cached_tokens"]),
                *(report.format_float(v, 1) for v in ms),
                report.format_float(r.get("kv_gbps"), 3),
                report.format_float(r.get("ttft_vs_raw"), 2),
                report.format_float(r.get("kv_per_s_vs_raw"), 2),
                report.format_float(r.get("kv_per_s_vs_raw_best"), 2),
                report.format_float(r.get("read_gbps"), 3),
                report.format_float(r.get("read_best_gbps"), 3),
                report.format_float(r.get("read_vs_raw"), 2),
                report.format_float(r.get("read_cpu_s_per_gb"), 3),
            ]
        )
    headers = [
        "codec",
        "tokens loaded",
        "warm TTFT ms p50",
        "best",
        "load ms p50",
        "best",
        "KV GB/s p50",
        "TTFT gain p50",
        "KV/s vs raw p50",
        "best",
        "tier read GB/s p50",
        "best",
        "read vs raw",
        "client CPU s/GB",
    ]
    title = (
        f"end to end: warm TTFT from {e2e['redis']}, {e2e['model']}, {e2e['docs']} docs x "
        f"{e2e['doc_tokens']} tokens, {e2e['questions']} warm questions each"
    )
    print(report.render_table(headers, rows, title=title))
    traced = {spec: r["read_trace_ms"] for spec, r in e2e["rows"].items() if r.get("read_trace_ms")}
    if traced:
        names = list(next(iter(traced.values())))
        rows = [[spec, *(report.format_float(t.get(k), 1) for k in names)] for spec, t in traced.items()]
        title = "where a tier read's time goes (ms, median over the read rounds; see read_trace_summary)"
        print(report.render_table(["codec", *names], rows, title=title))


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
                    f"{100 * r['top1_agreement']:.1f}% of {r['positions']} ({r.get('near_ties', 0)} near-ties)",
                    f"{100 * r['top1_agreement_decisive']:.1f}%",
                ]
            )
        headers = [
            "codec",
            "ratio",
            "bits/value",
            "enc GB/s",
            "dec GB/s",
            "memcpy GB/s",
            "mean KL",
            "top-1",
            f"top-1, lead >= {DECISIVE_LEAD}",
        ]
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
    p.add_argument(
        "--first-doc",
        type=non_negative_int,
        default=0,
        help="real-text documents to skip first (another document set, e.g. to fit on; default 0)",
    )
    p.add_argument("--doc-tokens", type=positive_int, default=1024, help="tokens per document (default 1024)")
    p.add_argument("--question-tokens", type=positive_int, default=32, help="question tokens (default 32)")
    p.add_argument("--decode-steps", type=positive_int, default=32, help="greedy decode steps compared (default 32)")
    p.add_argument("--chunk-size", type=positive_int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--repeat", type=positive_int, default=3, help="speed rounds, median reported (default 3)")
    p.add_argument(
        "--model", action="append", choices=("smollm2", "random-125m"), default=None, help="KV source (default both)"
    )
    p.add_argument(
        "--e2e-redis",
        metavar="URL",
        default=None,
        help="also measure warm TTFT of long-doc-qa prompts with the KV on this redis:// tier, per codec "
        "('auto': a throwaway local redis-server); writes keys there, so give it a scratch database",
    )
    p.add_argument("--e2e-only", action="store_true", help="only the end-to-end rows (needs --e2e-redis)")
    p.add_argument(
        "--read-rounds", type=positive_int, default=10, help="end to end: rounds of the tier-read-alone rows"
    )
    p.add_argument("--questions", type=positive_int, default=3, help="end to end: warm questions per document")
    p.add_argument(
        "--e2e-doc-tokens", type=positive_int, default=2048, help="end to end: tokens per document (default 2048)"
    )
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write results here (default bench-results/…)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of ratio vs KL (default beside the JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``bench codec`` from parsed arguments."""
    if args.e2e_only and not args.e2e_redis:
        raise ConfigError("--e2e-only needs --e2e-redis URL (or 'auto')")
    result: dict[str, Any] = {"models": {}, "codecs": []}
    if not args.e2e_only:
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
            first_doc=args.first_doc,
        )
    if args.e2e_redis:
        e2e_codecs = args.codec or list(E2E_CODECS)
        if "raw" not in e2e_codecs:
            e2e_codecs = ["raw", *e2e_codecs]
        with contextlib.ExitStack() as stack:
            url = stack.enter_context(local_redis()) if args.e2e_redis == "auto" else args.e2e_redis
            result["e2e"] = bench_e2e(
                e2e_codecs,
                url,
                model_name=(args.model or ["smollm2"])[0],
                docs=args.docs,
                doc_tokens=args.e2e_doc_tokens,
                questions=args.questions,
                question_tokens=args.question_tokens,
                chunk_size=args.chunk_size,
                read_rounds=args.read_rounds,
                progress=not args.no_progress,
            )
    result["machine"] = report.machine_info()
    print_table(result)
    if "e2e" in result:
        print_e2e_table(result["e2e"])
    path = report.write_json(args.json_path or report.default_json_path("codec", "kv"), result)
    print(f"results: {path}")
    if result["models"]:
        png = plot(result, args.plot or path.with_suffix(".png"))
        if png is not None:
            print(f"plot: {png}")
    return 0
