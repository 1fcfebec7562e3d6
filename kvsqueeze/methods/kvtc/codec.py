"""KVTC codec: PCA decorrelation, DP bit allocation, quantization and entropy coding of KV tokens.

Engine-agnostic: everything here needs only a calibration artifact (:class:`Calibration`), never the
model, so the same code serves ``kvsqueeze eval`` and the SGLang storage tier.

Pipeline for one sequence's compressible tokens, per layer and per kind (keys, values):

1. keys lose their RoPE rotation (``remove_rope``, exact up to float rounding; re-applied after
   decoding), tokens become ``[m, kv_heads * head_dim]`` feature rows;
2. each feature group (all KV heads of the layer by default) is centred and projected on its PCA
   basis, each component divided by its calibration standard deviation. The PCA is taken in an
   attention metric (``T f``; keys weighted by the energy of the queries that read them, values by
   the output projection that reads them), so squared error in component space is error in what
   attention computes; the analysis and synthesis matrices are then ``T^T B`` and ``T^-1 B``;
3. component ``i`` is quantized with option ``j``: ``j = 0`` drops it (reconstructed as the mean), ``j > 0``
   is a uniform mid-tread quantizer of step ``STEP0 * 2**(-s/2)`` standard deviations (``s`` = 0..23)
   whose codes are clipped at a tight or a wide limit (``clips``, in standard deviations): coarse
   quantizers gain from clipping outliers, fine ones lose, and the allocation picks per component;
4. the options come from a dynamic-programming allocation (:func:`allocate`) that minimises the
   calibration distortion under a budget of entropy-coded bits per token;
5. codes are range-coded (``constriction``) under a per-component parametric model fitted at
   calibration (quantized Laplace or Gaussian, whichever codes the calibration data in fewer bits).

A blob (:func:`encode` / :func:`decode`) is ``MAGIC | version | header | streams | crc32``; the header
names shapes, dtype, first position, the allocation and the fingerprints of the model and
calibration it was made with. Truncated, corrupted or foreign blobs are refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvsqueeze.errors import KvsqueezeError, bad_value

CALIBRATION_FORMAT = "kvsqueeze-kvtc-calibration"
CALIBRATION_VERSION = 1
BLOB_MAGIC = b"KVTC"
BLOB_VERSION = 1
STEP0 = 4.0           # coarsest quantizer step, in component standard deviations
N_STEPS = 24          # step sizes, halving every 2
N_OPTIONS = 1 + 2 * N_STEPS  # 0 drops the component; 1..24 tight clip, 25..48 the same steps wide
RATE_UNIT = 8         # DP costs in 1/8 bit
KINDS = ("k", "v")
LAPLACE, GAUSSIAN = 0, 1


class BlobError(KvsqueezeError):
    """A KVTC blob that cannot be decoded faithfully (truncated, corrupted, foreign)."""


def option_steps() -> torch.Tensor:
    """Quantizer step of each option in standard deviations (``inf`` for the dropped option 0)."""
    return _OPTION_STEPS.clone()


def _option_steps() -> torch.Tensor:
    j = torch.arange(N_OPTIONS, dtype=torch.float64)
    return torch.where(j == 0, torch.tensor(math.inf, dtype=torch.float64),
                       STEP0 * torch.pow(2.0, -((j - 1) % N_STEPS) / 2))


_OPTION_STEPS = _option_steps()


def option_limit(step: float, clip: float) -> int:
    """Largest code magnitude of a quantizer with ``step`` clipped at ``clip`` std."""
    return max(1, math.ceil(clip / step - 0.5))


def option_limits(clips: tuple[float, float]) -> torch.Tensor:
    """Largest code magnitude of each option (0 for the dropped option 0)."""
    key = (float(clips[0]), float(clips[1]))
    if key not in _LIMITS:
        lim = [0] + [option_limit(float(_OPTION_STEPS[j]), key[0] if j <= N_STEPS else key[1])
                     for j in range(1, N_OPTIONS)]
        _LIMITS[key] = torch.tensor(lim, dtype=torch.float64)
    return _LIMITS[key]


_LIMITS: dict[tuple[float, float], torch.Tensor] = {}


# ---------------------------------------------------------------------------------------------
# RoPE


def rope_cos_sin(inv_freq: torch.Tensor, scaling: float, positions: torch.Tensor):
    """``cos, sin`` of shape ``[n, head_dim]`` for the half-rotation (NeoX/Llama) RoPE layout."""
    freqs = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``k`` (``[..., n, head_dim]``) to its positions, as the model's attention does."""
    out = k.to(torch.float64) * cos + _rotate_half(k.to(torch.float64)) * sin
    return out.to(k.dtype)


