"""``lmcache bench long-doc-qa``: D documents of L tokens, each asked Q different questions.

Prompt = document + question. The first question of a document finds a cold cache (its
document is stored as it runs); the others find it warm. Several ``--doc-tokens`` lengths give
a TTFT-against-context-length table, JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from lmcache.bench import positive_int
from lmcache.bench.qa.common import (
    PromptRun,
    QASetup,
    add_model_args,
    build_model,
    default_tiers,
    plot_ttft,
    progress,
    question_major,
    random_tokens,
    run_prompt_pair,
    summarize,
    vocab_size,
)
from lmcache.bench.report import default_json_path, machine_info, render_table, write_json

DESCRIPTION = "TTFT of questions over long documents: recompute vs lmcache cold/warm"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench long-doc-qa``."""
    p = sub.add_parser("long-doc-qa", help=DESCRIPTION, description=__doc__)
    p.add_argument("--docs", type=positive_int, default=2, help="documents (D)")
    p.add_argument(
        "--doc-tokens",
        default="1024,2048",
        help="document length(s) in tokens (L), comma-separated for a TTFT-vs-length sweep",
    )
    p.add_argument("--questions", type=positive_int, default=3, help="questions per document (Q)")
    p.add_argument("--question-tokens", type=positive_int, default=32, help="tokens per question")
    add_model_args(p)
    return p


def _lengths(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--doc-tokens must be positive integers, got {text!r}")
    return values


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the workload and return the JSON-ready result."""
    from lmcache.config import LMCacheConfig
    from lmcache.integrations.transformers import CachedCausalLM

    lengths = _lengths(args.doc_tokens)
    model, model_desc = build_model(args)
    vocab = vocab_size(model)
    tiers, tmp = default_tiers(args)
    by_length: dict[int, dict[str, Any]] = {}
    all_runs: dict[int, list[PromptRun]] = {}
    try:
        for length in lengths:
            rng = np.random.default_rng(args.seed + length)
            docs = [random_tokens(rng, length, vocab) for _ in range(args.docs)]
            # Fresh tiers per length so every length starts cold; file:// gets its own subdir.
            length_tiers = [t if not t.startswith("file://") else f"{t}/L{length}" for t in tiers]
            config = LMCacheConfig.load(tiers=length_tiers, chunk_size=args.chunk_size)
            with CachedCausalLM(model, config=config) as cached:
                setup = QASetup(model, cached)
                runs: list[PromptRun] = []
                todo = question_major(args.docs, args.questions)
                for d, q in progress(todo, len(todo), f"long-doc-qa L={length}", args.no_progress):
                    question = random_tokens(rng, args.question_tokens, vocab)
                    state = "cold" if q == 0 else "warm"
                    runs.append(run_prompt_pair(setup, docs[d] + question, f"doc{d}/q{q}", state))
                    cached.engine.flush()
                stats = cached.engine.stats()
            summary = summarize(runs)
            summary["bytes_retrieved"] = stats["retrieved_bytes"]
            summary["bytes_stored"] = stats["stored_bytes"]
            by_length[length] = summary
            all_runs[length] = runs
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {
        "workload": "long-doc-qa",
        "machine": machine_info(),
        "parameters": {
            "docs": args.docs,
            "doc_tokens": lengths,
            "questions": args.questions,
            "question_tokens": args.question_tokens,
            "model": model_desc,
            "threads": args.threads,
            "chunk_size": args.chunk_size,
            "tiers": tiers if args.tier else ["memory://?capacity=4GiB", "file://<tmp>"],
        },
        "results": {str(n): s for n, s in by_length.items()},
        "runs": {str(n): [r.__dict__ for r in rs] for n, rs in all_runs.items()},
        "outputs_match": all(s["outputs_match"] for s in by_length.values()),
    }


def table(result: dict[str, Any]) -> str:
    """The terminal summary."""
    rows = []
    for n, s in result["results"].items():
        rows.append(
            [
                int(n),
                s["recompute"]["median_s"],
                s["recompute"]["p90_s"],
                s["lmcache_cold"]["median_s"],
                s["lmcache_warm"]["median_s"],
                s["lmcache_warm"]["p90_s"],
                s["warm_speedup"],
                None if s["cold_overhead"] is None else 100 * s["cold_overhead"],
                s["hit_rate_tokens"],
                s["bytes_retrieved"] / 1e6,
                "yes" if s["outputs_match"] else "NO",
            ]
        )
    headers = [
        "context",
        "recompute p50 s",
        "recompute p90 s",
        "cold p50 s",
        "warm p50 s",
        "warm p90 s",
        "warm speedup",
        "cold overhead %",
        "hit rate",
        "MB loaded",
        "outputs match",
    ]
    return render_table(headers, rows, title=f"long-doc-qa: {result['parameters']['model']}")


def run_cli(args: argparse.Namespace) -> int:
    """``lmcache bench long-doc-qa``: print the table, write JSON and the plot."""
    result = run(args)
    print(table(result))
    path = write_json(args.json or default_json_path("long-doc-qa", "hf"), result)
    plot = plot_ttft(
        args.plot or path.with_suffix(".png"),
        {int(n): s for n, s in result["results"].items()},
        "long-doc-qa: TTFT vs context length",
    )
    print(f"JSON: {path}" + (f"\nplot: {plot}" if plot else ""))
    return 0 if result["outputs_match"] else 1
