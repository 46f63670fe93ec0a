"""``lmcache bench vllm-mixed``: hits and misses submitted together to vLLM-CPU, with a slow tier.

Each round submits P requests that hit a cached prefix (a ``--hit-tokens`` document stored
through the connector before the rounds, plus a new question) and P fresh prompts that miss, all
at once and interleaved (hit, miss, hit, …), to one vLLM-CPU engine driven step by step; vLLM's
prefix cache is reset before every round, so the hits are served by lmcache. TTFT is the time
from submission to the engine step that returned a request's first token. The tier is
``delay+memory://`` (:class:`~lmcache.bench.tier_faults.DelayBackend`), whose load delay is set per
round. Three runs:

* ``fast``: no delay (async loading on, the default);
* ``slow-async``: every load call waits ``--slow-delay`` seconds, async loading on: vLLM parks the
  hits while they load and runs the misses meanwhile;
* ``slow-sync``: the same slow tier with ``async_loading`` off: the load runs in the forward pass,
  so every request scheduled in that step waits for it.

``fast`` and ``slow-async`` are rounds of one vLLM process, alternating A B B A A B… (a shared
host's load drifts over minutes; both see it alike); ``slow-sync`` replays the same rounds in a
process of its own. Each process starts with ``--warmup-rounds`` uncounted rounds: the first round
after the documents were stored is slow in every run, and counted it would land on ``fast``.
Reported per run: p50/p90 TTFT of the misses and of the hits, the load calls that waited, the
tokens the connector loaded (per process, warm-up included), and whether every request's greedy
output equals the same request's in the other process. The goal: the misses' p50 TTFT in
``slow-async`` within 10% of ``fast``.

vLLM runs in its own venv (``--vllm-python``; see docs/vllm.md), as
``python -m lmcache.bench.qa.vllm_mixed --child SPEC``; tests/vllm/test_slow_tier.py drives the
same child.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lmcache.bench import non_negative_int, positive_int
from lmcache.bench.qa.common import (
    call_vllm_child,
    check_vllm_python,
    child_main,
    make_random_llama,
    stats_dir_totals,
    vllm_kv_config,
    vllm_llm,
    vllm_model_dir,
)
from lmcache.bench.report import default_json_path, machine_info, percentile, ratio, render_table, write_json

__all__ = [
    "DESCRIPTION",
    "GOAL_MISS_P50_RATIO",
    "RUNS",
    "add_parser",
    "assemble",
    "run",
    "run_child",
    "run_cli",
    "run_entry",
    "summarize",
    "table",
    "workload",
]

DESCRIPTION = "TTFT of misses and hits submitted together in vLLM-CPU, with a fast tier and a slow one"
#: The runs, in order: name → (slow tier, async loading).
RUNS: dict[str, tuple[bool, bool]] = {"fast": (False, True), "slow-async": (True, True), "slow-sync": (True, False)}
#: The goal: misses' p50 TTFT with the slow tier and async loading at most this times the fast run's.
GOAL_MISS_P50_RATIO = 1.10
MODEL_ID = "bench-vllm-mixed"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench vllm-mixed``."""
    p = sub.add_parser("vllm-mixed", help=DESCRIPTION, description=__doc__)
    p.add_argument("--pairs", type=positive_int, default=2, help="hits and misses per round (P of each)")
    p.add_argument("--rounds", type=positive_int, default=3, help="rounds per run (fresh misses each round)")
    p.add_argument(
        "--warmup-rounds",
        type=non_negative_int,
        default=1,
        help="uncounted rounds (no delay) at the start of each vLLM process: the first round after the "
        "documents were stored is slow in every run (default 1)",
    )
    p.add_argument("--hit-tokens", type=positive_int, default=4096, help="tokens of each cached document")
    p.add_argument("--question-tokens", type=positive_int, default=32, help="new tokens after a hit's document")
    p.add_argument("--miss-tokens", type=positive_int, default=1024, help="tokens of each fresh (missing) prompt")
    p.add_argument("--max-tokens", type=positive_int, default=4, help="greedy tokens generated per request")
    p.add_argument("--slow-delay", type=_seconds, default=0.2, help="seconds the slow tier adds to each load call")
    p.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (SmolLM2-135M-Instruct on real text), 'random' (a random Llama on random tokens) "
        "or a local checkpoint directory",
    )
    p.add_argument("--layers", type=positive_int, default=12, help="layers of the random Llama")
    p.add_argument("--hidden", type=positive_int, default=768, help="hidden size of the random Llama (head dim 64)")
    p.add_argument("--vocab", type=positive_int, default=32000, help="vocabulary size of the random Llama")
    p.add_argument("--chunk-size", type=positive_int, default=256, help="lmcache chunk size")
    p.add_argument("--block-size", type=positive_int, default=128, help="vLLM block size (a multiple of 32 on CPU)")
    p.add_argument(
        "--runs",
        default=",".join(RUNS),
        type=_run_names,
        help=f"comma-separated runs (default all: {', '.join(RUNS)})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of the vLLM-CPU venv")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 seconds or more, got {text}")
    return value