def remove_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope` (rotation by the opposite angle; ``scaling`` divided out)."""
    s2 = cos * cos + sin * sin  # == scaling**2 (1 for plain RoPE)
    kd = k.to(torch.float64)
    out = (kd * cos - _rotate_half(kd) * sin) / s2
    return out.to(k.dtype)


# ---------------------------------------------------------------------------------------------
# Bit allocation


def allocate(dist: np.ndarray, cost: np.ndarray, budget: int) -> np.ndarray:
    """Choose one option per component minimising total distortion with total cost <= ``budget``.

    ``dist``, ``cost``: ``[n_components, n_options]`` (costs are non-negative integers; option 0
    must cost 0 so that a solution always exists). Exact dynamic programming over the budget:
    O(n_components * n_options * budget).
    """
    dist = np.asarray(dist, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.int64)
    if dist.shape != cost.shape or dist.ndim != 2:
        raise ValueError(f"dist {dist.shape} and cost {cost.shape} must be equal 2-d shapes")
    if budget < 0:
        raise bad_value("budget", budget, "a non-negative number of rate units")
    if (cost < 0).any() or (cost[:, 0] != 0).any():
        raise ValueError("costs must be >= 0 and option 0 must cost 0")
    n, n_opt = dist.shape
    best = np.zeros(budget + 1)
    choice = np.zeros((n, budget + 1), dtype=np.int16)
    pad = int(cost.max(initial=0))
    padded = np.full(pad + budget + 1, np.inf)
    width = budget + 1
    cand = np.empty(width)
    better = np.empty(width, dtype=bool)
    for i in range(n):
        padded[pad:] = best
        # best'[c] = min_j best[c - cost[i, j]] + dist[i, j] (inf where c < cost), the first j on
        # ties; one contiguous pass per option (a strided argmin over options is ~10x slower)
        new = padded[pad:] + dist[i, 0]
        arg = choice[i]
        for j in range(1, n_opt):
            lo = pad - int(cost[i, j])
            np.add(padded[lo:lo + width], dist[i, j], out=cand)
            np.less(cand, new, out=better)
            np.copyto(new, cand, where=better)
            arg[better] = j
        best = new
    out = np.zeros(n, dtype=np.int64)
    c = budget
    for i in range(n - 1, -1, -1):
        out[i] = choice[i, c]
        c -= int(cost[i, out[i]])
    return out


# ---------------------------------------------------------------------------------------------
# Entropy models


def _laplace_cdf(x: torch.Tensor, loc, scale) -> torch.Tensor:
    z = (x - loc) / scale
    return torch.where(z < 0, 0.5 * torch.exp(z.clamp(max=0)), 1 - 0.5 * torch.exp(-z.clamp(min=0)))


def _gauss_cdf(x: torch.Tensor, loc, scale) -> torch.Tensor:
    return 0.5 * (1 + torch.erf((x - loc) / (scale * math.sqrt(2))))


def code_bits(q: torch.Tensor, limit: int, family: int, loc: float, scale: float) -> torch.Tensor:
    """Bits each code of ``q`` costs under the quantized model (tails folded into the edge bins)."""
    cdf = _laplace_cdf if family == LAPLACE else _gauss_cdf
    qd = q.to(torch.float64)
    hi = torch.where(qd >= limit, torch.ones_like(qd), cdf(qd + 0.5, loc, scale))
    lo = torch.where(qd <= -limit, torch.zeros_like(qd), cdf(qd - 0.5, loc, scale))
    return -torch.log2((hi - lo).clamp_min(2.0 ** -24))


def code_probabilities(limit: int, family: int, loc: float, scale: float) -> np.ndarray:
    """Probabilities of codes ``-limit..limit`` (tails folded into the edge bins), float64."""
    q = torch.arange(-limit, limit + 1, dtype=torch.float64)
    return torch.exp2(-code_bits(q, limit, family, loc, max(scale, 1e-6))).numpy()


def _coder_model(family: int, limit: int, loc: float, scale: float):
    import constriction

    p = code_probabilities(limit, family, loc, scale)
    return constriction.stream.model.Categorical(p / p.sum(), perfect=False)


# ---------------------------------------------------------------------------------------------
# Calibration artifact


@dataclass
class LayerKindStats:
    """Everything the codec needs for one (layer, kind): PCA groups and per-component tables."""

    groups: list[tuple[int, int]]          # (offset, size) of each feature group
    means: list[torch.Tensor]              # per group [size]
    bases: list[torch.Tensor]              # per group [size, size] analysis: z = (f - mean) @ basis
    synths: list[torch.Tensor]             # per group [size, size] synthesis: f = mean + z @ synth.T
    sigma: torch.Tensor                    # [D] component std (components in group order)
    dist: torch.Tensor                     # [D, N_OPTIONS] expected squared error, in variances
    rate: torch.Tensor                     # [D, N_OPTIONS] expected bits per token
    family: torch.Tensor                   # [D, N_OPTIONS] entropy model family (int8)
    loc: torch.Tensor                      # [D, N_OPTIONS] model location, in codes
    scale: torch.Tensor                    # [D, N_OPTIONS] model scale, in codes
    clips: tuple[float, float]             # tight and wide clipping of the quantizer options

    def limits(self) -> torch.Tensor:
        return option_limits(self.clips)


@dataclass
class Calibration:
    """A fitted KVTC calibration for one model (see ``kvsqueeze kvtc calibrate``)."""

    n_layers: int
    kv_heads: int
    head_dim: int
    grouping: str
    key_share: float
    rope_inv_freq: torch.Tensor
    rope_scaling: float
    model_fingerprint: str
    stats: dict[tuple[int, str], LayerKindStats]
    info: dict = field(default_factory=dict)
    # KL per unit of metric distortion of each (layer, kind), measured at calibration. With them
    # the budget is split across layers and kinds by a Lagrangian on KL-weighted distortion
    # ("sensitivity" split); without them each layer gets the same budget and ``key_share`` splits
    # it between keys and values ("share" split).
    weights: dict[tuple[int, str], float] | None = None
    _alloc_cache: dict = field(default_factory=dict, repr=False)
    # where planned allocations are kept between processes (see use_allocation_cache); None: memory only
    _alloc_dir: Path | None = field(default=None, repr=False)
    _model_cache: dict = field(default_factory=dict, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    def coder_model(self, layer: int, kind: str, component: int, option: int):
        """The entropy model of one component under one option (built once, then reused)."""
        key = (layer, kind, component, option)
        m = self._model_cache.get(key)
        if m is None:
            s = self.stats[(layer, kind)]
            lim = int(s.limits()[option])
            m = _coder_model(int(s.family[component, option]), lim, float(s.loc[component, option]),
                             float(s.scale[component, option]))
            self._model_cache[key] = m
        return m

    @property
    def features(self) -> int:
        return self.kv_heads * self.head_dim

    def fingerprint(self) -> str:
        if self._fingerprint is None:  # the content is fixed once built or loaded
            h = hashlib.sha256()
            h.update(json.dumps(self._meta_core(), sort_keys=True).encode())
            for name, t in sorted(self._tensors().items()):
                h.update(name.encode())
                h.update(t.contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def _meta_core(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION,
                "n_layers": self.n_layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "options": {"n": N_OPTIONS, "steps": N_STEPS, "step0": STEP0, "halvings_per_step": 0.5},
                "grouping": self.grouping, "key_share": self.key_share,
                "rope_scaling": self.rope_scaling, "model_fingerprint": self.model_fingerprint,
                "clips": {f"{l}.{k}": list(s.clips) for (l, k), s in sorted(self.stats.items())},
                "groups": {f"{l}.{k}": s.groups for (l, k), s in sorted(self.stats.items())},
                **({} if self.weights is None else  # absent when unused: older artifacts keep their hash
                   {"weights": {f"{l}.{k}": float(w) for (l, k), w in sorted(self.weights.items())}})}

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"rope_inv_freq": self.rope_inv_freq.float()}
        for (l, k), s in self.stats.items():
            p = f"L{l}.{k}."
            for g, (mean, basis, synth) in enumerate(zip(s.means, s.bases, s.synths)):
                out[f"{p}g{g}.mean"] = mean.float().contiguous()
                out[f"{p}g{g}.basis"] = basis.float().contiguous()
                out[f"{p}g{g}.synth"] = synth.float().contiguous()
            out[p + "sigma"] = s.sigma.float()
            out[p + "dist"] = s.dist.float()
            out[p + "rate"] = s.rate.float()
            out[p + "family"] = s.family.to(torch.int8)
            out[p + "loc"] = s.loc.float()
            out[p + "scale"] = s.scale.float()
        return out

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self._meta_core(), "fingerprint": self.fingerprint(), "info": self.info}
        tmp = path.with_name(path.name + ".tmp")
        save_file(self._tensors(), str(tmp), metadata={"kvtc": json.dumps(meta)})
        tmp.replace(path)  # never a half-written artifact under the final name
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        path = Path(path)
        if not path.is_file():
            raise bad_value("calibration", str(path), "a file written by `kvsqueeze kvtc calibrate`")
        try:
            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get("kvtc")
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise KvsqueezeError(f"calibration={str(path)!r}: unreadable ({exc}); expected a file "
                                 "written by `kvsqueeze kvtc calibrate`") from exc
        if raw is None:
            raise KvsqueezeError(f"calibration={str(path)!r}: not a KVTC calibration (no 'kvtc' metadata)")
        meta = json.loads(raw)
        if meta.get("format") != CALIBRATION_FORMAT or meta.get("version") != CALIBRATION_VERSION:
            raise KvsqueezeError(
                f"calibration={str(path)!r}: format {meta.get('format')!r} version {meta.get('version')!r};"
                f" expected {CALIBRATION_FORMAT!r} version {CALIBRATION_VERSION}")
        want_opts = {"n": N_OPTIONS, "steps": N_STEPS, "step0": STEP0, "halvings_per_step": 0.5}
        if meta.get("options") != want_opts:
            raise KvsqueezeError(f"calibration={str(path)!r}: quantizer options {meta.get('options')}, "
                                 f"this kvsqueeze uses {want_opts}; re-run `kvsqueeze kvtc calibrate`")
        stats = {}
        for key, groups in meta["groups"].items():
            l, k = key.split(".")
            p = f"L{l}.{k}."
            groups = [tuple(g) for g in groups]
            stats[(int(l), k)] = LayerKindStats(
                groups=groups,
                means=[tensors[f"{p}g{g}.mean"] for g in range(len(groups))],
                bases=[tensors[f"{p}g{g}.basis"] for g in range(len(groups))],
                synths=[tensors[f"{p}g{g}.synth"] for g in range(len(groups))],
                sigma=tensors[p + "sigma"], dist=tensors[p + "dist"], rate=tensors[p + "rate"],
                family=tensors[p + "family"], loc=tensors[p + "loc"], scale=tensors[p + "scale"],
                clips=tuple(float(c) for c in meta["clips"][key]))
        cal = cls(n_layers=meta["n_layers"], kv_heads=meta["kv_heads"], head_dim=meta["head_dim"],
                  grouping=meta["grouping"], key_share=meta["key_share"],
                  rope_inv_freq=tensors["rope_inv_freq"], rope_scaling=meta["rope_scaling"],
                  model_fingerprint=meta["model_fingerprint"], stats=stats, info=meta.get("info", {}),
                  weights=None if meta.get("weights") is None else
                  {(int(key.split(".")[0]), key.split(".")[1]): float(w) for key, w in meta["weights"].items()})
        if cal.fingerprint() != meta.get("fingerprint"):
            raise KvsqueezeError(f"calibration={str(path)!r}: content does not match its fingerprint "
                                 "(corrupted or edited); re-run `kvsqueeze kvtc calibrate`")
        return cal

    # -- allocation -------------------------------------------------------------------------

    def budget_bits(self, ratio: float, kind: str) -> float:
        """Entropy-coded bits per token for one (layer, kind) at a target ``ratio`` vs 16-bit K+V."""
        if not ratio >= 1:
            raise bad_value("ratio", ratio, "a number >= 1 (the target compression ratio)")
        total = 2 * 16 * self.features / ratio
        return total * (self.key_share if kind == "k" else 1 - self.key_share)

    def _tables(self, key) -> tuple[np.ndarray, np.ndarray]:
        s = self.stats[key]
        cost = torch.round(s.rate.double() * RATE_UNIT).long().clamp_min(0).numpy()
        cost[:, 0] = 0
        dist = s.dist.double() * s.sigma.double()[:, None] ** 2  # in (metric) feature units
        return dist.numpy(), cost

    def use_allocation_cache(self, directory: str | Path) -> None:
        """Keep planned allocations as files in ``directory`` (a subfolder per calibration), so that
        other processes (codec workers, a restarted server) load a plan instead of solving it again
        (about 2 s each for the embedded model). A file that does not verify is solved again."""
        self._alloc_dir = Path(directory) / self.fingerprint()

    def _alloc_file(self, key: float) -> Path | None:
        return None if self._alloc_dir is None else self._alloc_dir / f"{key:.6f}.npz"

    def _load_allocation(self, key: float) -> dict | None:
        path = self._alloc_file(key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path) as f:
                alloc = {(int(n.split(".")[0]), n.split(".")[1]): f[n].astype(np.int64)
                         for n in f.files if n != "id"}
                want = str(f["id"])
        except (OSError, ValueError, KeyError, IndexError):
            return None
        ok = (set(alloc) == set(self.stats) and allocation_id(alloc) == want
              and all(a.shape == (self.stats[k].dist.shape[0],) and a.min(initial=0) >= 0
                      and a.max(initial=0) < N_OPTIONS for k, a in alloc.items()))
        return alloc if ok else None

    def _save_allocation(self, key: float, alloc: dict) -> None:
        path = self._alloc_file(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
            np.savez(tmp, id=np.array(allocation_id(alloc)),
                     **{f"{l}.{k}": np.asarray(a, dtype=np.int16) for (l, k), a in alloc.items()})
            os.replace(tmp, path)
        except OSError:  # a cache that cannot be written only costs time
            pass

    def allocation(self, ratio: float) -> dict[tuple[int, str], np.ndarray]:
        """Options per component for every (layer, kind), cached per ratio."""
        key = round(float(ratio), 6)
        if key not in self._alloc_cache:
            loaded = self._load_allocation(key)
            if loaded is not None:
                self._alloc_cache[key] = loaded
                return loaded
            tables = {k: self._tables(k) for k in sorted(self.stats)}
            if self.weights is None:
                budgets = {(l, k): int(self.budget_bits(ratio, k) * RATE_UNIT) for (l, k) in tables}
            else:
                weighted = {k: (d * self.weights[k], c) for k, (d, c) in tables.items()}
                total = int(2 * 16 * self.features / ratio * RATE_UNIT) * self.n_layers
                budgets = split_budget(weighted, total)
                tables = weighted
            self._alloc_cache[key] = {k: allocate(d, c, budgets[k]) for k, (d, c) in tables.items()}
            self._save_allocation(key, self._alloc_cache[key])
        return self._alloc_cache[key]


def split_budget(tables: dict, total: int) -> dict:
    """Split ``total`` rate units over groups of components by one Lagrange multiplier.

    For a multiplier ``lam`` every component takes the option minimising ``dist + lam * cost``; the
    smallest ``lam`` whose total cost fits gives each group its budget (the points it reaches lie on
    the convex hull of the joint rate-distortion curve); what is left over is shared in proportion.
    Each group is then solved exactly by :func:`allocate` within its budget.
    """
    def rates(lam):
        return {k: int(c[np.arange(len(c)), np.argmin(d + lam * c, axis=1)].sum())
                for k, (d, c) in tables.items()}

    def fits(lam):
        return sum(rates(lam).values()) <= total

    lo, hi = 1e-12, 1.0
    while not fits(hi) and hi < 1e30:
        hi *= 4
    if fits(lo):
        hi = lo
    else:
        for _ in range(50):  # geometric bisection: rates fall as lam grows
            mid = math.sqrt(lo * hi)
            if fits(mid):
                hi = mid
            else:
                lo = mid
    got = rates(hi)
    spare = max(0, total - sum(got.values()))
    share = sum(got.values()) or 1
    return {k: got[k] + int(spare * got[k] / share) for k in got}


def allocation_id(alloc: dict[tuple[int, str], np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(alloc):
        h.update(f"{key}".encode())
        h.update(np.asarray(alloc[key], dtype=np.int16).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Per-(layer, kind) transform


def to_features(x: torch.Tensor) -> torch.Tensor:
    """``[kv_heads, m, head_dim]`` -> ``[m, kv_heads * head_dim]`` (heads concatenated)."""
    h, m, d = x.shape
    return x.permute(1, 0, 2).reshape(m, h * d)


def from_features(f: torch.Tensor, kv_heads: int) -> torch.Tensor:
    m, hd = f.shape
    return f.reshape(m, kv_heads, hd // kv_heads).permute(1, 0, 2).contiguous()


def project(s: LayerKindStats, feats: torch.Tensor) -> torch.Tensor:
    """Normalised PCA coefficients ``[m, D]`` of feature rows ``[m, D]``."""
    parts = [((feats[:, o:o + n].double() - mean.double()) @ basis.double())
             for (o, n), mean, basis in zip(s.groups, s.means, s.bases)]
    return torch.cat(parts, dim=1) / s.sigma.double().clamp_min(1e-12)


def unproject(s: LayerKindStats, z: torch.Tensor) -> torch.Tensor:
    z = z.double() * s.sigma.double().clamp_min(1e-12)
    parts = [(z[:, o:o + n] @ synth.double().T) + mean.double()
             for (o, n), mean, synth in zip(s.groups, s.means, s.synths)]
    return torch.cat(parts, dim=1)


def to_coefficients(cal: "Calibration", layer: int, kind: str, x: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
    """Cached K or V ``[kv_heads, m, head_dim]`` (keys with RoPE) -> normalised coefficients ``[m, D]``."""
    if kind == "k":
        x = remove_rope(x, cos, sin)
    return project(cal.stats[(layer, kind)], to_features(x))


def from_coefficients(cal: "Calibration", layer: int, kind: str, z: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_coefficients` (keys get their RoPE back); float64."""
    x = from_features(unproject(cal.stats[(layer, kind)], z), cal.kv_heads)
    return apply_rope(x, cos, sin) if kind == "k" else x


def _option_arrays(options: np.ndarray, clips: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per component step (std units; 0 where dropped) and code limit."""
    opts = torch.as_tensor(np.asarray(options), dtype=torch.long)
    steps = _OPTION_STEPS[opts]
    return torch.where(opts > 0, steps, torch.zeros_like(steps)), option_limits(clips)[opts]


