"""Warm start of DMS projection gates from the teacher's own attention (``--init attention``).

Zero-initialised gates evict nothing, and retrofit training spends most of its steps ramping the
evicted fraction up from 0 while the gates find out which tokens matter. On a machine where an hour
buys a seventh of the text the paper's recipe sees (docs/dms.md), that start is costly. This module
gives the gates a start that already evicts at the target ratio:

1. **Head budgets.** The GPU-trained 8x gates evict very different fractions per head (on
   calibration text, one head in six evicts every key it can or none). Here each KV head's budget comes from the
   KL to the teacher when that head alone evicts every key outside its window
   (:func:`head_sensitivity`, on two calibration sequences): fractions ``clip(1 - lam * s, 0, 1)``
   averaging the target ``1 - 1/CR`` (:func:`head_budgets`).
2. **Which keys.** The teacher reads calibration sequences. For every layer, KV head and key ``j``,
   the *far attention* of ``j`` is the largest attention probability any query more than
   ``window`` tokens later gives it (averaged over the query heads of the KV group). DMS evicts
   ``j`` only once it leaves the window, so this is the attention eviction would take away. Per
   head, the keys below that head's budget quantile are labelled "evict" (the sinks never are;
   keys near the end, with few later queries to judge them by, are left out).
3. **Fit.** Each layer's gate (``logit = scale * w . RMSNorm(residual) + bias``, decided from the
   next token's residual, as DMS shifts decisions by one) is fitted to those labels by
   L2-regularised logistic regression. The gate's fixed bias is kept; an offset along the mean
   feature direction stands in for the bias the gate does not have, fitted and then set so that
   each head evicts the labels' fraction.

Measured (docs/dms.md): on held-out text these gates, before any training step, are level with
SnapKV at 7.7x, where equal-budget labels (step 2 with one fraction for every head) were worse
than the plain window at 13.5x.

Training then distils from there (KL to the teacher plus the compression loss), as from zeros.
"""

from __future__ import annotations

import torch

from kvsqueeze.attention import AttentionState, attention_state
from kvsqueeze.errors import bad_value
from kvsqueeze.methods.dms.gates import DMSGates
from kvsqueeze.methods.dms.run import DMSRun


