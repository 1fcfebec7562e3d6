"""KVTC (KV Cache Transform Coding): calibration, and finding or making the calibration of a model.

Calibration (``kvsqueeze kvtc calibrate``) runs calibration text through the model, takes the keys
with RoPE removed and the values of every layer, and fits per layer (and per feature group) a PCA
basis, then per component and quantizer option the expected distortion and entropy-coded rate on a
sample of calibration tokens, for quantizers clipped tightly or widely (the allocation picks per
component). Each layer's keys and values are then weighted by the KL their quantization causes per
unit of distortion, and the tight clipping and the rule that splits the bit budget across layers and
between keys and values are chosen by KL of the next-token distributions on calibration segments
(attention quality, not squared error). The codec itself is :mod:`kvsqueeze.methods.kvtc.codec`.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvsqueeze import corpus
from kvsqueeze.cache import CompressedPrefix, PrefixCache
from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.forward import continue_with, dense_prefill, distribution_metrics
from kvsqueeze.methods.kvtc import codec
from kvsqueeze.methods.kvtc.prefix import compress_prefix
from kvsqueeze.model import home

GROUPINGS = ("layer", "head")
METRICS = ("attention", "mse")
DEFAULT_CLIPS = (3.0, 4.0, 6.0)   # tight clip candidates (std); the wide one is WIDE_CLIP
WIDE_CLIP = 16.0
DEFAULT_KEY_SHARES = (0.25, 0.35)


# ---------------------------------------------------------------------------------------------
# Model facts


def model_fingerprint(model) -> str:
    """A short hash of the model's config and of the first values of every weight tensor."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
              "_attn_implementation_autoset", "attn_implementation"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().reshape(-1)[:16].float().numpy().tobytes())
    return h.hexdigest()[:16]


def rope_params(model) -> tuple[torch.Tensor, float]:
    """The model's RoPE inverse frequencies and attention scaling (HF ``rotary_emb``)."""
    rot = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        raise KvsqueezeError(f"model_type={model.config.model_type!r}: KVTC needs a model with a "
                             "Llama-style rotary embedding (model.rotary_emb.inv_freq)")
    if getattr(rot, "rope_type", "default") == "dynamic":
        raise KvsqueezeError("rope_type='dynamic': position-dependent RoPE scaling is not supported by KVTC")
    return rot.inv_freq.detach().float().clone(), float(getattr(rot, "attention_scaling", 1.0))


def _attention_modules(model):
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None or not all(hasattr(l, "self_attn") and hasattr(l.self_attn, "q_proj")
                                 and hasattr(l.self_attn, "o_proj") for l in layers):
        raise KvsqueezeError(f"model_type={model.config.model_type!r}: the attention metric needs "
                             "Llama-style layers (self_attn.q_proj / o_proj); use metric='mse'")
    return [l.self_attn for l in layers]