def quantize(z: torch.Tensor, options: np.ndarray, clips: tuple[float, float]) -> torch.Tensor:
    """Integer codes ``[m, D]`` (0 where the component is dropped)."""
    steps, lim = _option_arrays(options, clips)
    safe = torch.where(steps > 0, steps, torch.ones_like(steps))
    q = torch.round(z.double() / safe).clamp(-lim, lim)
    return q.to(torch.int32)


def dequantize(q: torch.Tensor, options: np.ndarray) -> torch.Tensor:
    steps, _ = _option_arrays(options, (1.0, 1.0))
    return q.double() * steps


def _coding_plan(cal: "Calibration", layer: int, kind: str, options: np.ndarray) -> list:
    """``(component, entropy model, code offset)`` of each coded component, built once per allocation."""
    key = ("plan", layer, kind, np.asarray(options, dtype=np.int16).tobytes())
    plan = cal._model_cache.get(key)
    if plan is None:
        lims = cal.stats[(layer, kind)].limits().tolist()
        plan = [(i, cal.coder_model(layer, kind, i, int(options[i])), int(lims[int(options[i])]))
                for i in np.flatnonzero(options).tolist()]
        cal._model_cache[key] = plan
    return plan


def encode_codes(q: torch.Tensor, cal: "Calibration", layer: int, kind: str,
                 options: np.ndarray) -> np.ndarray:
    """Range-code the codes column by column; returns the coder's uint32 words."""
    import constriction

    enc = constriction.stream.queue.RangeEncoder()
    qt = np.ascontiguousarray(q.numpy().T, dtype=np.int32)  # one contiguous row per component
    for i, model, lim in _coding_plan(cal, layer, kind, options):
        enc.encode(qt[i] + lim, model)
    return enc.get_compressed()