def _run_names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown runs {unknown} (known: {', '.join(RUNS)})")
    return names


# -- child (runs in the vLLM venv) -------------------------------------------------------------


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Store the documents, then submit each round's requests at once and step the engine.

    ``spec``: ``model``, ``max_model_len``, ``block_size``, ``max_tokens``, ``store`` (token lists
    stored first), ``rounds`` (lists of ``{"id", "kind", "tokens"}``), and, for a run with the
    connector (``connector`` true), ``chunk_size``, ``tier``, ``async_loading``, ``stats_dir``.

    Returns:
        Per round and request: ``submit_t``, ``first_t``, ``finish_t`` (``time.monotonic()``,
        shared with a :class:`~lmcache.bench.tier_faults.DelayBackend` log), ``ttft_s`` and the
        generated ``tokens``; also vLLM's ``max_num_batched_tokens``.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    kv = None
    if spec["connector"]:
        kv = vllm_kv_config(
            MODEL_ID,
            spec["chunk_size"],
            [spec["tier"]],
            stats_dir=spec["stats_dir"],
            async_loading=spec["async_loading"],
            # Lookups are not slowed (only loads are); a generous budget keeps a busy host's lookup a hit.
            lookup_budget=5.0,
        )
    llm = vllm_llm(spec, kv)
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, detokenize=False, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], one, use_tqdm=False)  # one-time costs
    t0 = time.perf_counter()
    if spec["store"]:
        llm.generate([TokensPrompt(prompt_token_ids=t) for t in spec["store"]], one, use_tqdm=False)
        time.sleep(1.0)  # the connector's puts land asynchronously
    store_s = time.perf_counter() - t0
    rounds = []
    for r, requests in enumerate(spec["rounds"]):
        if spec.get("delay_control"):
            # The slow tier's delay for this round (read by the tier at each load).
            tmp = Path(spec["delay_control"] + ".tmp")
            tmp.write_text(str(spec["round_delays"][r]))
            tmp.replace(spec["delay_control"])
        llm.reset_prefix_cache()
        submit = time.monotonic()
        for req in requests:
            engine.add_request(f"r{r}-{req['id']}", TokensPrompt(prompt_token_ids=req["tokens"]), params)
        first: dict[str, float] = {}
        done: dict[str, tuple[float, list[int]]] = {}
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.monotonic()
            for out in outs:
                if out.request_id not in first and out.outputs and out.outputs[0].token_ids:
                    first[out.request_id] = now
                if out.finished:
                    done[out.request_id] = (now, list(out.outputs[0].token_ids))
        rounds.append(
            [
                {
                    "round": r,
                    "id": req["id"],
                    "kind": req["kind"],
                    "prompt_tokens": len(req["tokens"]),
                    "submit_t": submit,
                    "first_t": first[f"r{r}-{req['id']}"],
                    "finish_t": done[f"r{r}-{req['id']}"][0],
                    "ttft_s": first[f"r{r}-{req['id']}"] - submit,
                    "tokens": done[f"r{r}-{req['id']}"][1],
                }
                for req in requests
            ]
        )
    batched = int(llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)
    engine.engine_core.shutdown()
    return {"rounds": rounds, "store_s": store_s, "max_num_batched_tokens": batched}


