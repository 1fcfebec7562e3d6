"""Quality of a compressed KV cache against the dense cache of the same model.

For each held-out segment of ``P + C + 1`` tokens: a dense prefill of the first ``P`` tokens gives the
prefix cache; each method compresses it; the next ``C`` tokens are then run teacher-forced on top of
the (compressed or dense) prefix cache, and their next-token distributions are compared with the
dense ones. Both sides take the same code path, so ``dense`` scores KL exactly 0.

Reported per method and ratio: mean KL(dense || compressed) over scored positions, averaged over
segments, with its standard error over segments (per-segment values are kept so that two methods
can be compared paired, segment by segment); top-1 agreement; perplexity change on the true next
tokens; achieved compression ratio.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch

from kvsqueeze.cache import CompressedPrefix
from kvsqueeze.corpus import PASSKEY_FILLER, passkey_text
from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.forward import continue_with, dense_prefill, distribution_metrics
from kvsqueeze.methods.base import CompressionMethod, create_spec, get, parse_spec
from kvsqueeze.methods.fusion.batch import fuse_batch
from kvsqueeze.methods.fusion.config import DEFAULT_GROUPING, check_grouping, check_similarity, check_threshold
from kvsqueeze.workload import near_duplicate_workload


@dataclass
class EvalRecord:
    method: str
    ratio_target: float
    ratio_achieved: float
    ratio_unit: str
    kl_mean: float
    kl_se: float
    top1: float
    ppl_dense: float
    ppl: float
    ppl_delta_pct: float
    segments: int
    prefix_tokens: int
    scored_tokens: int
    model: str
    task: str = "kl"
    kl_per_segment: list[float] = field(default_factory=list)
    tokens_held_fraction: float = 1.0
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _se(xs: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def check_lengths(model, prefix_tokens: int, scored_tokens: int) -> None:
    if prefix_tokens < 1:
        raise bad_value("prefix_tokens", prefix_tokens, "a number of tokens >= 1")
    if scored_tokens < 1:
        raise bad_value("scored_tokens", scored_tokens, "a number of tokens >= 1")
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx is not None and prefix_tokens + scored_tokens > ctx:
        raise bad_value("prefix_tokens + scored_tokens", prefix_tokens + scored_tokens,
                        f"at most the model's context of {ctx} tokens")


def evaluate_kl(model, segments: list[list[int]], methods: list[CompressionMethod],
                prefix_tokens: int, scored_tokens: int, model_name: str,
                progress=None) -> list[EvalRecord]:
    """Score every method on the same segments; the dense prefill is shared by all of them."""
    check_lengths(model, prefix_tokens, scored_tokens)
    prepare_methods(model, methods)
    observe = max((m.observation_window for m in methods), default=0)
    acc = {id(m): {"kl": [], "top1": [], "nll_ref": [], "nll": [], "ratio": [], "held": [],
                   "details": {}, "sec": 0.0} for m in methods}
    for i, seg in enumerate(segments):
        ids = torch.tensor(seg)
        prefix, cont, targets = ids[:prefix_tokens], ids[prefix_tokens:-1], ids[prefix_tokens + 1:]
        cache, _ = dense_prefill(model, prefix, observe=observe)
        ref_logits = continue_with(model, CompressedPrefix.dense(cache), cont)
        for m in methods:
            t0 = time.perf_counter()
            a = acc[id(m)]
            seg = m.run_segment(model, prefix, cont, prefill=cache)
            a["ratio"].append(seg.ratio)
            a["held"].append(seg.held)
            for k, v in seg.details.items():
                a["details"].setdefault(k, []).append(v)
            kl, top1, nll_ref, nll = distribution_metrics(ref_logits, seg.logits, targets)
            a["sec"] += time.perf_counter() - t0
            a["kl"].append(kl.mean().item())
            a["top1"].append(top1.mean().item())
            a["nll_ref"].append(nll_ref.sum().item())
            a["nll"].append(nll.sum().item())
        if progress:
            progress(i + 1, len(segments))
    records = []
    n_scored = scored_tokens * len(segments)
    for m in methods:
        a = acc[id(m)]
        ppl_ref = math.exp(sum(a["nll_ref"]) / n_scored)
        ppl = math.exp(sum(a["nll"]) / n_scored)
        records.append(EvalRecord(
            method=m.name, ratio_target=m.ratio,
            ratio_achieved=sum(a["ratio"]) / len(a["ratio"]), ratio_unit=m.ratio_unit,
            kl_mean=sum(a["kl"]) / len(a["kl"]), kl_se=_se(a["kl"]),
            top1=sum(a["top1"]) / len(a["top1"]),
            ppl_dense=ppl_ref, ppl=ppl, ppl_delta_pct=100.0 * (ppl / ppl_ref - 1.0),
            segments=len(segments), prefix_tokens=prefix_tokens, scored_tokens=scored_tokens,
            model=model_name, kl_per_segment=a["kl"],
            tokens_held_fraction=sum(a["held"]) / len(a["held"]), seconds=a["sec"],
            details={k: sum(v) / len(v) for k, v in a["details"].items()},
        ))
    return records


def prepare_methods(model, methods: list[CompressionMethod]) -> None:
    """Let methods that need the model (e.g. KVTC's calibration) bind to it before scoring."""
    for m in methods:
        m.prepare(model)


def paired_difference(a: EvalRecord, b: EvalRecord) -> tuple[float, float]:
    """Mean over segments of KL(a) - KL(b), and its paired standard error (same segments)."""
    if len(a.kl_per_segment) != len(b.kl_per_segment) or a.segments != b.segments:
        raise ValueError("paired comparison needs records scored on the same segments")
    d = [x - y for x, y in zip(a.kl_per_segment, b.kl_per_segment)]
    return sum(d) / len(d), _se(d)


# ---------------------------------------------------------------------------------------------
# Passkey retrieval


@dataclass
class PasskeyRecord:
    method: str
    ratio_target: float
    ratio_achieved: float
    accuracy: float
    trials: int
    correct: int
    context_tokens: int
    model: str
    task: str = "passkey"
    depths: list[float] = field(default_factory=list)
    hits: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def passkey_prompt(tokenizer, key: int, depth: float, context_tokens: int) -> list[int]:
    """A ~``context_tokens`` prompt hiding ``key`` at relative ``depth`` in repeated filler.

    The question sits at the end, inside the recent window that every method keeps exact, so what
    is measured is whether the needle survived compression of the middle of the prompt.
    """
    fixed = len(tokenizer(passkey_text(key, 0, 0), add_special_tokens=False)["input_ids"])
    per = len(tokenizer(PASSKEY_FILLER, add_special_tokens=False)["input_ids"])
    reps = max(1, (context_tokens - fixed) // per)
    before = int(round(reps * depth))
    text = passkey_text(key, before, reps - before)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def evaluate_passkey(model, tokenizer, methods: list[CompressionMethod], trials: int,
                     context_tokens: int, model_name: str, seed: int = 0,
                     progress=None) -> list[PasskeyRecord]:
    if trials < 1:
        raise bad_value("trials", trials, "a number of trials >= 1")
    rng = random.Random(seed)
    cases = [(rng.randint(10000, 99999), (i + 0.5) / trials) for i in range(trials)]
    prepare_methods(model, methods)
    observe = max((m.observation_window for m in methods), default=0)
    hits = {id(m): [] for m in methods}
    ratios = {id(m): [] for m in methods}
    n_ctx = 0
    for i, (key, depth) in enumerate(cases):
        ids = torch.tensor(passkey_prompt(tokenizer, key, depth, context_tokens))
        n_ctx = len(ids)
        check_lengths(model, len(ids), 8)
        prefill = dense_prefill(model, ids, observe=observe)
        for m in methods:
            out, ratio = m.greedy(model, ids, max_new=8, eos=tokenizer.eos_token_id, prefill=prefill)
            hits[id(m)].append(str(key) in tokenizer.decode(out))
            ratios[id(m)].append(ratio)
        if progress:
            progress(i + 1, trials)
    return [PasskeyRecord(method=m.name, ratio_target=m.ratio,
                          ratio_achieved=sum(ratios[id(m)]) / trials,
                          accuracy=sum(hits[id(m)]) / trials, trials=trials,
                          correct=sum(hits[id(m)]), context_tokens=n_ctx, model=model_name,
                          depths=[d for _, d in cases], hits=hits[id(m)]) for m in methods]


def parse_ratios(text: str | None) -> list[float | None]:
    if text is None:
        return [None]
    out = []
    for part in str(text).split(","):
        part = part.strip().lower().rstrip("x")
        try:
            r = float(part)
        except ValueError:
            raise bad_value("ratio", part, "a number >= 1, or a comma-separated list such as 2,4,8")
        if not r >= 1:
            raise bad_value("ratio", r, "a number >= 1 (the target compression ratio)")
        out.append(r)
    return out


def build_methods(specs: list[str], ratios: list[float | None],
                  per_method: dict[str, dict] | None = None, **options) -> list[CompressionMethod]:
    """The methods ``specs`` name (``METHOD[:SETTING[:VARIANT]]``): a spec with a setting is one
    instance; a method with a fixed ratio is built once, at its own ratio; a method whose setting is
    its ratio, once per ratio of ``ratios``; any other method once, at its defaults.

    ``per_method`` adds options for one method only (e.g. ``{"dms": {"checkpoint": DIR}}``); a
    method given a checkpoint takes its ratio from it when no ratio is given.
    """
    per_method = per_method or {}
    built: list[CompressionMethod] = []
    for text in specs:
        spec = parse_spec(text)
        cls = get(spec.name)
        opts = {**options, **per_method.get(cls.name, {})}
        if spec.setting is not None:
            built.append(create_spec(spec, **opts))
        elif cls.fixed_ratio is not None:
            built.append(cls(ratio=cls.fixed_ratio, **opts))
        elif cls.setting == "ratio":
            for r in ratios:
                if r is None and "checkpoint" not in opts:
                    raise KvsqueezeError(f"method {cls.name!r} needs a ratio: --ratio 4 (or 2,4,8), or "
                                         f"{cls.name}:4")
                built.append(cls(ratio=r, **opts))
        else:
            built.append(cls(**opts))
    return built


# ---------------------------------------------------------------------------------------------
# Block fusion across the requests of a near-duplicate workload
# ---------------------------------------------------------------------------------------------
@dataclass
class FusionRecord:
    """One (workload kind, similarity, threshold): pages held and quality against dense.

    ``kind == "all"`` pools every kind's requests (pages summed, KL averaged over all requests).
    """

    kind: str
    similarity: str
    threshold: float
    requests: int
    pages_dense: int
    pages_radix: int
    pages_fused: float
    fewer_than_radix: float
    kl_mean: float
    kl_max: float
    top1: float
    kl_per_request: list[float]
    fused_groups: int
    grouping: str = DEFAULT_GROUPING
    candidates: int = 0  # candidate pages, summed over the deciding layers (one for whole pages)
    fused_away: int = 0  # of those, pages fused into another

    @property
    def ratio_paper(self) -> float:
        """The authors' ratio: candidate blocks over distinct fused blocks (no side information, fused
        layers only); ``fewer_than_radix`` is ours (pages held, every layer)."""
        return self.candidates / max(self.candidates - self.fused_away, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio_paper": round(self.ratio_paper, 4)}


def evaluate_batch_fusion(model, tokenizer, kinds: list[str], thresholds: list[float],
                          similarities: list[str], per_group: int = 8, groups: int = 1,
                          prefix_tokens: int = 384, scored_tokens: int = 32, block_size: int = 16,
                          shared_pages: bool = False, online: bool = False,
                          grouping: str = DEFAULT_GROUPING, progress=None) -> list[FusionRecord]:
    """BFF on the near-duplicate workload (``kvsqueeze.workload``): each request's prompt is prefilled
    densely, pages are counted with exact prefix sharing (radix) and with radix + fusion
    (``fuse_batch``), and each request's scored tokens are teacher-forced on its fused cache against
    its dense cache. ``shared_pages``: whole-page sharing across all layers; ``online``: the SGLang
    integration's arrival-order decisions (both: ``fuse_batch``)."""
    similarities = [check_similarity(s) for s in similarities]
    thresholds = [check_threshold(t) for t in thresholds]
    grouping = check_grouping(grouping)
    check_lengths(model, prefix_tokens + 64, scored_tokens)
    records: list[FusionRecord] = []
    for kind in kinds:
        reqs = near_duplicate_workload(tokenizer, kind, groups=groups, per_group=per_group,
                                       prefix_tokens=prefix_tokens, scored_tokens=scored_tokens)
        caches, refs = [], []
        for i, r in enumerate(reqs):
            c, _ = dense_prefill(model, torch.tensor(r.prompt_ids))
            caches.append(c)
            refs.append(continue_with(model, CompressedPrefix.dense(c),
                                      torch.tensor(r.scored_ids)))
            if progress:
                progress(f"{kind} prefill", i + 1, len(reqs))
        for sim in similarities:
            for th in thresholds:
                bf = fuse_batch(caches, [list(r.prompt_ids) for r in reqs], th,
                                block_size=block_size, similarity=sim, shared_pages=shared_pages,
                                online=online, grouping=grouping)
                kls, top1 = [], []
                for i, r in enumerate(reqs):
                    ids = torch.tensor(r.scored_ids)
                    lg = continue_with(model, CompressedPrefix(bf.keys[i], bf.values[i], None, 1, 1),
                                       ids)
                    kl, t1, _, _ = distribution_metrics(refs[i], lg, ids)
                    kls.append(float(kl.mean()))
                    top1.append(float(t1.mean()))
                records.append(FusionRecord(
                    kind, sim, th, len(reqs), bf.pages_dense, bf.pages_radix,
                    round(bf.pages_fused, 2), round(bf.pages_radix / bf.pages_fused, 3),
                    sum(kls) / len(kls), max(kls), sum(top1) / len(top1), kls,
                    bf.stats.fused_groups, grouping, bf.stats.candidates, bf.stats.saved))
                if progress:
                    progress(f"{kind} fusion", len(records), None)
    if len(kinds) > 1:
        for sim in similarities:
            for th in thresholds:
                rs = [r for r in records if r.similarity == sim and r.threshold == th]
                kls = [k for r in rs for k in r.kl_per_request]
                radix, fused = sum(r.pages_radix for r in rs), sum(r.pages_fused for r in rs)
                records.append(FusionRecord(
                    "all", sim, th, len(kls), sum(r.pages_dense for r in rs), radix,
                    round(fused, 2), round(radix / fused, 3), sum(kls) / len(kls), max(kls),
                    sum(r.top1 * r.requests for r in rs) / len(kls), kls,
                    sum(r.fused_groups for r in rs), grouping, sum(r.candidates for r in rs),
                    sum(r.fused_away for r in rs)))
    return records