def decode_codes(words: np.ndarray, m: int, cal: "Calibration", layer: int, kind: str,
                 options: np.ndarray) -> torch.Tensor:
    import constriction

    dec = constriction.stream.queue.RangeDecoder(words)
    plan = _coding_plan(cal, layer, kind, options)
    q = np.zeros((len(options), m), dtype=np.int32)
    if plan:
        idx, models, lims = zip(*plan)
        q[list(idx)] = np.stack([dec.decode(model, m) for model in models]) - np.array(lims, np.int32)[:, None]
    return torch.from_numpy(q.T)


# ---------------------------------------------------------------------------------------------
# Blob


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def _dtype_name(dt: torch.dtype) -> str:
    for k, v in _DTYPES.items():
        if v == dt:
            return k
    raise bad_value("dtype", str(dt), f"one of {', '.join(_DTYPES)}")


@dataclass(frozen=True)
class Blob:
    data: bytes
    n_tokens: int
    position: int

    def __len__(self) -> int:
        return len(self.data)


def _grid_ratio(r: float) -> float:
    """Allocation ratios live on a 1% geometric grid, so that their DP results can be cached."""
    return round(math.exp(round(math.log(r) / math.log(1.01)) * math.log(1.01)), 6)


def encode(cal: Calibration, keys: list[torch.Tensor], values: list[torch.Tensor], position: int,
           ratio: float, rate_control: bool = True) -> Blob:
    """Compress ``m`` consecutive tokens starting at absolute ``position`` to about ``ratio``.

    ``keys``/``values``: per layer ``[kv_heads, m, head_dim]``, keys with RoPE applied (as caches
    store them). ``ratio`` is against 16-bit K and V of these tokens, counting every blob byte. The
    allocation is planned with the calibration's rate estimates; with ``rate_control`` the blob is
    re-encoded at a tighter allocation while it misses the target (at most six passes).
    """
    if len(keys) != cal.n_layers or len(values) != cal.n_layers:
        raise bad_value("layers", len(keys), f"{cal.n_layers} (the calibration's model)")
    h, m, d = keys[0].shape
    if (h, d) != (cal.kv_heads, cal.head_dim):
        raise bad_value("kv shape", (h, d), f"(kv_heads, head_dim) = ({cal.kv_heads}, {cal.head_dim})")
    if position < 0:
        raise bad_value("position", position, "a non-negative token position")
    if not ratio >= 1:
        raise bad_value("ratio", ratio, "a number >= 1 (the target compression ratio)")
    cos, sin = rope_cos_sin(cal.rope_inv_freq, cal.rope_scaling, torch.arange(position, position + m))
    coeffs = {}
    for layer in range(cal.n_layers):
        for kind, x in (("k", keys[layer]), ("v", values[layer])):
            if x.shape != (h, m, d):
                raise bad_value(f"layer {layer} {kind} shape", tuple(x.shape), f"({h}, {m}, {d})")
            coeffs[(layer, kind)] = to_coefficients(cal, layer, kind, x, cos, sin)
    dense = 2 * cal.n_layers * m * h * d * 2
    # always start from the target's own plan, so that a blob depends on its input alone
    # (deterministic); the allocations tried are cached per plan, so later blobs reuse them
    plan = _grid_ratio(ratio)
    if not rate_control:
        return _encode_at(cal, coeffs, plan, keys[0].dtype, position, m)
    best, failed = None, set()
    for attempt in range(6):
        blob = _encode_at(cal, coeffs, plan, keys[0].dtype, position, m)
        achieved = dense / len(blob)
        if achieved >= ratio * 0.999:
            if best is None or len(blob) > len(best[0]):
                best = (blob, plan)
            if achieved <= ratio * 1.03:
                break
            nxt = min(_grid_ratio(plan * ratio / achieved), MAX_RATIO)  # overshot: looser
        else:
            failed.add(plan)
            # tighter; a few tokens cannot pay the header: the plan stops at what a header may say
            nxt = min(_grid_ratio(plan * (ratio / achieved) * (1.002 + 0.01 * attempt)), MAX_RATIO)
        if nxt in failed or (best is not None and nxt == best[1]) or nxt == plan:
            if best is not None or plan >= MAX_RATIO:
                break
            nxt = min(_grid_ratio(plan * 1.02), MAX_RATIO)
        plan = nxt
    return blob if best is None else best[0]


