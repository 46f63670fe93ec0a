"""Where cachegen's remaining bits could come from: a study on SmolLM2 KV (issue 21's 6x goal).

Cachegen (body version 3) codes SmolLM2's KV at ~3.18 bits per value at int4's quality; 6x needs
~2.67. This script measures, on held-out documents, how much each known lever could give:

* **Transforms** (no model quality involved, Gaussian high-rate estimates, bits per value):
  a per-head KLT fitted on other documents; one step per head instead of one per channel for
  values; key steps weighted by the model's real query energy per channel.
* **Token importance** (simulated quantizer = cachegen's steps, RoPE, centring and precise tokens,
  with a step factor per (layer, part, token, head); rate = empirical entropy per layer-part
  table + 0.15 bit of side data; quality = the bench's KL and top-1 over each document's
  question and 32 greedy tokens): step factors from the attention the continuation actually
  pays (an oracle, from the same question and from another document's question), from a
  calibrated mean query, and from key or value norms (no model needed).

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/cachegen_headroom.py [--first-doc 32]
[--docs 4] [--json out.json]`` (about 3 minutes on 2 cores). Figures: docs/codecs.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lmcache.bench import codec as bc
from lmcache.bench.realmodel import real_documents
from lmcache.serde import cachegen as cg
from lmcache.serde.codec import ChunkGeometry

CHUNK = 256
THETA = 1e5  # SmolLM2's RoPE base (cachegen's encoder finds the same)
Factor = Callable[[int, int], np.ndarray]  # (document, chunk) -> [L, P, CHUNK, H] step factors


def _entropy_bits(sym: np.ndarray) -> float:
    """Bits of the rows of ``sym`` (one frequency table per row) at their empirical entropy."""
    total = 0.0
    for row in sym:
        _, counts = np.unique(row, return_counts=True)
        total += float(-(counts * np.log2(counts / counts.sum())).sum())
    return total


def _unrotate(x: np.ndarray, dim: int, sign: float) -> np.ndarray:
    cos, sin = cg.rope_tables(x.shape[1], dim, THETA)
    return cg._rotate(x, cos, sign * sin, dim)


def simulate_chunk(x: np.ndarray, g: ChunkGeometry, fac: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Quantize one chunk ``[L, P, T, H, D]`` like cachegen, steps times ``fac``; (reconstruction, bits)."""
    L, P, T, H, D = x.shape
    lp, hd = L * P, H * D
    y = x.reshape(lp, T, hd).copy()
    y[::2] = _unrotate(y[::2], D, -1.0)
    precise = np.zeros(T, bool)
    precise[cg._outlier_tokens(y)] = True
    mean = cg._f16s(y[:, ~precise].mean(axis=1))
    resid = y - mean[:, None]
    std = np.sqrt((resid[:, ~precise] ** 2).mean(axis=1))
    step = np.broadcast_to(cg._steps(std, g, cg.DEFAULT_BITS)[:, None], (lp, T, hd)).copy()
    if fac is not None:
        step = (step.reshape(L, P, T, H, D) * fac[..., None]).reshape(lp, T, hd)
    q = np.clip(np.rint(resid / step), -127, 127)
    rec = q * step + mean[:, None]
    rec[:, precise] = y[:, precise]  # 8-bit codes in the codec; exact here, costed at 8 bits
    bits = _entropy_bits(q[:, ~precise].reshape(lp, -1).astype(np.int16)) + 8.0 * precise.sum() * lp * hd
    rec[::2] = _unrotate(rec[::2], D, 1.0)
    return rec.reshape(L, P, T, H, D), bits


