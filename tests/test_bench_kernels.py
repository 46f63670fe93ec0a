"""``lmcache bench kernels`` runs for every layout (issue: packed vLLM layouts crashed with KeyError)."""

from __future__ import annotations

import json

import pytest

from lmcache.bench.kernels import bench_kernels
from lmcache.cli import main
from lmcache.layouts import LAYOUTS, KVGeometry, get_layout


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_runs_and_reports_its_geometry(layout: str) -> None:
    result = bench_kernels(layout=layout, layers=2, heads=2, head_dim=8, chunk_tokens=32, block_size=8, repeat=1)
    mla = get_layout(layout).is_mla
    geo = KVGeometry(2, 1 if mla else 2, 8, "bfloat16", is_mla=mla)
    p = result["params"]
    assert p["layout"] == layout
    assert p["geometry"] == geo.identity
    assert p["chunk_bytes"] == geo.chunk_nbytes(32)
    assert set(result["median"]) == {"gather_s", "scatter_s", "numpy_copy_s", "numpy_copy_cold_s"}
    assert all(result["gbps"][k] > 0 for k in ("gather", "scatter", "numpy_copy", "numpy_copy_cold"))


@pytest.mark.parametrize("layout", ["vllm_cpu_vec", "vllm_paged", "vllm_mla"])
def test_cli_writes_json_for_packed_layouts(layout: str, tmp_path, capsys) -> None:
    path = tmp_path / "k.json"
    argv = ["bench", "kernels", "--layout", layout, "--layers", "2", "--heads", "2", "--head-dim", "8"]
    argv += ["--chunk-tokens", "16", "--block-size", "8", "--repeat", "1", "--threads", "1", "--json", str(path)]
    assert main(argv) == 0
    data = json.loads(path.read_text())
    assert data["workload"] == "kernels"
    assert data["params"]["layout"] == layout
    assert data["params"]["torch_threads"] == 1
    assert {"gather", "scatter"} <= set(data["ratio_vs_numpy_copy"])
    assert "results:" in capsys.readouterr().out