def _encode_at(cal: Calibration, coeffs: dict, plan: float, dtype: torch.dtype, position: int,
               m: int) -> Blob:
    alloc = cal.allocation(plan)
    streams = []
    for layer in range(cal.n_layers):
        for kind in KINDS:
            s, opts = cal.stats[(layer, kind)], alloc[(layer, kind)]
            streams.append(encode_codes(quantize(coeffs[(layer, kind)], opts, s.clips), cal, layer, kind, opts))
    header = {"n_layers": cal.n_layers, "kv_heads": cal.kv_heads, "head_dim": cal.head_dim,
              "n_tokens": m, "position": position, "dtype": _dtype_name(dtype), "ratio": plan,
              "allocation": allocation_id(alloc), "calibration": cal.fingerprint(),
              "model": cal.model_fingerprint, "streams": [int(w.size) for w in streams]}
    hb = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join([BLOB_MAGIC, struct.pack("<HI", BLOB_VERSION, len(hb)), hb]
                    + [w.astype("<u4").tobytes() for w in streams])
    return Blob(body + struct.pack("<I", zlib.crc32(body)), m, position)


def read_header(data: bytes) -> dict:
    """Validate framing and checksum; return the header. Raises :class:`BlobError`."""
    return _parse(data)[0]


def _parse(data: bytes) -> tuple[dict, int]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BlobError(f"blob: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 14:
        raise BlobError(f"blob: {len(data)} bytes is truncated (shorter than the fixed framing)")
    if data[:4] != BLOB_MAGIC:
        raise BlobError(f"blob: magic {data[:4]!r} is not {BLOB_MAGIC!r}; not a KVTC blob")
    version, hlen = struct.unpack_from("<HI", data, 4)
    if version != BLOB_VERSION:
        raise BlobError(f"blob: version {version}; this kvsqueeze reads version {BLOB_VERSION}")
    if 10 + hlen + 4 > len(data):
        raise BlobError(f"blob: truncated ({len(data)} bytes; the header alone needs {10 + hlen + 4})")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) != crc:
        raise BlobError("blob: checksum mismatch (truncated or corrupted)")
    try:
        header = json.loads(data[10:10 + hlen])
    except ValueError as exc:  # cannot happen with a valid checksum unless written wrongly
        raise BlobError(f"blob: unreadable header ({exc})") from exc
    _check_header(header)
    need = 10 + hlen + 4 * sum(header["streams"]) + 4
    if need != len(data):
        raise BlobError(f"blob: {len(data)} bytes, header describes {need}")
    return header, 10 + hlen


