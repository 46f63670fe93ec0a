"""``lmcache bench multi-round-qa --vllm``: a multi-user chat through vLLM-CPU with lmcache.

U users chat for R rounds over a shared system prompt, on SmolLM2-135M-Instruct (built offline by
:func:`lmcache.bench.realmodel.smollm2_checkpoint`) with questions of real English text. Round r's
prompt is the user's history (system prompt, earlier questions and the model's own greedy
answers) plus a new question. vLLM's prefix cache is reset before every prompt (a busy server
whose device KV has moved on), so every hit comes from lmcache. The run is made twice: with the
connector's ``save_decode_tokens`` on (the default: answers are stored too) and off (prompts
only). Per round it reports the share of prompt tokens loaded from lmcache, read from vLLM's own
``vllm:lmcache_loaded_tokens`` metric (the connector's ``KVConnectorStats``), and whether both runs
generated the same answers.

vLLM runs in its own venv (``--vllm-python``, default ``.venv-vllm/bin/python``; see
docs/vllm.md), one process per run, as ``python -m lmcache.bench.qa.vllm_multi_round --child``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from lmcache.bench.qa.common import call_vllm_child, check_vllm_python, child_main, vllm_kv_config, vllm_llm
from lmcache.bench.report import default_json_path, machine_info, render_table, write_json

__all__ = ["add_vllm_args", "run", "run_cli"]


def add_vllm_args(p: argparse.ArgumentParser) -> None:
    """The ``--vllm`` mode's own options of ``bench multi-round-qa``."""
    p.add_argument(
        "--vllm",
        action="store_true",
        help="run the chat through vLLM-CPU (SmolLM2, real answers) and report the hit rate per round "
        "with and without the connector's save_decode_tokens",
    )
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of the vLLM-CPU venv (--vllm)")
    p.add_argument("--block-size", type=int, default=128, help="vLLM block size (--vllm; a multiple of 32 on CPU)")


# -- child (runs in the vLLM venv) -------------------------------------------------------------


def _loaded_tokens(llm: Any) -> float:
    return sum(float(getattr(m, "value", 0.0)) for m in llm.get_metrics() if m.name == "vllm:lmcache_loaded_tokens")


