"""``lmcache bench vllm-pd`` without vLLM: the raw baseline over a real tier, the summary and the table.

The vLLM runs themselves are exercised by ``tests/vllm/test_pd.py`` (same servers, proxy and
counters); here the parts that turn counters and timings into the report.
"""

from __future__ import annotations

import argparse

from lmcache.bench.qa.vllm_pd import GOAL_TRANSFER_RATIO, add_parser, assemble, raw_copy, table


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["vllm-pd", "--requests", "2", "--prompt-tokens", "300", "--chunk-size", "256"])


def test_raw_copy_round_trips_the_bytes_over_a_tier() -> None:
    raw = raw_copy("memory://?capacity=64MiB", [1 << 20, 300_000], repeats=2)
    assert raw["bytes"] == (1 << 20) + 300_000
    assert raw["gbps"] > 0 and raw["put_s"] > 0 and raw["get_s"] > 0


def test_assemble_reports_the_transfer_against_the_raw_copy() -> None:
    reqs = [{"ttft_s": 1.0, "itl_s": 0.1, "tokens": [1, 2]}, {"ttft_s": 2.0, "itl_s": 0.3, "tokens": [3]}]
    counters = {
        "prefill": {"pd_transfers_sent": 2, "pd_sent_bytes": 2_000_000_000, "pd_send_us": 1_000_000},
        "decode": {"pd_transfers_received": 2, "pd_load_us": 1_000_000, "pd_wait_us": 200_000},
    }
    raw = {"bytes": 1_000_000_000, "put_s": 0.5, "get_s": 0.5, "gbps": 1.0}
    result = assemble(_args(), reqs, reqs, counters, raw)
    transfer = result["transfer"]
    assert transfer["bytes"] == 1e9 and transfer["send_s"] == 0.5 and transfer["load_s"] == 0.5
    assert transfer["gbps"] == 1.0 and transfer["wait_s"] == 0.1
    assert result["goal"]["transfer_ratio"] == 1.0 and result["goal"]["met"] is True
    assert GOAL_TRANSFER_RATIO == 0.70
    assert result["outputs_match"] is True
    assert result["runs"]["1p1d"]["ttft_mean_s"] == 1.5
    text = table(result)
    assert "transfer vs raw" in text and "met" in text
    mismatch = assemble(_args(), reqs, [reqs[1], reqs[0]], counters, raw)
    assert mismatch["outputs_match"] is False and "outputs 1p1d = colocated: NO" in table(mismatch)