MAX_RATIO = 1e4  # what a header may claim (KVTC's useful range ends far below)
MAX_POSITION = 1 << 26  # 67M tokens: above any model's context


def _check_header(header) -> None:
    """Every field of a header of the expected type and range (a well-framed, checksummed blob can
    still describe nonsense if it was forged or written by a broken encoder)."""
    if not isinstance(header, dict):
        raise BlobError("blob: header is not an object")

    def whole(name, lo, hi):
        v = header.get(name)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise BlobError(f"blob: header field {name}={v!r}; expected a whole number in [{lo}, {hi}]")

    for name in ("n_layers", "kv_heads", "head_dim"):
        whole(name, 1, 1 << 16)
    whole("n_tokens", 1, 1 << 31)
    whole("position", 0, MAX_POSITION)
    if not isinstance(header.get("dtype"), str) or header["dtype"] not in _DTYPES:
        raise BlobError(f"blob: header field dtype={header.get('dtype')!r}; expected one of {', '.join(_DTYPES)}")
    r = header.get("ratio")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 1 <= r <= MAX_RATIO:
        raise BlobError(f"blob: header field ratio={r!r}; expected a number in [1, {MAX_RATIO:g}]")
    for name in ("allocation", "calibration", "model"):
        if not isinstance(header.get(name), str):
            raise BlobError(f"blob: header field {name}={header.get(name)!r}; expected a string")
    streams = header.get("streams")
    if (not isinstance(streams, list) or len(streams) != 2 * header["n_layers"]
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in streams)):
        raise BlobError(f"blob: header field streams={str(streams)[:60]}; expected "
                        f"{2 * header['n_layers']} word counts >= 0")