def far_attention(probs: torch.Tensor, n_kv: int, window: int) -> torch.Tensor:
    """``probs [heads, n, n]`` (query x key) -> ``[n_kv, n]``: per key, the largest probability a
    query more than ``window`` positions later gives it, averaged over each KV group's heads.
    Keys with no such query get -1."""
    h, n, _ = probs.shape
    p = probs.float().reshape(n_kv, h // n_kv, n, n).mean(1)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    far = (i - j) > window
    return torch.where(far.to(p.device), p, torch.full((), -1.0, device=p.device)).amax(dim=1)


def eviction_labels(score: torch.Tensor, evict_fraction, sinks: int, last_key: int) -> tuple:
    """``score [n_kv, n]`` -> (bool labels ``[n_kv, m]`` for keys ``sinks..last_key-1``, the key
    range). Per KV head, keys at or below the ``evict_fraction`` quantile of that head's far
    attention are labelled evicted; ``evict_fraction``: one fraction, or one per head (1: every
    key of the head, 0: none)."""
    s = score[:, sinks:last_key]
    frac = torch.as_tensor(evict_fraction, dtype=torch.float32).expand(s.shape[0])
    labels = torch.zeros(s.shape, dtype=torch.bool)
    for h in range(s.shape[0]):
        f = float(frac[h])
        if f >= 1:
            labels[h] = True
        elif f > 0:
            labels[h] = s[h] <= torch.quantile(s[h].float(), f)
    return labels, (sinks, last_key)


def head_sensitivity(model, cfg, seqs: list[torch.Tensor], log=lambda m: None) -> torch.Tensor:
    """``[layers, n_kv]``: mean KL(student || teacher) of next-token distributions when one KV head
    alone evicts every key outside the window (the sinks kept), the other heads none; averaged over
    ``seqs`` (``[1, n]`` token tensors). Each layer's heads run as one batch."""
    n_layers = model.config.num_hidden_layers
    n_kv = model.config.num_key_value_heads
    dev = next(model.parameters()).device
    out = torch.zeros(n_layers, n_kv)
    keep = torch.full((n_kv, n_kv, 1), -1.0, device=dev)  # logits of every head in every batch row
    one = keep.clone()
    one[torch.arange(n_kv), torch.arange(n_kv)] = 1.0  # batch row h: head h evicts
    for s, ids in enumerate(seqs):
        ids = ids.to(dev)
        n = ids.shape[1]
        if n <= cfg.window + 1:
            raise bad_value("sequence length", n, f"more than window + 1 = {cfg.window + 1} tokens")
        with torch.no_grad(), attention_state(AttentionState()):
            teacher = torch.log_softmax(model(ids).logits.float(), -1)
        for layer in range(n_layers):
            run = DMSRun(cfg, mode="hard", gates=object())  # no gate set feeds it: logits preset
            run.logits = {o: (one if o == layer else keep).expand(-1, -1, n) for o in range(n_layers)}
            with torch.no_grad(), attention_state(AttentionState(dms=run)):
                student = torch.log_softmax(model(ids.expand(n_kv, -1)).logits.float(), -1)
            kl = (student.exp() * (student - teacher)).sum(-1)[:, cfg.window + 1:].mean(-1)
            out[layer] += kl.cpu() / len(seqs)
            if (layer + 1) % 10 == 0 or layer + 1 == n_layers:
                log(f"warm start: head sensitivity, sequence {s + 1}/{len(seqs)}, layer {layer + 1}/{n_layers}")
    return out


def head_budgets(sensitivity: torch.Tensor, evict_fraction: float) -> torch.Tensor:
    """Per-head evicted fractions ``clip(1 - lam * s, 0, 1)`` averaging ``evict_fraction``: the heads
    whose far keys matter least give up the most (``lam`` by bisection)."""
    s = sensitivity / sensitivity.mean().clamp_min(1e-12)
    lo, hi = 0.0, 1e6
    for _ in range(200):
        lam = (lo + hi) / 2
        if (1 - lam * s).clamp(0, 1).mean() > evict_fraction:
            lo = lam
        else:
            hi = lam
    return (1 - lo * s).clamp(0, 1)


def fit_gate(x: torch.Tensor, y: torch.Tensor, logit_bias: float, l2: float = 1e-3,
             iters: int = 200) -> torch.Tensor:
    """Logistic regression of ``y [N, n_kv]`` (1 = evict) on ``x [N, d]`` with logits
    ``x @ v + c * (x @ u) + logit_bias``, ``u`` the mean feature direction scaled so that ``x @ u``
    is 1 for the mean row (an offset: the gate has no bias of its own). The offset of each head is
    then moved until the fitted gate evicts the same fraction of rows as its labels (a regression
    on 90/10 labels otherwise overshoots). Returns ``v + c * u`` as ``[d, n_kv]``: the logit
    weights, before the gate's ``logit_scale``."""
    if x.shape[0] != y.shape[0]:
        raise bad_value("x/y rows", (x.shape[0], y.shape[0]), "as many labels as feature rows")
    x = x.float()
    y = y.float()
    mean = x.mean(0)
    u = mean / mean.pow(2).sum().clamp_min(1e-12)
    xu = x @ u
    d, k = x.shape[1], y.shape[1]
    v = torch.zeros(d, k, requires_grad=True)
    c = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([v, c], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ v + xu[:, None] * c + logit_bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + l2 * v.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = (v + u[:, None] * c).detach()
    base = x @ w + logit_bias
    for h in range(k):  # bisection on the offset: evicted fraction = label fraction
        want = y[:, h].mean()
        lo, hi = -100.0, 100.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if ((base[:, h] + mid * xu) > 0).float().mean() > want:
                hi = mid
            else:
                lo = mid
        w[:, h] += lo * u
    return w


def _last_key(n: int, window: int) -> int:
    """Keys before this one have at least a quarter of the sequence of later queries to judge them."""
    return n - window - max(1, n // 4)


def warm_start(model, gates: DMSGates, batches, n_batches: int, evict_fraction: float,
               log=print) -> dict:
    """Fit ``gates`` (projection gates) on ``n_batches`` batches from ``batches``: per-head budgets
    from the head sensitivity of the first two sequences, labels from the teacher's far attention,
    one logistic fit per layer. Returns per-layer figures (label fraction, fitted fraction,
    agreement), their means, and the head sensitivities and budgets."""
    cfg = gates.config
    if cfg.gate != "projection":
        raise bad_value("init", "attention", "projection gates (query_neuron gates start from the "
                        "model's own query neuron)")
    n_layers = len(gates.layers)
    n_kv = gates.layers[0].dms_proj_alpha.out_features
    seqs = [row[None] for _ in range(n_batches) for row in next(batches)]
    for ids in seqs:
        if _last_key(ids.shape[1], cfg.window) <= cfg.sinks + 1:
            raise bad_value("seq_len", ids.shape[1], f"more than {cfg.window + cfg.sinks + 2} tokens "
                            "for the attention warm start")
    sens = head_sensitivity(model, cfg, seqs[:2], log=log)
    budgets = head_budgets(sens, evict_fraction)
    log(f"warm start: per-head budgets from the KL of each head's eviction "
        f"({int((budgets >= 1).sum())} of {budgets.numel()} heads keep only sinks and window, "
        f"{int((budgets <= 0).sum())} keep every key)")
    feats: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    labels: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    residual: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, kw, i=i: residual.__setitem__(i, kw.get("hidden_states", a[0] if a else None).detach()),
        with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    try:
        for b, ids in enumerate(seqs):
            last_key = _last_key(ids.shape[1], cfg.window)
            state = AttentionState(capture_last=ids.shape[1])
            with torch.no_grad(), attention_state(state):
                model(ids.to(next(model.parameters()).device))
            for i in range(n_layers):
                y, (lo, hi) = eviction_labels(far_attention(state.captured[i], n_kv, cfg.window),
                                              budgets[i], cfg.sinks, last_key)
                with torch.no_grad():
                    x = gates.layers[i].dms_proj_alpha_norm(residual[i][0, lo + 1:hi + 1].float())
                feats[i].append(x.cpu())
                labels[i].append(y.T.cpu())
            state.captured.clear()
            log(f"warm start: teacher attention of sequence {b + 1}/{len(seqs)}")
    finally:
        for h in hooks:
            h.remove()
    report = []
    for i in range(n_layers):
        x, y = torch.cat(feats[i]), torch.cat(labels[i])
        w = fit_gate(x, y, cfg.logit_bias)
        with torch.no_grad():
            gates.layers[i].dms_proj_alpha.weight.copy_((w / cfg.logit_scale).T.to(
                gates.layers[i].dms_proj_alpha.weight.dtype))
            pred = (x @ w + cfg.logit_bias) > 0
        report.append({"layer": i, "label_evicted": y.float().mean().item(),
                       "fitted_evicted": pred.float().mean().item(),
                       "agreement": (pred == y).float().mean().item()})
    mean = {k: sum(r[k] for r in report) / len(report) for k in ("label_evicted", "fitted_evicted", "agreement")}
    log(f"warm start fitted: evicts {mean['fitted_evicted']:.3f} of keys (labels {mean['label_evicted']:.3f}), "
        f"agreement {mean['agreement']:.3f}")
    return {"layers": report, **mean, "head_sensitivity": sens.tolist(), "head_budgets": budgets.tolist()}