class Study:
    """Held-out documents with their raw continuation logits, and the model to judge codecs with."""

    def __init__(self, first_doc: int, docs: int) -> None:
        torch.set_num_threads(2)
        self.model, self.tok = bc._load_smollm2()
        texts = real_documents(self.tok, first_doc + 2 * docs + 8, 1024)[first_doc:]
        self.docs = texts[:docs]
        self.calibration = texts[2 * docs :]  # other documents: fits, calibrations
        self.ref: list[tuple[list[bytes], tuple[int, ...], list[int], torch.Tensor]] = []
        for ids, question in zip(self.docs, texts[docs : 2 * docs], strict=True):
            kv = bc._kv_of(self.model, ids)
            chunks = bc._chunks(kv, CHUNK)
            raw = bc._from_chunks(chunks, tuple(kv.shape))
            tokens = question[:32] + bc._greedy(self.model, raw, question[:32], 32)
            self.ref.append((chunks, tuple(kv.shape), tokens, bc._continuation_logits(self.model, raw, tokens)))
        cfg = self.model.config
        self.L, self.H, self.Hq = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads
        self.D = cfg.hidden_size // self.Hq

    def kv(self, d: int) -> np.ndarray:
        chunks, shape, _, _ = self.ref[d]
        return bc._from_chunks(chunks, shape).float().numpy()

    def simulate(self, factor: Factor | None) -> dict[str, float]:
        """Bits per value, mean KL and top-1 over every document with step factors from ``factor``."""
        bits = values = 0.0
        kls: list[float] = []
        agree: list[bool] = []
        for d, (_chunks, shape, tokens, ref_logits) in enumerate(self.ref):
            L, P, T, H, D = shape
            g = ChunkGeometry(L, P, CHUNK, H, D, "bfloat16")
            kv = self.kv(d)
            out = kv.copy()
            for c in range(T // CHUNK):
                sl = slice(c * CHUNK, (c + 1) * CHUNK)
                rec, b = simulate_chunk(kv[:, :, sl], g, factor(d, c) if factor else None)
                out[:, :, sl] = rec
                bits += b
                values += rec.size
            kl, ok, _ = bc._quality(self.model, None, torch.from_numpy(out).to(torch.bfloat16), tokens, ref_logits)
            kls += kl
            agree += ok
        per_value = bits / values + 0.15
        return {"bits": per_value, "ratio": 16 / per_value, "kl": float(np.mean(kls)), "top1": float(np.mean(agree))}

    def queries(self, docs: list[list[int]]) -> list[np.ndarray]:
        """Pre-RoPE queries ``[tokens, Hq, D]`` per layer over ``docs``."""
        got: dict[int, list[torch.Tensor]] = {}

        def hook(i: int) -> Callable[..., None]:
            def f(_mod: Any, _inp: Any, out: torch.Tensor) -> None:
                got.setdefault(i, []).append(out[0].detach().float())

            return f

        handles = [
            layer.self_attn.q_proj.register_forward_hook(hook(i)) for i, layer in enumerate(self.model.model.layers)
        ]
        try:
            for ids in docs:
                bc._kv_of(self.model, ids)
        finally:
            for h in handles:
                h.remove()
        return [torch.cat(got[i]).numpy().reshape(-1, self.Hq, self.D) for i in range(self.L)]

    def attention_importance(self, d: int, tokens: list[int]) -> np.ndarray:
        """Mean squared attention ``[L, T, H]`` that ``tokens`` (after document ``d``) pay its tokens."""
        chunks, shape, _, _ = self.ref[d]
        kv = bc._from_chunks(chunks, shape)
        self.model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                out = self.model(
                    torch.tensor([tokens]),
                    past_key_values=bc._cache(self.model, kv),
                    use_cache=True,
                    output_attentions=True,
                )
        finally:
            self.model.set_attn_implementation("sdpa")
        T = shape[2]
        imp = np.zeros((self.L, T, self.H))
        for layer, a in enumerate(out.attentions):
            w = (a[0, :, :, :T].float().numpy() ** 2).mean(axis=1)  # [Hq, T]
            imp[layer] = w.reshape(self.H, self.Hq // self.H, T).sum(axis=1).T
        return imp

    def window_importance(self, d: int, window: int = 64) -> np.ndarray:
        """Mean squared attention ``[L, T, H]`` the document's own last ``window`` tokens pay its tokens.

        What an engine could hand the codec at prefill (SnapKV's observation window), no model
        calibration involved; the window's own tokens see only their past (causal).
        """
        ids = self.docs[d]
        self.model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                out = self.model(torch.tensor([ids]), output_attentions=True)
        finally:
            self.model.set_attn_implementation("sdpa")
        T = len(ids)
        imp = np.zeros((self.L, T, self.H))
        for layer, a in enumerate(out.attentions):
            w = (a[0, :, T - window :, :].float().numpy() ** 2).mean(axis=1)  # [Hq, T]
            imp[layer] = w.reshape(self.H, self.Hq // self.H, T).sum(axis=1).T
        return imp


def transform_gains(study: Study) -> dict[str, float]:
    """High-rate coding gains (bits per value) of a KLT, per-head value steps and query-weighted key steps."""
    fit = study.calibration
    fit_kv = [bc._kv_of(study.model, ids).float().numpy() for ids in fit]
    test_kv = [study.kv(d) for d in range(len(study.ref))]
    L, H, D = study.L, study.H, study.D

    def centred(kvs: list[np.ndarray], layer: int, part: int, head: int) -> np.ndarray:
        rows = []
        for kv in kvs:
            for c in range(kv.shape[2] // CHUNK):
                x = kv[layer, part, c * CHUNK : (c + 1) * CHUNK].reshape(1, CHUNK, H * D)
                if part == 0:
                    x = _unrotate(x, D, -1.0)
                x = x.reshape(CHUNK, H, D)[1:, head]  # the first token is precise in the codec
                rows.append(x - x.mean(axis=0))
        return np.concatenate(rows).astype(np.float64)

    q = study.queries(fit)
    klt = {0: [], 1: []}
    per_head_values, weighted_keys = [], []
    for layer in range(L):
        for head in range(H):
            for part in (0, 1):
                a, b = centred(fit_kv, layer, part, head), centred(test_kv, layer, part, head)
                var = b.var(axis=0) + 1e-12
                _, vecs = np.linalg.eigh(a.T @ a / len(a))
                lam = (b @ vecs).var(axis=0) + 1e-12
                klt[part].append(0.5 * np.mean(np.log2(var)) - 0.5 * np.mean(np.log2(lam)))
                if part == 1:
                    per_head_values.append(0.5 * np.log2(var.mean() / np.exp(np.log(var).mean())))
            group = q[layer][:, head * (study.Hq // H) : (head + 1) * (study.Hq // H)]
            w = (group**2).mean(axis=(0, 1))
            w = (w + np.roll(w, D // 2)) / 2  # a RoPE pair shares its rotation
            weighted_keys.append(0.5 * np.log2(w.mean() / np.exp(np.log(w).mean())))
    return {
        "klt_keys": float(np.mean(klt[0])),
        "klt_values": float(np.mean(klt[1])),
        "values_one_step_per_head": float(np.mean(per_head_values)),
        "keys_weighted_by_query_energy": float(np.mean(weighted_keys)),
    }


def predicted_query_importance(study: Study, window: int = 64) -> tuple[list[np.ndarray], list[float]]:
    """Importance ``[L, T, H]`` per document from queries predicted out of the chunk's own K and V.

    A per-layer least-squares map from ``[unrotated key, value, 1]`` to the pre-RoPE queries is fitted
    on the calibration documents (what a per-model calibration file would hold); in each chunk the
    last ``window`` predicted queries attend causally to the chunk's tokens (chunk-local positions),
    and a token's importance is the mean squared attention it gets. Returns it and the map's R^2.
    """
    L, H, Hq, D = study.L, study.H, study.Hq, study.D

    def features(kvs: list[np.ndarray]) -> list[np.ndarray]:  # per layer [tokens, 2 H D + 1]
        out = []
        for layer in range(L):
            rows = []
            for kv in kvs:
                T = kv.shape[2]
                k = _unrotate(kv[layer, 0].reshape(1, T, H * D), D, -1.0)[0]
                rows.append(np.concatenate([k, kv[layer, 1].reshape(T, H * D), np.ones((T, 1), np.float32)], 1))
            out.append(np.concatenate(rows).astype(np.float64))
        return out

    fit_x = features([bc._kv_of(study.model, ids).float().numpy() for ids in study.calibration])
    fit_q = study.queries(study.calibration)
    maps = []
    for layer in range(L):
        x, y = fit_x[layer], fit_q[layer].reshape(len(fit_x[layer]), -1).astype(np.float64)
        maps.append(np.linalg.solve(x.T @ x + 1e-2 * np.eye(x.shape[1]), x.T @ y))
    kvs = [study.kv(d) for d in range(len(study.ref))]
    test_x, test_q = features(kvs), study.queries(study.docs)
    r2 = []
    for layer in range(L):
        y = test_q[layer].reshape(len(test_x[layer]), -1)
        r2.append(float(1 - ((y - test_x[layer] @ maps[layer]) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()))
    cos, sin = cg.rope_tables(CHUNK, D, THETA)
    causal = np.tril(np.ones((CHUNK, CHUNK), bool))[CHUNK - window :]
    result, offset = [], 0
    for kv in kvs:
        T = kv.shape[2]
        imp = np.zeros((L, T, H))
        for layer in range(L):
            for c in range(T // CHUNK):
                x = test_x[layer][offset + c * CHUNK : offset + (c + 1) * CHUNK]
                q = _rotate_local((x @ maps[layer]).astype(np.float32), cos, sin, D).reshape(CHUNK, Hq, D)
                k = _rotate_local(x[:, : H * D].astype(np.float32), cos, sin, D).reshape(CHUNK, H, D)
                for j in range(Hq):
                    h = j // (Hq // H)
                    logits = np.where(causal, q[CHUNK - window :, j] @ k[:, h].T / np.sqrt(D), -np.inf)
                    a = np.exp(logits - logits.max(axis=1, keepdims=True))
                    imp[layer, c * CHUNK : (c + 1) * CHUNK, h] += ((a / a.sum(axis=1, keepdims=True)) ** 2).mean(0)
        result.append(imp)
        offset += T
    return result, r2


def _rotate_local(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, dim: int) -> np.ndarray:
    """RoPE at chunk-local positions on ``[T, heads * dim]`` (relative positions are what attention sees)."""
    return cg._rotate(x[None], cos, sin, dim)[0]


def factor_from(importance: list[np.ndarray], v_gamma: float, k_gamma: float, scale: float = 1.0) -> Factor:
    """Step factors ``scale * (w / geomean w) ** (-gamma / 2)`` per (layer, token, head), clamped to [1/8, 4]."""

    def f(d: int, c: int) -> np.ndarray:
        w = importance[d][:, c * CHUNK : (c + 1) * CHUNK]
        w = np.maximum(w, 1e-3 * w.mean(axis=1, keepdims=True))
        rel = w / np.exp(np.log(w).mean(axis=1, keepdims=True))
        fk = np.clip(rel ** (-k_gamma / 2), 0.125, 4.0)
        fv = np.clip(rel ** (-v_gamma / 2), 0.125, 4.0)
        return scale * np.stack([fk, fv], axis=1)

    return f


def importance_study(study: Study) -> dict[str, Any]:
    """Token importance: how concentrated it is, and what steps that follow it (or a proxy) give."""
    n = len(study.ref)
    own = [study.attention_importance(d, study.ref[d][2]) for d in range(n)]
    cross = [study.attention_importance(d, study.ref[(d + 1) % n][2]) for d in range(n)]
    top10 = []
    for imp in cross:
        for c in range(imp.shape[1] // CHUNK):
            w = np.sort(imp[:, c * CHUNK + 1 : (c + 1) * CHUNK], axis=1)[:, ::-1]
            top10.append(float((w[:, : CHUNK // 10].sum(1) / w.sum(1)).mean()))
    logs = [(np.log(a + 1e-12).ravel(), np.log(b + 1e-12).ravel()) for a, b in zip(own, cross, strict=True)]
    corr = float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in logs]))
    # A calibrated mean query per head (other documents), over the pairs RoPE barely turns in 1000 tokens.
    q = study.queries(study.calibration)
    inv = THETA ** (-np.arange(study.D // 2) * 2 / study.D)
    low = np.concatenate([inv * 1000 < 1.0] * 2)
    mean_q = np.stack([q[layer][64:].mean(axis=0) * low for layer in range(study.L)])  # [L, Hq, D]
    proxy_q, norms = [], []
    for d in range(n):
        kv = study.kv(d)
        T = kv.shape[2]
        k = _unrotate(kv[:, 0].reshape(study.L, T, -1), study.D, -1.0).reshape(study.L, T, study.H, study.D)
        imp = np.zeros((study.L, T, study.H))
        for c in range(T // CHUNK):
            kc = k[:, c * CHUNK : (c + 1) * CHUNK]
            for j in range(study.Hq):
                h = j // (study.Hq // study.H)
                logits = np.einsum("ld,ltd->lt", mean_q[:, j], kc[:, :, h]) / np.sqrt(study.D)
                a = np.exp(logits - logits.max(axis=1, keepdims=True))
                imp[:, c * CHUNK : (c + 1) * CHUNK, h] += (a / a.sum(axis=1, keepdims=True)) ** 2
        proxy_q.append(imp)
        norms.append(np.linalg.norm(kv[:, 1], axis=-1) ** -2.0)  # low value norm ~ a sink-like token
    rows = {"none (cachegen's steps)": study.simulate(None)}
    for label, imp in (("oracle, same question", own), ("oracle, another question", cross)):
        rows[label] = study.simulate(factor_from(imp, 0.5, 0.25))
    for scale in (1.3, 1.5, 1.7):  # the oracle's steps coarsened towards 6x (2.67 bits per value)
        rows[f"oracle, another question, steps x{scale}"] = study.simulate(factor_from(cross, 0.5, 0.25, scale))
    window = [study.window_importance(d) for d in range(n)]
    for scale in (1.5, 1.7):
        rows[f"the document's last 64 queries (engine-side), steps x{scale}"] = study.simulate(
            factor_from(window, 0.5, 0.25, scale)
        )
    predicted, r2 = predicted_query_importance(study)
    for scale in (1.0, 1.5):
        label = "predicted queries (per-model map), last 64 of each chunk" + (f", steps x{scale}" if scale != 1 else "")
        rows[label] = study.simulate(factor_from(predicted, 0.5, 0.25, scale))
    rows["calibrated mean query"] = study.simulate(factor_from(proxy_q, 0.5, 0.25))
    rows["value norm ** -2 (no model)"] = study.simulate(factor_from(norms, 0.5, 0.25))
    return {
        "top10pct_share_of_squared_attention": float(np.mean(top10)),
        "corr_same_vs_other_question": corr,
        "predicted_query_r2_mean": float(np.mean(r2)),
        "sim": rows,
    }


def main() -> None:
    """Run both studies and print (and optionally write) the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first-doc", type=int, default=32)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    study = Study(args.first_doc, args.docs)
    result = {"transform_gains_bits": transform_gains(study), "importance": importance_study(study)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