def decode(cal: Calibration, blob: Blob | bytes, dtype: torch.dtype | None = None):
    """Inverse of :func:`encode`: per layer ``[kv_heads, m, head_dim]`` keys (RoPE re-applied) and values."""
    data = blob.data if isinstance(blob, Blob) else blob
    header, offset = _parse(data)
    if header["model"] != cal.model_fingerprint:
        raise BlobError(f"blob: made for model {header['model']}, this calibration is for "
                        f"{cal.model_fingerprint}")
    if header["calibration"] != cal.fingerprint():
        raise BlobError(f"blob: made with calibration {header['calibration']}, this one is "
                        f"{cal.fingerprint()}")
    alloc = cal.allocation(header["ratio"])
    if allocation_id(alloc) != header["allocation"]:
        raise BlobError("blob: bit allocation differs from the one it was encoded with")
    if (header["n_layers"], header["kv_heads"], header["head_dim"]) != (
            cal.n_layers, cal.kv_heads, cal.head_dim):
        raise BlobError(f"blob: shape {header['n_layers']}x{header['kv_heads']}x{header['head_dim']} "
                        f"differs from the calibration's model")
    m, pos = header["n_tokens"], header["position"]
    dense_per_token = 2 * cal.n_layers * cal.kv_heads * cal.head_dim * 2
    if m * dense_per_token > 8 * header["ratio"] * len(data) + 64 * dense_per_token:
        raise BlobError(f"blob: {m} tokens in {len(data)} bytes at ratio {header['ratio']:g}; a blob of that "
                        "many tokens would be far larger")
    out_dtype = dtype or _DTYPES[header["dtype"]]
    cos, sin = rope_cos_sin(cal.rope_inv_freq, cal.rope_scaling, torch.arange(pos, pos + m))
    words = np.frombuffer(bytes(data), dtype="<u4", offset=offset, count=sum(header["streams"]))
    codes, at, idx = {}, 0, 0
    for layer in range(cal.n_layers):
        for kind in KINDS:
            n_words = header["streams"][idx]
            try:
                codes[(layer, kind)] = decode_codes(words[at:at + n_words].astype(np.uint32), m, cal, layer,
                                                    kind, alloc[(layer, kind)])
            except Exception as exc:  # the coder's own error on inconsistent streams
                raise BlobError(f"blob: stream {idx} does not decode ({exc})") from exc
            at += n_words
            idx += 1
    stacked = _stacked_synthesis(cal)
    if stacked is not None:  # one group per (layer, kind): all layers in one batched product
        return _synthesise_stacked(cal, stacked, codes, alloc, cos, sin, out_dtype)
    keys, values = [], []
    for layer in range(cal.n_layers):
        for kind in KINDS:
            z = dequantize(codes[(layer, kind)], alloc[(layer, kind)])
            x = from_coefficients(cal, layer, kind, z, cos, sin).to(out_dtype)
            (keys if kind == "k" else values).append(x)
    return keys, values