class QueryEnergy:
    """Context manager: mean squared pre-RoPE query per (layer, query head, dim) over every token seen."""

    def __init__(self, model):
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.mods = _attention_modules(model)
        self.sums = [None] * len(self.mods)
        self.count = [0] * len(self.mods)
        self.handles = []

    def _hook(self, i):
        def hook(_mod, _inp, out):
            q = out.detach().double().reshape(-1, self.heads, out.shape[-1] // self.heads)
            s = q.pow(2).sum(0)
            self.sums[i] = s if self.sums[i] is None else self.sums[i] + s
            self.count[i] += q.shape[0]
        return hook

    def __enter__(self):
        self.handles = [m.q_proj.register_forward_hook(self._hook(i)) for i, m in enumerate(self.mods)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def mean(self, layer: int) -> torch.Tensor:
        return self.sums[layer] / max(self.count[layer], 1)  # [heads, head_dim]


def attention_metrics(model, energy: QueryEnergy) -> dict[tuple[int, str], torch.Tensor]:
    """Per (layer, kind) the matrix ``T`` whose ``|T df|^2`` approximates the error attention sees.

    Keys: a logit is ``q . R k``; averaged over the relative rotation, a key error in rotation plane
    ``f`` costs the energy of the reading queries in that plane (summed over the query heads of the
    KV group), so ``T = diag(sqrt(w))``. Values: the output is ``W_o`` applied to the attended values,
    so ``T`` is the square root of ``sum_h W_o,h^T W_o,h`` over the group's query heads. A small
    ridge keeps ``T`` invertible.
    """
    cfg = model.config
    mods = _attention_modules(model)
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = mods[0].o_proj.weight.shape[1] // hq
    per = hq // hkv
    out = {}
    for l, mod in enumerate(mods):
        e = energy.mean(l)  # [hq, d]
        e = (e + torch.cat([e[:, d // 2:], e[:, :d // 2]], dim=1)) / 2  # one weight per rotation plane
        w = e.reshape(hkv, per, d).sum(1).reshape(-1)
        w = w / w.mean()
        out[(l, "k")] = torch.diag((w + 1e-3).sqrt())
        wo = mod.o_proj.weight.detach().double()  # [hidden, hq * d]
        blocks = []
        for g in range(hkv):
            m = sum(wo[:, h * d:(h + 1) * d].T @ wo[:, h * d:(h + 1) * d] for h in range(g * per, (g + 1) * per))
            m = m / torch.diagonal(m).mean()
            ev, U = torch.linalg.eigh(m)
            blocks.append(U @ torch.diag((ev.clamp_min(0) + 1e-3).sqrt()) @ U.T)
        out[(l, "v")] = torch.block_diag(*blocks)
    return out


# ---------------------------------------------------------------------------------------------
# Calibration


class CalibrationBuilder:
    """Accumulates pre-RoPE key and value features of prefix caches, then fits a calibration."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, inv_freq: torch.Tensor,
                 rope_scaling: float = 1.0, sinks: int = 4, sample_per_cache: int = 256, seed: int = 0):
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.inv_freq, self.rope_scaling, self.sinks = inv_freq, rope_scaling, sinks
        self.sample_per_cache = sample_per_cache
        self.gen = torch.Generator().manual_seed(seed)
        d = kv_heads * head_dim
        self.sum = {(l, k): torch.zeros(d, dtype=torch.float64) for l in range(n_layers) for k in codec.KINDS}
        self.outer = {key: torch.zeros(d, d, dtype=torch.float64) for key in self.sum}
        self.samples: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in self.sum}
        self.count = 0

    def add(self, cache: PrefixCache, position: int = 0) -> None:
        n = cache.n_tokens
        if n <= self.sinks:
            return
        cos, sin = codec.rope_cos_sin(self.inv_freq, self.rope_scaling, torch.arange(position, position + n))
        pick = torch.randperm(n - self.sinks, generator=self.gen)[:self.sample_per_cache] + self.sinks
        for l in range(cache.n_layers):
            for kind, x in (("k", cache.keys[l]), ("v", cache.values[l])):
                if kind == "k":
                    x = codec.remove_rope(x.double(), cos, sin)
                f = codec.to_features(x.double())[self.sinks:]
                self.sum[(l, kind)] += f.sum(0)
                self.outer[(l, kind)] += f.T @ f
                self.samples[(l, kind)].append(codec.to_features(x.float())[pick])
        self.count += n - self.sinks

    def fit_pca(self, grouping: str = "layer", metrics: dict | None = None):
        """Per (layer, kind): groups, means, analysis and synthesis bases, component std.

        ``metrics``: per (layer, kind) a ``[D, D]`` matrix ``T`` (block-diagonal over the groups);
        the PCA is taken of ``T f`` so that component-space squared error equals ``|T df|^2``.
        Without it, plain PCA (``T = I``).
        """
        if grouping not in GROUPINGS:
            raise bad_value("grouping", grouping, f"one of {', '.join(GROUPINGS)}")
        if self.count < 2:
            raise KvsqueezeError("calibration saw no tokens beyond the sinks; give it more text")
        d = self.kv_heads * self.head_dim
        groups = ([(0, d)] if grouping == "layer"
                  else [(h * self.head_dim, self.head_dim) for h in range(self.kv_heads)])
        out = {}
        for key in self.sum:
            mean = self.sum[key] / self.count
            cov = self.outer[key] / self.count - torch.outer(mean, mean)
            T = (metrics or {}).get(key)
            means, bases, synths, sig = [], [], [], []
            for o, n in groups:
                Tg = torch.eye(n, dtype=torch.float64) if T is None else T[o:o + n, o:o + n].double()
                evals, evecs = torch.linalg.eigh(Tg @ cov[o:o + n, o:o + n] @ Tg.T)
                order = torch.argsort(evals, descending=True)
                evals, evecs = evals[order].clamp_min(0), evecs[:, order]
                flip = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
                evecs = evecs * torch.where(flip == 0, torch.ones_like(flip), flip)
                means.append(mean[o:o + n].float())
                bases.append((Tg.T @ evecs).float())
                synths.append(torch.linalg.solve(Tg, evecs).float())
                sig.append(evals.sqrt().clamp_min(1e-6).float())
            out[key] = (groups, means, bases, synths, torch.cat(sig))
        return out

    def build(self, model_fingerprint: str, grouping: str = "layer", key_share: float = 0.25,
              key_clip: float = 4.0, value_clip: float = 4.0, pca=None, tables=None,
              info: dict | None = None, weights: dict | None = None) -> codec.Calibration:
        pca = pca or self.fit_pca(grouping)
        stats = {}
        for key, (groups, means, bases, synths, sigma) in pca.items():
            clip = key_clip if key[1] == "k" else value_clip
            clips = (float(clip), WIDE_CLIP)
            t = (tables or {}).get((key, clips))
            if t is None:
                t = component_tables(self.coefficients(key, pca), clips)
            stats[key] = codec.LayerKindStats(groups=groups, means=means, bases=bases, synths=synths,
                                              sigma=sigma, clips=clips, **t)
        if not 0 < key_share < 1:
            raise bad_value("key_share", key_share, "a fraction in (0, 1)")
        return codec.Calibration(
            n_layers=self.n_layers, kv_heads=self.kv_heads, head_dim=self.head_dim, grouping=grouping,
            key_share=float(key_share), rope_inv_freq=self.inv_freq, rope_scaling=self.rope_scaling,
            model_fingerprint=model_fingerprint, stats=stats,
            info={"tokens": self.count, **(info or {})}, weights=weights)

    def coefficients(self, key, pca) -> torch.Tensor:
        """Normalised coefficients of the sampled calibration tokens of one (layer, kind)."""
        groups, means, bases, synths, sigma = pca[key]
        s = codec.LayerKindStats(groups=groups, means=means, bases=bases, synths=synths, sigma=sigma,
                                 dist=None, rate=None, family=None, loc=None, scale=None,
                                 clips=(0.0, 0.0))
        return codec.project(s, torch.cat(self.samples[key])).float()


def component_tables(z: torch.Tensor, clips: tuple[float, float]) -> dict[str, torch.Tensor]:
    """Expected squared error (in units of the component's variance) and entropy-coded bits per token.

    ``z``: normalised coefficients ``[S, D]`` of calibration tokens. For every option the entropy
    model of each component is fitted on the codes (quantized Laplace and Gaussian; the one that
    codes the sample in fewer bits is kept).
    """
    S, D = z.shape
    z = z.double()
    steps = codec.option_steps()
    limits = codec.option_limits(clips)
    var = z.pow(2).mean(0)
    dist = torch.zeros(D, codec.N_OPTIONS, dtype=torch.float64)
    rate = torch.zeros_like(dist)
    family = torch.zeros(D, codec.N_OPTIONS, dtype=torch.int8)
    loc = torch.zeros_like(dist)
    scale = torch.ones_like(dist)
    dist[:, 0] = var
    for j in range(1, codec.N_OPTIONS):
        step = float(steps[j])
        lim = int(limits[j])
        q = torch.round(z / step).clamp(-lim, lim)
        dist[:, j] = (z - q * step).pow(2).mean(0)
        u = (z / step).clamp(-lim - 0.5, lim + 0.5)  # the coder sees clipped values
        mu = u.mean(0)
        b = (u - mu).abs().mean(0).clamp_min(1e-3)
        sd = u.std(0).clamp_min(1e-3)
        r_lap = codec.code_bits(q, lim, codec.LAPLACE, mu, b).mean(0)
        r_gau = codec.code_bits(q, lim, codec.GAUSSIAN, mu, sd).mean(0)
        use_g = r_gau < r_lap
        rate[:, j] = torch.where(use_g, r_gau, r_lap)
        family[:, j] = use_g.to(torch.int8)
        loc[:, j] = mu
        scale[:, j] = torch.where(use_g, sd, b)
    return {"dist": dist.float(), "rate": rate.float(), "family": family, "loc": loc.float(),
            "scale": scale.float()}


def _kl_of(cal: codec.Calibration, ratio: float, model, tune_segments, sinks: int, recent: int) -> float:
    kls = []
    for cache, ref, cont, targets in tune_segments:
        comp = compress_prefix(cal, cache, ratio, sinks, cache.n_tokens - recent)
        kl, *_ = distribution_metrics(ref, continue_with(model, comp, cont), targets)
        kls.append(kl.mean().item())
    return sum(kls) / len(kls)


def layer_sensitivity(cal: codec.Calibration, model, tune_segments, ratio: float, sinks: int, recent: int,
                      progress=None) -> dict[tuple[int, str], float]:
    """KL of the next-token distributions per unit of metric distortion, one (layer, kind) at a time.

    Each layer's keys (or values) alone are quantized with the per-layer allocation at ``ratio``;
    the KL this causes on the calibration segments, divided by the distortion the allocation
    minimises (per token), is that layer's weight: a local linearisation of KL in distortion.
    """
    alloc = cal.allocation(ratio)
    out = {}
    keys = sorted(cal.stats)
    for i, key in enumerate(keys):
        layer, kind = key
        s, opts = cal.stats[key], alloc[key]
        kl_sum = dist_sum = 0.0
        for cache, ref, cont, targets in tune_segments:
            start, end = sinks, cache.n_tokens - recent
            x = (cache.keys if kind == "k" else cache.values)[layer][:, start:end]
            cos, sin = codec.rope_cos_sin(cal.rope_inv_freq, cal.rope_scaling, torch.arange(start, end))
            z = codec.to_coefficients(cal, layer, kind, x, cos, sin)
            zq = codec.dequantize(codec.quantize(z, opts, s.clips), opts)
            dist_sum += float((((z - zq) * s.sigma.double()) ** 2).sum(1).mean())
            xr = codec.from_coefficients(cal, layer, kind, zq, cos, sin)
            ks, vs = list(cache.keys), list(cache.values)
            tgt = ks if kind == "k" else vs
            tgt[layer] = tgt[layer].clone()
            tgt[layer][:, start:end] = xr.to(tgt[layer].dtype)
            comp = CompressedPrefix(ks, vs, None, 1, 1)
            kl, *_ = distribution_metrics(ref, continue_with(model, comp, cont), targets)
            kl_sum += kl.mean().item()
        out[key] = max(kl_sum, 1e-9) / max(dist_sum, 1e-12)
        if progress:
            progress(i + 1, len(keys))
    return out


def calibrate(model, tokenizer, docs, seq_len: int = 1024, segments: int = 24, grouping: str = "layer",
              tune: bool = True, tune_ratios=(8.0, 16.0), tune_segments: int = 3,
              key_clips=DEFAULT_CLIPS, value_clips=DEFAULT_CLIPS, key_shares=DEFAULT_KEY_SHARES,
              sinks: int = 4, recent: int = 64, sample_tokens: int = 2048, metric: str = "attention",
              progress=None, log=None) -> codec.Calibration:
    """Fit a calibration on ``docs``.

    With ``tune``: measure each (layer, kind)'s KL sensitivity on ``tune_segments`` further
    calibration segments, then choose the budget split (share / sensitivity), the key share and the
    tight clips by the geometric mean of KL at ``tune_ratios`` on those segments.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if segments < 1:
        raise bad_value("segments", segments, "a number of calibration segments >= 1")
    n_tune = tune_segments if tune else 0
    segs = corpus.token_segments(docs, tokenizer, seq_len, segments + n_tune, what="calibration text")
    if len(segs) < segments + n_tune:
        raise KvsqueezeError(f"calibration text gave {len(segs)} segments of {seq_len} tokens; "
                             f"need {segments + n_tune}: give more text or lower --segments")
    inv_freq, scaling = rope_params(model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    b = CalibrationBuilder(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, inv_freq, scaling,
                           sinks=sinks, sample_per_cache=-(-sample_tokens // segments))
    if metric not in METRICS:
        raise bad_value("metric", metric, f"one of {', '.join(METRICS)}")
    fp = model_fingerprint(model)
    energy = QueryEnergy(model)
    with energy:
        for i, (_, ids) in enumerate(segs[:segments]):
            cache, _ = dense_prefill(model, torch.tensor(ids))
            b.add(cache)
            if progress:
                progress(i + 1, segments, "prefill")
    pca = b.fit_pca(grouping, attention_metrics(model, energy) if metric == "attention" else None)
    tables: dict = {}

    def table_for(key, clip):
        clips = (float(clip), WIDE_CLIP)
        if (key, clips) not in tables:
            tables[(key, clips)] = component_tables(b.coefficients(key, pca), clips)
        return tables[(key, clips)]

    info = {"seq_len": seq_len, "segments": segments, "metric": metric, "sources": sorted({s for s, _ in segs[:segments]})[:50]}
    choice = {"key_share": 0.25, "key_clip": 4.0, "value_clip": 4.0}
    for i, key in enumerate(pca):
        table_for(key, choice["key_clip"] if key[1] == "k" else choice["value_clip"])
        if progress:
            progress(i + 1, len(pca), "rate tables")
    if not tune:
        return b.build(fp, grouping, pca=pca, tables=tables, info=info, **choice)
    tune_data = []
    for _, ids in segs[segments:]:
        ids = torch.tensor(ids)
        p = seq_len - seq_len // 8  # prefix, then score the last eighth
        cache, _ = dense_prefill(model, ids[:p])
        dense = CompressedPrefix.dense(cache)
        cont, targets = ids[p:-1], ids[p + 1:]
        tune_data.append((cache, continue_with(model, dense, cont), cont, targets))
    # KL per unit of distortion of each (layer, kind), for the "sensitivity" budget split
    base = b.build(fp, grouping, pca=pca, tables=tables, **choice)
    weights = layer_sensitivity(base, model, tune_data, tune_ratios[-1], sinks, recent,
                                progress=(lambda i, n: progress(i, n, "sensitivity")) if progress else None)
    info["sensitivity"] = {f"{l}.{k}": w for (l, k), w in sorted(weights.items())}
    trials: dict[tuple, dict] = {}
    choice["split"] = "share"
    grid = [("split", ("share", "sensitivity")), ("key_share", key_shares), ("key_clip", key_clips),
            ("value_clip", value_clips)]
    n_steps, step = sum(len(v) for _, v in grid), 0
    for name, values in grid:
        if name == "key_share" and choice["split"] == "sensitivity":
            continue  # the sensitivity split sets the key/value balance itself
        scores = {}
        for v in values:
            c = {**choice, name: v}
            at = tuple(sorted(c.items()))
            if at not in trials:
                for key in pca:
                    table_for(key, c["key_clip"] if key[1] == "k" else c["value_clip"])
                cal = b.build(fp, grouping, pca=pca, tables=tables,
                              weights=weights if c["split"] == "sensitivity" else None,
                              **{k: x for k, x in c.items() if k != "split"})
                kls = {r: _kl_of(cal, r, model, tune_data, sinks, recent) for r in tune_ratios}
                # geometric mean over the ratios: scale-free, so no ratio dominates the choice
                score = math.exp(sum(math.log(max(k, 1e-9)) for k in kls.values()) / len(kls))
                trials[at] = {**c, "kl": {f"{r:g}x": k for r, k in kls.items()}, "score": score}
            scores[v] = trials[at]["score"]
            step += 1
            if progress:
                progress(step, n_steps, "tuning")
        choice[name] = min(scores, key=scores.get)
        log(f"kvtc calibrate: {name} = {choice[name]} (geometric-mean KL at "
            f"{', '.join(f'{r:g}x' for r in tune_ratios)} on calibration text: "
            + ", ".join(f"{k}: {s:.4f}" for k, s in scores.items()) + ")")
    info["tuning"] = {"ratios": list(tune_ratios), "segments": len(tune_data),
                      "trials": list(trials.values()), "choice": dict(choice)}
    split = choice.pop("split")
    return b.build(fp, grouping, pca=pca, tables=tables, info=info,
                   weights=weights if split == "sensitivity" else None, **choice)


def default_calibration_path(fingerprint: str) -> Path:
    """Where the model's calibration is cached (``$KVSQUEEZE_HOME/kvtc/<model fingerprint>``)."""
    return home() / "kvtc" / f"{fingerprint}.safetensors"


def quick_calibration_path(fingerprint: str) -> Path:
    """Where the model's quick calibration (8 segments, untuned) is cached."""
    return home() / "kvtc" / f"{fingerprint}-quick.safetensors"


QUICK = {"segments": 8, "tune": False}  # ~3 min on 2 CPU cores, against ~15 for the full one


def calibration_for(model, tokenizer=None, given=None, quick: bool = False, log=None) -> Path:
    """The calibration file KVTC runs with on ``model``, found or made (once) and cached.

    ``given``: that file (it must exist). Else the model's full calibration if it was made; else,
    with ``quick``, its quick calibration (:data:`QUICK`: what keeps ``kvsqueeze bench`` on a fresh
    machine within its time budget), made if missing; else the full calibration, made now. Reports
    and logs name the file that served.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if given:
        if not Path(given).is_file():
            raise bad_value("calibration", str(given), "an existing KVTC calibration file")
        return Path(given)
    fp = model_fingerprint(model)
    full, fast = default_calibration_path(fp), quick_calibration_path(fp)
    if full.is_file():
        return full
    if quick and fast.is_file():
        return fast
    out = fast if quick else full
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
    log(f"kvtc: no {'quick ' if quick else ''}calibration for this model yet; calibrating once into {out}")
    t0 = time.monotonic()
    cal = calibrate(model, tokenizer, corpus.calibration_documents(), **(QUICK if quick else {}),
                    progress=_log_progress(log))
    cal.info["model_path"] = str(model.config._name_or_path)
    cal.info["seconds"] = round(time.monotonic() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    cal.save(out)
    return out


def _log_progress(log):
    def show(i, n, what=""):
        if i == n or i % 10 == 0:
            log(f"kvtc calibrate ({what}) {i}/{n}")
    return show