# -- parent (the lmcache CLI) ------------------------------------------------------------------


def workload(
    args: argparse.Namespace, model_dir: Path | None, rounds: int | None = None
) -> tuple[list[list[int]], list[list[dict[str, Any]]]]:
    """The documents to store and each round's requests (hits and misses interleaved).

    ``rounds`` defaults to ``--rounds``; every round has fresh misses and fresh questions.
    """
    import random

    n_rounds = args.rounds if rounds is None else rounds
    rng = random.Random(args.seed)
    n_miss = args.pairs * n_rounds
    q = args.question_tokens
    if model_dir is None:

        def draw(n: int) -> list[int]:
            return [rng.randrange(1, args.vocab) for _ in range(n)]

        docs = [draw(args.hit_tokens) for _ in range(args.pairs)]
        misses = [draw(args.miss_tokens) for _ in range(n_miss)]
        questions = [draw(q) for _ in range(n_miss)]
    else:
        from transformers import AutoTokenizer

        from lmcache.bench.realmodel import real_documents, real_text_tokens

        tok = AutoTokenizer.from_pretrained(model_dir)
        # Distinct documents: the first P are stored (the hits' prefixes), the others start the
        # misses, so no miss shares a first chunk with a stored document or with another miss.
        length = max(args.hit_tokens, args.miss_tokens)
        texts = real_documents(tok, args.pairs + n_miss, length)
        docs = [t[: args.hit_tokens] for t in texts[: args.pairs]]
        misses = [t[: args.miss_tokens] for t in texts[args.pairs :]]
        pool = real_text_tokens(tok, q * n_miss, source="Apache-2.0")
        questions = [pool[i * q : (i + 1) * q] for i in range(n_miss)]
    out = []
    for r in range(n_rounds):
        reqs = []
        for i in range(args.pairs):
            k = r * args.pairs + i
            reqs.append({"id": f"hit{i}", "kind": "hit", "tokens": docs[i] + questions[k]})
            reqs.append({"id": f"miss{i}", "kind": "miss", "tokens": misses[k]})
        out.append(reqs)
    return docs, out