def _stacked_synthesis(cal: Calibration):
    """Synthesis of every (layer, kind) stacked, float32 (``None`` unless each has one PCA group)."""
    if "stacked" not in cal._model_cache:
        order = [(layer, kind) for layer in range(cal.n_layers) for kind in KINDS]
        if all(len(cal.stats[k].groups) == 1 for k in order):
            st = [cal.stats[k] for k in order]
            sigma = torch.stack([s.sigma.double().clamp_min(1e-12) for s in st])      # [LK, D]
            synth = torch.stack([s.synths[0].double().T for s in st])                   # [LK, D, D]
            cal._model_cache["stacked"] = ((sigma[:, :, None] * synth).float(),        # rows scaled
                                           torch.stack([s.means[0].double() for s in st]).float())
        else:
            cal._model_cache["stacked"] = None
    return cal._model_cache["stacked"]


def _synthesise_stacked(cal: Calibration, stacked, codes: dict, alloc: dict, cos, sin, out_dtype):
    """:func:`from_coefficients` for all (layer, kind) at once: ``f = (q * step) @ (sigma * synth.T) + mean``
    as one batched float32 product (the coefficients are quantized far coarser than float32 rounds)."""
    synth, mean = stacked
    order = [(layer, kind) for layer in range(cal.n_layers) for kind in KINDS]
    steps = torch.stack([_option_arrays(alloc[k], (1.0, 1.0))[0] for k in order]).float()  # [LK, D]
    q = torch.stack([codes[k] for k in order]).float()                                       # [LK, m, D]
    q.mul_(steps[:, None, :])
    f = torch.baddbmm(mean[:, None, :], q, synth)                                          # [LK, m, D]
    m = f.shape[1]
    x = f.view(cal.n_layers, 2, m, cal.kv_heads, cal.head_dim)
    k = x[:, 0]                                                                             # [L, m, H, hd]
    k = k * cos.float()[:, None, :] + _rotate_half(k) * sin.float()[:, None, :]
    k = k.transpose(1, 2).contiguous().to(out_dtype)                                        # [L, H, m, hd]
    v = x[:, 1].transpose(1, 2).contiguous().to(out_dtype)
    return list(k.unbind(0)), list(v.unbind(0))
