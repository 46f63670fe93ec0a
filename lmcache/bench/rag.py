"""``lmcache bench rag``: non-prefix KV reuse (blending) against full recompute and prefix caching.

A corpus of ``--docs`` documents of ``--doc-tokens`` tokens; each query is ``--k`` documents
drawn in random order plus a ``--question-tokens`` question. Systems, interleaved per query in
a shuffled order so machine noise hits all alike:

* ``full``: the model alone, the whole prompt (only the last token's logits);
* ``prefix``: :meth:`CachedCausalLM.prefill` (the corpus was ingested as prefix chunks, one
  document per prompt, so a query reuses at most its first document, plus whatever earlier
  queries stored);
* ``blend@r``: :meth:`CachedCausalLM.prefill_segments` at ``recompute_ratio=r`` (the corpus was
  ingested with :meth:`CachedCausalLM.cache_segments`).

With ``--smollm2`` every prompt is a chat turn in the model's own template: the system prompt and
the user turn's header (the shared prefix), the documents, then the question, the end of the
turn and the assistant header. The documents are cached as computed after that prefix (the
``prefix=`` of ``cache_segments``/``prefill_segments``), as a deployment whose prompts share a
system prompt would; ``--no-prefix`` caches them alone instead (each then starts with its own
attention sink) and drops the template.

TTFT is the time to the first token's logits (cache lookups and loads included). Quality is
measured against ``full``: top-1 agreement and KL divergence of the first answer token, and
agreement of a greedy answer of ``--answer-tokens`` tokens decoded on from each system's cache
(``exact``: the whole answer equal; ``tokens``: the share of positions with equal tokens, so a
system equal to ``full`` scores 1.0; add ratio 1 to ``--ratios`` to see it).

Models: the random Llama of the QA workloads (``--model-size 125m``, random token documents) for
speed; ``--smollm2`` (the offline SmolLM2-135M-Instruct of :mod:`lmcache.bench.realmodel`) with
real text as documents (the standard library's module documentation, as ``pydoc`` renders it) and
an English question for quality.
"""

from __future__ import annotations

import argparse
import pydoc
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmcache.bench import non_negative_int, positive_int
from lmcache.bench.qa.common import add_model_args, build_model, default_tiers, progress, random_tokens, vocab_size
from lmcache.bench.report import default_json_path, machine_info, percentile, render_table, write_json
from lmcache.errors import ConfigError

__all__ = [
    "DESCRIPTION",
    "STDLIB_MODULES",
    "add_parser",
    "chat_parts",
    "run",
    "run_cli",
    "stdlib_documents",
    "table",
]

DESCRIPTION = "RAG prompts of reordered documents: blending (CacheBlend) vs full recompute and prefix caching"

