"""One offline vLLM (``kv_both``) plays prefill and decode instance in turn; run by test_pd.py in the vLLM venv.

Usage::

    python pd_driver.py SPEC_JSON

For every prompt of ``spec["prompts"]`` it first runs the prefill half of vLLM's PD protocol
(``max_tokens=1``, ``kv_transfer_params: {"do_remote_decode": true}``), keeps the
``kv_transfer_params`` the request finished with, then (vLLM's prefix cache off, so nothing is
found locally) runs the decode half with those params and ``spec["max_tokens"]`` greedy tokens.
Prints ``RESULT {"tokens": [...], "params": [...]}``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv = KVTransferConfig(
        kv_connector="LMCacheConnectorV1",
        kv_role="kv_both",
        kv_connector_module_path="lmcache.integrations.vllm",
        kv_load_failure_policy="fail",  # a transfer that does not load must show, not be recomputed
        kv_connector_extra_config=spec["extra"],
    )
    llm = LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        max_model_len=spec.get("max_model_len", 2048),
        enforce_eager=True,
        gpu_memory_utilization=0.1,
        dtype="float32",
        block_size=spec.get("block_size", 32),
        enable_prefix_caching=False,
        kv_transfer_config=kv,
        seed=0,
    )
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    prefill = [
        SamplingParams(
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            extra_args={"kv_transfer_params": {"do_remote_decode": True}},
        )
        for _ in prompts
    ]
    params = [o.kv_transfer_params for o in llm.generate(prompts, prefill, use_tqdm=False)]
    decode = [
        SamplingParams(
            max_tokens=spec["max_tokens"],
            temperature=0.0,
            detokenize=False,
            extra_args={"kv_transfer_params": dict(p or {})},
        )
        for p in params
    ]
    outs = llm.generate(prompts, decode, use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "params": params}


def main() -> None:
    result = run(json.loads(sys.argv[1]))
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    if os.environ.get("DRIVER_HARD_EXIT"):
        os._exit(0)


if __name__ == "__main__":
    main()