def _chat(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    kv = vllm_kv_config(
        "bench-vllm-multi-round-qa",
        spec["chunk_size"],
        [spec["tier"]],
        save_decode_tokens=spec["save_decode_tokens"],
        lookup_budget=5.0,  # two busy cores: a file:// lookup must not turn into a miss
    )
    llm = vllm_llm(spec, kv, disable_log_stats=False)
    params = SamplingParams(max_tokens=spec["answer_tokens"], temperature=0.0, detokenize=False, ignore_eos=True)
    histories = [list(spec["system"]) for _ in range(spec["users"])]
    runs = []
    for r in range(spec["rounds"]):
        for u in range(spec["users"]):
            prompt = histories[u] + spec["questions"][u][r]
            llm.reset_prefix_cache()
            before = _loaded_tokens(llm)
            out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
            answer = list(out[0].outputs[0].token_ids)
            loaded = _loaded_tokens(llm) - before
            runs.append({"user": u, "round": r, "prompt_tokens": len(prompt), "loaded": int(loaded), "answer": answer})
            histories[u] = prompt + answer
    llm.llm_engine.engine_core.shutdown()
    return {"runs": runs}


# -- parent (the lmcache CLI) ------------------------------------------------------------------


def _per_round(runs: list[dict[str, Any]], rounds: int) -> dict[str, dict[str, float]]:
    out = {}
    for r in range(rounds):
        sel = [x for x in runs if x["round"] == r]
        prompt = sum(x["prompt_tokens"] for x in sel)
        out[str(r + 1)] = {"prompt_tokens": prompt, "loaded": sum(x["loaded"] for x in sel)}
        out[str(r + 1)]["hit_rate"] = out[str(r + 1)]["loaded"] / prompt if prompt else 0.0
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Chat twice (save_decode_tokens on, off); return the JSON-ready result."""
    from transformers import AutoTokenizer

    from lmcache.bench.realmodel import real_text_tokens, smollm2_checkpoint

    python = args.vllm_python
    check_vllm_python(python)
    model_dir = Path(args.model) if args.model else smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(model_dir)
    n_q = args.question_tokens
    pool = real_text_tokens(tok, args.system_tokens + n_q * args.users * args.rounds, source="Apache-2.0")
    system, rest = pool[: args.system_tokens], pool[args.system_tokens :]
    questions = [
        [rest[(u * args.rounds + r) * n_q : (u * args.rounds + r + 1) * n_q] for r in range(args.rounds)]
        for u in range(args.users)
    ]
    max_len = args.system_tokens + args.rounds * (n_q + args.answer_tokens) + 16
    results = {}
    with tempfile.TemporaryDirectory(prefix="lmcache-bench-vllm-chat-") as tmp:
        work = Path(tmp)
        for save in (True, False):
            spec = {
                "model": str(model_dir),
                "max_model_len": max_len,
                "block_size": args.block_size,
                "chunk_size": args.chunk_size,
                "tier": args.tier or f"file://{work / f'tier-{save}'}",
                "save_decode_tokens": save,
                "system": system,
                "questions": questions,
                "users": args.users,
                "rounds": args.rounds,
                "answer_tokens": args.answer_tokens,
            }
            out = call_vllm_child(python, __name__, [], spec, workdir=work, name=f"save-decode-{save}")
            later = [x for x in out["runs"] if x["round"] > 0]
            results["on" if save else "off"] = {
                "per_round": _per_round(out["runs"], args.rounds),
                "turn2plus_hit_rate": sum(x["loaded"] for x in later) / max(1, sum(x["prompt_tokens"] for x in later)),
                "runs": out["runs"],
            }
    same = [x["answer"] for x in results["on"]["runs"]] == [x["answer"] for x in results["off"]["runs"]]
    return {
        "workload": "multi-round-qa (vLLM)",
        "machine": machine_info(),
        "parameters": {
            "users": args.users,
            "rounds": args.rounds,
            "system_tokens": args.system_tokens,
            "question_tokens": args.question_tokens,
            "answer_tokens": args.answer_tokens,
            "model": str(model_dir),
            "chunk_size": args.chunk_size,
            "block_size": args.block_size,
        },
        "save_decode_tokens": results,
        "outputs_match": same,
    }


def run_cli(args: argparse.Namespace) -> int:
    """Print the per-round hit rates with and without save_decode_tokens and write JSON."""
    result = run(args)
    on, off = result["save_decode_tokens"]["on"], result["save_decode_tokens"]["off"]
    rows = [
        [int(r), v["prompt_tokens"], v["hit_rate"], off["per_round"][r]["hit_rate"]] for r, v in on["per_round"].items()
    ]
    rows.append(["≥2", None, on["turn2plus_hit_rate"], off["turn2plus_hit_rate"]])
    p = result["parameters"]
    title = (
        f"multi-round-qa --vllm (SmolLM2, chunk {p['chunk_size']}, block {p['block_size']}): {p['users']} users x "
        f"{p['rounds']} rounds, answers {p['answer_tokens']} tokens; share of prompt tokens loaded from lmcache; "
        f"answers identical in both runs: {'yes' if result['outputs_match'] else 'NO'}"
    )
    headers = ["round", "prompt tokens", "hit rate, save_decode_tokens", "hit rate, prompts only"]
    print(render_table(headers, rows, title=title))
    path = write_json(args.json or default_json_path("multi-round-qa", "vllm"), result)
    print(f"JSON: {path}")
    return 0 if result["outputs_match"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2:], {"chat": _chat}))
    sys.exit("run through `lmcache bench multi-round-qa --vllm`")