#: Standard-library modules whose rendered documentation serves as real-text documents.
STDLIB_MODULES: tuple[str, ...] = (
    "argparse",
    "subprocess",
    "logging",
    "pathlib",
    "json",
    "csv",
    "tarfile",
    "zipfile",
    "sqlite3",
    "threading",
    "textwrap",
    "difflib",
    "dataclasses",
    "contextlib",
    "functools",
    "heapq",
    "pickle",
    "shutil",
    "string",
    "uuid",
    "ipaddress",
    "decimal",
    "fractions",
    "calendar",
    "configparser",
    "gzip",
    "base64",
    "hashlib",
    "socket",
    "smtplib",
    "unittest",
    "inspect",
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``bench rag``."""
    p = sub.add_parser("rag", help=DESCRIPTION, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct with real-text documents")
    p.add_argument(
        "--no-prefix",
        action="store_true",
        help="with --smollm2: no chat template, documents cached alone (not after the system prompt)",
    )
    p.add_argument("--docs", type=positive_int, default=12, help="documents in the corpus")
    p.add_argument("--doc-tokens", type=positive_int, default=512, help="tokens per document")
    p.add_argument("--k", type=positive_int, default=4, help="documents per query")
    p.add_argument("--question-tokens", type=positive_int, default=32, help="tokens per question")
    p.add_argument("--queries", type=positive_int, default=8, help="queries measured")
    p.add_argument("--ratios", default="0,0.05,0.15,0.3", help="comma-separated recompute ratios to blend at")
    p.add_argument("--answer-tokens", type=non_negative_int, default=32, help="greedy answer length (0: none)")
    return p


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--ratios {text!r}: not a comma-separated list of numbers") from None
    if not ratios or any(not 0.0 <= r <= 1.0 for r in ratios):
        raise ConfigError(f"--ratios {text!r}: each ratio must be within [0, 1]")
    return ratios


def stdlib_documents(tokenizer: Any, count: int, n_tokens: int) -> tuple[list[list[int]], list[str]]:
    """``count`` documents of ``n_tokens`` tokens of standard-library documentation, and their names.

    Document ``i`` is the start of ``pydoc``'s plain-text rendering of module ``i`` of
    :data:`STDLIB_MODULES` (modules whose rendering is too short are skipped).
    """
    docs: list[list[int]] = []
    names: list[str] = []
    for name in STDLIB_MODULES:
        if len(docs) == count:
            break
        try:
            text = pydoc.render_doc(name, renderer=pydoc.plaintext)
        except (ImportError, pydoc.ErrorDuringImport):
            continue
        ids = tokenizer.encode(" ".join(text.split()), add_special_tokens=False)
        if len(ids) >= n_tokens:
            docs.append(ids[:n_tokens])
            names.append(name)
    if len(docs) < count:
        raise ConfigError(f"only {len(docs)} standard-library documents have {n_tokens} tokens; use fewer --docs")
    return docs, names


def chat_parts(tokenizer: Any) -> tuple[str, str]:
    """The model's chat template around one user message: the text before it and after it.

    Before: the (default) system prompt and the user turn's header; after: the end of the turn
    and the assistant's header.
    """
    mark = "\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=True
    )
    head, tail = text.split(mark)
    return head, tail


def _question(tokenizer: Any, name: str, n_tokens: int, tail: str | None = None) -> list[int]:
    """An English question about module ``name``, cut or padded (at its start) to ``n_tokens``.

    ``tail`` (the chat template's end of the user turn) replaces the plain ``Answer:`` cue.
    """
    ask = f"\n\nQuestion: what is the Python module {name} used for, according to the documentation above?"
    text = ask + " Answer in one sentence." + ("\nAnswer:" if tail is None else tail)
    ids = tokenizer.encode(text, add_special_tokens=False)
    pad = tokenizer.encode("Read the documents above carefully. ", add_special_tokens=False)
    while len(ids) < n_tokens:
        ids = pad + ids
    return ids[-n_tokens:]


def _greedy(model: Any, logits: Any, cache: Any, n: int, cache_kw: str) -> list[int]:
    """``n`` greedy tokens decoded on from ``cache`` (whose last logits are ``logits``)."""
    import torch

    out: list[int] = []
    nxt = logits.argmax(-1, keepdim=True)
    with torch.no_grad():
        while len(out) < n:
            out.append(int(nxt))
            if len(out) == n:
                break
            step = model(nxt, use_cache=True, **{cache_kw: cache})
            nxt = step.logits[:, -1].argmax(-1, keepdim=True)
    return out


def _kl(p_logits: Any, q_logits: Any) -> float:
    """KL(p || q) of two logit rows, in nats."""
    import torch

    lp = torch.log_softmax(p_logits.double(), dim=-1)
    lq = torch.log_softmax(q_logits.double(), dim=-1)
    return max(0.0, float((lp.exp() * (lp - lq)).sum()))  # rounding can dip just below 0


def _stats(values: list[float]) -> dict[str, float | None]:
    return {"p50_s": percentile(values, 50), "p90_s": percentile(values, 90)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the workload and return the JSON-ready result."""
    import torch

    from lmcache.config import LMCacheConfig
    from lmcache.integrations.transformers import CachedCausalLM, cache_keyword

    ratios = _ratios(args.ratios)
    if args.k > args.docs:
        raise ConfigError(f"--k {args.k} is more than --docs {args.docs}")
    tokenizer = None
    prefix: list[int] = []  # the shared prompt start the documents are cached after
    tail: str | None = None
    if args.no_prefix and not args.smollm2:
        raise ConfigError("--no-prefix applies to --smollm2")
    if args.smollm2:
        from transformers import AutoTokenizer

        from lmcache.bench.realmodel import smollm2_checkpoint

        args.model = str(smollm2_checkpoint())
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    model, model_desc = build_model(args)
    rng = np.random.default_rng(args.seed)
    if tokenizer is not None:
        docs, names = stdlib_documents(tokenizer, args.docs, args.doc_tokens)
        text = "stdlib module docs (pydoc)"
        if not args.no_prefix:
            head, tail = chat_parts(tokenizer)
            prefix = tokenizer.encode(head, add_special_tokens=False)
            text += ", chat template, documents cached after the system prompt"
        else:
            text += ", no template, documents cached alone"
    else:
        vocab = vocab_size(model)
        docs = [random_tokens(rng, args.doc_tokens, vocab) for _ in range(args.docs)]
        names = [f"doc{i}" for i in range(args.docs)]
        text = "random tokens"
    queries = []
    for _ in range(args.queries):
        chosen = [int(i) for i in rng.permutation(args.docs)[: args.k]]
        if tokenizer is not None:
            question = _question(tokenizer, names[chosen[int(rng.integers(args.k))]], args.question_tokens, tail)
        else:
            question = random_tokens(rng, args.question_tokens, vocab_size(model))
        queries.append((chosen, question))

    systems = ["full", "prefix"] + [f"blend@{r:g}" for r in ratios]
    ttft: dict[str, list[float]] = {s: [] for s in systems}
    shares: dict[str, list[float]] = {s: [] for s in systems}
    top1: dict[str, list[bool]] = {s: [] for s in systems}
    kls: dict[str, list[float]] = {s: [] for s in systems}
    exact: dict[str, list[bool]] = {s: [] for s in systems}
    agree: dict[str, list[float]] = {s: [] for s in systems}
    cache_kw = cache_keyword(model.forward)
    tiers, tmp = default_tiers(args)
    try:
        config = LMCacheConfig.load(tiers=tiers, chunk_size=args.chunk_size)
        with CachedCausalLM(model, config=config, blend=True) as lm:
            t0 = time.perf_counter()
            # blending's ingestion: each document on its own (after the shared prefix, if any)
            lm.cache_segments(docs, prefix=prefix or None)
            for doc in docs:  # prefix caching's ingestion: each document as a prompt of its own
                lm.prefill(torch.tensor([prefix + doc]), logits_to_keep=1)
            lm.engine.flush()
            ingest_s = time.perf_counter() - t0
            for chosen, question in progress(queries, len(queries), "rag", args.no_progress):
                segs = [docs[i] for i in chosen] + [question]
                ids = torch.tensor([prefix + [t for seg in segs for t in seg]])
                total = ids.shape[1]
                results: dict[str, tuple[Any, Any]] = {}
                for system in [systems[i] for i in rng.permutation(len(systems))]:
                    if system == "full":
                        start = time.perf_counter()
                        with torch.no_grad():
                            out = model(ids, use_cache=True, logits_to_keep=1)
                        ttft[system].append(time.perf_counter() - start)
                        shares[system].append(1.0)
                        results[system] = (out.logits[:, -1], getattr(out, cache_kw))
                    elif system == "prefix":
                        res = lm.prefill(ids, logits_to_keep=1)
                        ttft[system].append(res.ttft_s)
                        shares[system].append(1.0 - res.cached_tokens / total)
                        results[system] = (res.logits, res.cache)
                    else:
                        ratio = float(system.split("@")[1])
                        res = lm.prefill_segments(segs, recompute_ratio=ratio, prefix=prefix or None)
                        ttft[system].append(res.ttft_s)
                        shares[system].append(res.recomputed_share)
                        results[system] = (res.logits, res.cache)
                    lm.engine.flush()
                ref_logits, ref_cache = results["full"]
                ref_answer = _greedy(model, ref_logits, ref_cache, args.answer_tokens, cache_kw)
                for system in systems:
                    logits, cache = results[system]
                    top1[system].append(bool(int(logits.argmax()) == int(ref_logits.argmax())))
                    kls[system].append(_kl(ref_logits[0], logits[0]))
                    if args.answer_tokens:
                        answer = (
                            ref_answer
                            if system == "full"
                            else _greedy(model, logits, cache, args.answer_tokens, cache_kw)
                        )
                        exact[system].append(answer == ref_answer)
                        agree[system].append(sum(a == b for a, b in zip(answer, ref_answer, strict=True)) / len(answer))
            stats = lm.engine.stats()
    finally:
        if tmp is not None:
            tmp.cleanup()

    full_p50 = percentile(ttft["full"], 50)
    prefix_p50 = percentile(ttft["prefix"], 50)
    summary: dict[str, Any] = {}
    for system in systems:
        s = _stats(ttft[system])
        p50 = s["p50_s"]
        summary[system] = {
            **s,
            "speedup_vs_full": full_p50 / p50 if p50 else None,
            "speedup_vs_prefix": prefix_p50 / p50 if p50 else None,
            "recomputed_share": float(np.mean(shares[system])),
            "top1_agreement": float(np.mean(top1[system])),
            "kl_first_token": float(np.mean(kls[system])),
            "answer_exact": float(np.mean(exact[system])) if exact[system] else None,
            "answer_token_agreement": float(np.mean(agree[system])) if agree[system] else None,
        }
    return {
        "workload": "rag",
        "machine": machine_info(),
        "parameters": {
            "model": model_desc,
            "documents": text,
            "docs": args.docs,
            "doc_tokens": args.doc_tokens,
            "k": args.k,
            "question_tokens": args.question_tokens,
            "prefix_tokens": len(prefix),
            "queries": args.queries,
            "ratios": ratios,
            "answer_tokens": args.answer_tokens,
            "threads": args.threads,
            "chunk_size": args.chunk_size,
            "tiers": tiers if args.tier else ["memory://?capacity=4GiB", "file://<tmp>"],
        },
        "ingest_s": ingest_s,
        "results": summary,
        "ttft_s": ttft,
        "engine": {k: stats[k] for k in ("retrieved_tokens", "retrieved_bytes", "stored_chunks", "get_failures")},
    }


def table(result: dict[str, Any]) -> str:
    """The terminal summary."""
    headers = [
        "system",
        "TTFT p50 s",
        "TTFT p90 s",
        "x vs full",
        "x vs prefix",
        "recomputed",
        "top-1 agree",
        "KL 1st tok",
        "answer exact",
        "answer tokens",
    ]
    rows = [
        [
            name,
            s["p50_s"],
            s["p90_s"],
            s["speedup_vs_full"],
            s["speedup_vs_prefix"],
            s["recomputed_share"],
            s["top1_agreement"],
            s["kl_first_token"],
            s["answer_exact"],
            s["answer_token_agreement"],
        ]
        for name, s in result["results"].items()
    ]
    p = result["parameters"]
    pre = f"{p['prefix_tokens']} + " if p.get("prefix_tokens") else ""
    sizes = f"{pre}{p['k']} x {p['doc_tokens']} + {p['question_tokens']} tokens"
    title = f"rag: {p['model']}, {p['documents']}, k={p['k']}: {sizes}"
    return render_table(headers, rows, title=title)


def plot(path: Path, result: dict[str, Any]) -> Path | None:
    """A PNG of TTFT and quality against the recompute ratio; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    res = result["results"]
    ratios = result["parameters"]["ratios"]
    blend = [res[f"blend@{r:g}"] for r in ratios]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ratios, [b["p50_s"] for b in blend], marker="o", label="blend")
    ax1.axhline(res["full"]["p50_s"], color="k", linestyle="--", label="full recompute")
    ax1.axhline(res["prefix"]["p50_s"], color="g", linestyle=":", label="prefix caching")
    ax1.set_xlabel("recompute ratio")
    ax1.set_ylabel("TTFT p50 (s)")
    ax1.set_ylim(bottom=0)
    ax1.legend()
    ax1.grid(True, alpha=0.3)
    ax2.plot(ratios, [b["top1_agreement"] for b in blend], marker="o", label="first-token top-1 agreement")
    if blend and blend[0]["answer_token_agreement"] is not None:
        ax2.plot(ratios, [b["answer_token_agreement"] for b in blend], marker="s", label="answer token agreement")
    ax2.set_xlabel("recompute ratio")
    ax2.set_ylabel("agreement with full recompute")
    ax2.set_ylim(0, 1.05)
    ax2.legend()
    ax2.grid(True, alpha=0.3)
    fig.suptitle(f"rag: {result['parameters']['model']}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_cli(args: argparse.Namespace) -> int:
    """``lmcache bench rag``: print the table, write JSON and the plot."""
    result = run(args)
    print(table(result))
    tag = (
        ("smollm2-noprefix" if args.no_prefix else "smollm2")
        if args.smollm2
        else (args.model_size if not args.model else "model")
    )
    path = write_json(args.json or default_json_path("rag", tag), result)
    png = plot(args.plot or path.with_suffix(".png"), result)
    print(f"JSON: {path}" + (f"\nplot: {png}" if png else ""))
    return 0