def summarize(runs: list[list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    """p50/p90 TTFT (seconds) of the requests of ``kind`` ("hit" or "miss") over all rounds."""
    ttfts = [r["ttft_s"] for rnd in runs for r in rnd if r["kind"] == kind]
    return {"p50_s": percentile(ttfts, 50), "p90_s": percentile(ttfts, 90), "n": len(ttfts)}


def round_labels(runs: list[str], rounds: int) -> list[str]:
    """Which run each round of the async-loading process belongs to.

    ``fast`` and ``slow-async`` share one vLLM process (the slow tier's delay is switched per
    round), in the order A B B A A B …, so load that drifts over minutes on a shared host hits
    both alike. ``slow-sync`` runs every round in a process of its own.
    """
    both = [n for n in ("fast", "slow-async") if n in runs]
    if len(both) < 2:
        return [both[0] if both else "slow-sync"] * rounds
    return [both[0] if i % 4 in (0, 3) else both[1] for i in range(2 * rounds)]


#: The label of the uncounted rounds each process starts with (``--warmup-rounds``).
WARMUP = "warmup"


def process_plan(args: argparse.Namespace) -> list[tuple[str, bool, list[str], list[float]]]:
    """Per vLLM process: its name, whether it loads asynchronously, each round's run and delay.

    Every process starts with ``--warmup-rounds`` rounds labelled :data:`WARMUP` (no delay, not
    counted), then its counted rounds: ``fast`` and ``slow-async`` alternating in one process,
    ``slow-sync`` in its own.
    """
    warm = [WARMUP] * args.warmup_rounds
    labels = round_labels(args.runs, args.rounds)
    plan = []
    if any(n in args.runs for n in ("fast", "slow-async")):
        # The tier reads its delay per load from a control file the child rewrites per round.
        delays = [0.0 if lab == "fast" else args.slow_delay for lab in labels]
        plan.append(("async", True, warm + labels, [0.0] * len(warm) + delays))
    if "slow-sync" in args.runs:
        plan.append(
            ("sync", False, warm + ["slow-sync"] * len(labels), [0.0] * len(warm) + [args.slow_delay] * len(labels))
        )
    return plan


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen runs on the same prompts; return the JSON-ready result."""
    from lmcache.bench.tier_faults import delay_plugin_dir, read_delay_log

    check_vllm_python(args.vllm_python)
    model_dir = vllm_model_dir(args.model)
    processes = process_plan(args)
    docs, rounds = workload(args, model_dir, max(len(labels) for _, _, labels, _ in processes))
    longest = max(args.hit_tokens + args.question_tokens, args.miss_tokens)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lmcache-bench-vllm-mixed-") as tmp:
        work = Path(tmp)
        plugins = delay_plugin_dir(work / "plugins")
        base = {
            "model": str(model_dir or work / "model"),
            "seed": args.seed,
            "layers": args.layers,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "max_model_len": longest + args.max_tokens + 16,
            "block_size": args.block_size,
            "max_tokens": args.max_tokens,
            "store": docs,
            "rounds": rounds,
            "connector": True,
            "chunk_size": args.chunk_size,
        }
        if model_dir is None:
            call_vllm_child(args.vllm_python, __name__, ["make-model"], base, workdir=work, name="make-model")
        for proc, async_loading, proc_labels, delays in processes:
            log, control = work / f"delay-{proc}.jsonl", work / f"delay-{proc}.control"
            stats_dir = work / f"stats-{proc}"
            tier = f"delay+memory://?capacity=4GiB&get_delay={args.slow_delay}&delay_log={log}&delay_control={control}"
            spec = {
                **base,
                "tier": tier,
                "async_loading": async_loading,
                "stats_dir": str(stats_dir),
                "delay_control": str(control),
                "round_delays": delays,
            }
            out = call_vllm_child(
                args.vllm_python,
                __name__,
                ["run"],
                spec,
                workdir=work,
                name=proc,
                # The slow tier is a plugin scheme (delay+memory) found through the child's path.
                env={"PYTHONPATH": os.pathsep.join(filter(None, (plugins, os.environ.get("PYTHONPATH"))))},
            )
            events = read_delay_log(log)
            stats = stats_dir_totals(stats_dir, ("matched_tokens", "loaded_tokens", "load_failures"))
            shown = tier.partition("&delay_log=")[0]
            for name in dict.fromkeys(proc_labels):
                if name == WARMUP:
                    continue
                mine = [i for i, lab in enumerate(proc_labels) if lab == name]
                slow = name != "fast"
                part = {**out, "rounds": [out["rounds"][i] for i in mine]}
                # A load belongs to the round it started in (rounds do not overlap).
                windows = [(out["rounds"][i][0]["submit_t"], _round_end(out["rounds"][i])) for i in mine]
                own = [e for e in events if any(a <= e["t"] <= b for a, b in windows)]
                results[name] = run_entry(
                    shown if slow else shown.replace(f"get_delay={args.slow_delay}", "get_delay=0"),
                    async_loading,
                    part,
                    own,
                    stats,
                )
    return assemble(args, {n: results[n] for n in args.runs if n in results})


def _round_end(requests: list[dict[str, Any]]) -> float:
    return max(r["finish_t"] for r in requests)


def run_entry(
    tier: str,
    async_loading: bool,
    out: dict[str, Any],
    events: list[dict[str, Any]],
    connector_stats: dict[str, int],
) -> dict[str, Any]:
    """One run's JSON entry from its child's result, its slow tier's log and its connector counters.

    The connector counters are those of the whole process (``fast`` and ``slow-async`` share one).
    """
    return {
        "tier": tier,
        "async_loading": async_loading,
        "miss": summarize(out["rounds"], "miss"),
        "hit": summarize(out["rounds"], "hit"),
        "slow_load_calls": sum(1 for e in events if e["event"] == "start" and e.get("delay", 1) > 0),
        "connector_stats": connector_stats,
        "store_s": out["store_s"],
        "max_num_batched_tokens": out["max_num_batched_tokens"],
        "rounds": out["rounds"],
    }


def assemble(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The whole result: the runs (outputs compared with the first run's), the goal and its verdict."""
    # Requests are named by (round, id) in every run; the first run that has one is its reference.
    want: dict[tuple[int, str], list[int]] = {}
    for res in results.values():
        for i, rnd in enumerate(res["rounds"]):
            for r in rnd:
                want.setdefault((r.get("round", i), r["id"]), r["tokens"])
    for res in results.values():
        res["outputs_match"] = all(
            r["tokens"] == want[(r.get("round", i), r["id"])] for i, rnd in enumerate(res["rounds"]) for r in rnd
        )
    goal: dict[str, Any] = {"miss_p50_ratio_at_most": GOAL_MISS_P50_RATIO}
    if "fast" in results and "slow-async" in results:
        goal["miss_p50_ratio"] = ratio(results["slow-async"]["miss"]["p50_s"], results["fast"]["miss"]["p50_s"])
        goal["met"] = goal["miss_p50_ratio"] is not None and goal["miss_p50_ratio"] <= GOAL_MISS_P50_RATIO
    if "fast" in results and "slow-sync" in results:
        goal["sync_miss_p50_ratio"] = ratio(results["slow-sync"]["miss"]["p50_s"], results["fast"]["miss"]["p50_s"])
    return {
        "workload": "vllm-mixed",
        "params": {k: v for k, v in vars(args).items() if k not in ("func", "json")},
        "model": args.model,
        "machine": machine_info(),
        "runs": results,
        "goal": goal,
        "outputs_match": all(r["outputs_match"] for r in results.values()),
    }


def table(result: dict[str, Any]) -> str:
    """The result as a text table."""
    rows = []
    for name, res in result["runs"].items():
        rows.append(
            [
                name,
                res["miss"]["p50_s"],
                res["miss"]["p90_s"],
                res["hit"]["p50_s"],
                res["hit"]["p90_s"],
                res["slow_load_calls"],
                res["connector_stats"].get("loaded_tokens", 0),
                "yes" if res["outputs_match"] else "NO",
            ]
        )
    p = result["params"]
    title = (
        f"vllm-mixed ({result['model']}, chunk {p['chunk_size']}, block {p['block_size']}): {p['rounds']} rounds of "
        f"{p['pairs']} hits ({p['hit_tokens']}-token cached document + {p['question_tokens']}) and {p['pairs']} "
        f"misses ({p['miss_tokens']} tokens) submitted together; TTFT in s; slow tier +{p['slow_delay']:g} s per load"
    )
    headers = [
        "run",
        "miss p50",
        "miss p90",
        "hit p50",
        "hit p90",
        "slow load calls",
        "tokens loaded",
        "outputs match",
    ]
    goal = result["goal"]
    verdict = ""
    if "miss_p50_ratio" in goal:
        verdict = (
            f"\ngoal: misses' p50 slow-async / fast = {goal['miss_p50_ratio']:.3f} (at most "
            f"{goal['miss_p50_ratio_at_most']:.2f}): {'met' if goal['met'] else 'NOT met'}"
        )
    if "sync_miss_p50_ratio" in goal:
        verdict += f"; slow-sync / fast = {goal['sync_miss_p50_ratio']:.3f}"
    return render_table(headers, rows, title=title) + verdict


def run_cli(args: argparse.Namespace) -> int:
    """``lmcache bench vllm-mixed``: print the table and write JSON."""
    result = run(args)
    print(table(result))
    path = write_json(args.json or default_json_path("vllm-mixed", "cpu"), result)
    print(f"JSON: {path}")
    return 0 if result["outputs_match"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2:], {"run": run_child, "make-model": make_random_llama}))
    sys.exit("run through `lmcache bench vllm-mixed`")
