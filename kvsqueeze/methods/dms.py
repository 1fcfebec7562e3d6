"""DMS: Dynamic Memory Sparsification (arXiv 2506.05345), the engine-agnostic part.

A learned binary decision per token and KV head (or per layer): evict or keep. The logit produced
at token ``t`` decides the fate of token ``t - 1`` (shift by one). Eviction is delayed: a token
marked for eviction stays attendable until it leaves the window of the ``w`` most recent tokens.

Two gate kinds predict the logit:

* ``projection``: a new zero-initialised ``Linear(hidden, n_kv_heads)`` on an RMS norm of the layer
  input; ``logit = out * 100 - 5`` (starts at "keep");
* ``query_neuron``: no new parameters; ``logit = q * 100 - 5`` from the last neuron of the first query
  head of each GQA group (after q-norm, before RoPE), which is then zeroed so that it no longer
  contributes to ``q . k``.

Parameter names and config keys follow the released checkpoints (docs/dms.md).

Training relaxes the decision to ``alpha = sigmoid((logit + g1 - g2) / tau)`` with Gumbel noise and
uses a straight-through estimator: the forward pass applies the hard decision ``alpha > 0.5``
exactly as inference does, the backward pass the gradient of the soft mask ``log(1 - alpha)``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from kvsqueeze.errors import KvsqueezeError, bad_value

GATE_KINDS = ("projection", "query_neuron")
GRANULARITIES = ("head", "layer")
HARD_MASK = -1e4  # finite: a fully masked row can never produce NaN
CONFIG_FILE = "dms_config.json"
GATES_FILE = "dms_gates.safetensors"


@dataclass(frozen=True)
class DMSConfig:
    window: int = 64
    sinks: int = 4  # the first tokens are never evicted (attention sinks); 0 = the paper exactly
    gate: str = "projection"
    granularity: str = "head"
    target_ratio: float = 4.0
    tau: float = 0.1
    logit_scale: float = 100.0
    logit_bias: float = -5.0

    def __post_init__(self):
        if not isinstance(self.window, int) or self.window < 1:
            raise bad_value("window", self.window, "an integer number of tokens >= 1")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise bad_value("sinks", self.sinks, "a number of tokens >= 0")
        if self.gate not in GATE_KINDS:
            raise bad_value("gate", self.gate, f"one of {', '.join(GATE_KINDS)}")
        if self.granularity not in GRANULARITIES:
            raise bad_value("granularity", self.granularity, f"one of {', '.join(GRANULARITIES)}")
        if not self.target_ratio >= 1:
            raise bad_value("target_ratio", self.target_ratio, "a compression ratio >= 1")
        if not self.tau > 0:
            raise bad_value("tau", self.tau, "a temperature > 0")

    def save(self, directory: Path) -> None:
        (Path(directory) / CONFIG_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "DMSConfig":
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise KvsqueezeError(f"checkpoint={str(directory)!r}: {CONFIG_FILE} is missing; expected a "
                                 "DMS checkpoint written by `kvsqueeze dms train`")
        try:
            return cls(**json.loads(path.read_text()))
        except (TypeError, ValueError) as exc:
            raise KvsqueezeError(f"{path}: not a valid DMS config ({exc})") from exc


def supported(model) -> None:
    arch = getattr(model.config, "model_type", None)
    if arch not in ("llama", "qwen2", "qwen3", "mistral"):
        raise bad_value("model_type", arch, "a Llama/Qwen/Mistral-family decoder (supported by DMS)")


class GateLayer(nn.Module):
    """One layer's DMS parameters, named as in the released Qwen3-DMS checkpoints."""

    def __init__(self, hidden: int, n_kv: int, eps: float):
        super().__init__()
        self.dms_proj_alpha_norm = nn.RMSNorm(hidden, eps=eps)
        self.dms_proj_alpha = nn.Linear(hidden, n_kv, bias=False)
        nn.init.zeros_(self.dms_proj_alpha.weight)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        return self.dms_proj_alpha(self.dms_proj_alpha_norm(residual))


class DMSGates(nn.Module):
    """The DMS parameters of a model: for ``projection`` gates, per layer an RMSNorm of the layer's
    input (the residual stream before the attention norm) and a zero-initialised
    ``Linear(hidden, n_kv_heads)``; none for ``query_neuron`` gates. Per-layer granularity uses the
    first KV head's logit for every head, as the released code does."""

    def __init__(self, config: DMSConfig, hidden: int, n_layers: int, n_kv: int, eps: float = 1e-6):
        super().__init__()
        self.config = config
        if config.gate == "projection":
            self.layers = nn.ModuleList(GateLayer(hidden, n_kv, eps) for _ in range(n_layers))
        else:
            self.layers = nn.ModuleList()

    @classmethod
    def for_model(cls, model, config: DMSConfig) -> "DMSGates":
        supported(model)
        c = model.config
        gates = cls(config, c.hidden_size, c.num_hidden_layers, c.num_key_value_heads,
                    getattr(c, "rms_norm_eps", 1e-6))
        return gates.to(next(model.parameters()).dtype)


def query_neuron_index(model) -> torch.Tensor:
    """Output rows of ``q_proj`` repurposed as gates: last neuron of each group's first query head."""
    c = model.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    group = c.num_attention_heads // c.num_key_value_heads
    return torch.tensor([(g * group) * d + d - 1 for g in range(c.num_key_value_heads)])


class DMSRun:
    """Per-forward state of DMS: gate logits of every token seen so far, per layer.

    ``mode``: ``"hard"`` (inference: evict when logit > 0) or ``"train"`` (Gumbel-sigmoid,
    straight-through). Logits accumulate across calls, so prefill followed by decode steps on the
    same run sees the whole history. ``keep_from``: keys at this position and later are never
    evicted (the evaluation's prefix-only protocol: the scored tokens are held, as every other
    method holds them); ``None``: every key is subject to the gates. ``gates``: the gate set whose
    hooks feed this run (others installed on the same model stay silent); ``None``: any installed.
    """

    def __init__(self, config: DMSConfig, mode: str = "hard", generator: torch.Generator | None = None,
                 noise: bool = True, forward: str = "soft", keep_from: int | None = None,
                 gates: "DMSGates | None" = None):
        if mode not in ("hard", "train"):
            raise bad_value("mode", mode, "'hard' or 'train'")
        if forward not in ("soft", "straight_through"):
            raise bad_value("forward", forward, "'soft' or 'straight_through'")
        self.config = config
        self.mode = mode
        # Training mask: "soft" = log(1 - alpha) of the relaxed decision in the forward pass (as the
        # released training code does); "straight_through" = the hard decision forward, the soft
        # gradient backward (the forward then equals inference exactly).
        self.forward = forward
        if keep_from is not None and (not isinstance(keep_from, int) or keep_from < 0):
            raise bad_value("keep_from", keep_from, "a token position >= 0 or None")
        if keep_from is not None and mode == "train":
            raise bad_value("keep_from", keep_from, "None in training (every decided key is trained)")
        self.keep_from = keep_from
        self.gates = gates
        self.soft_logits: dict[int, torch.Tensor] = {}
        self.generator = generator
        self.noise = noise  # Gumbel noise in training (off only to compare with hard decisions)
        self.logits: dict[int, torch.Tensor] = {}  # layer -> [b, heads_or_1, T]
        self.alphas: dict[int, torch.Tensor] = {}  # layer -> straight-through alpha [b, h, T-1]

    def add_logits(self, layer: int, logits: torch.Tensor) -> None:
        """``logits``: ``[b, T_new, heads_or_1]`` for the tokens of this call."""
        lg = logits.transpose(1, 2)
        prev = self.logits.get(layer)
        self.logits[layer] = lg if prev is None else torch.cat([prev, lg], dim=-1)

    def eviction(self, layer: int, n_keys: int, n_kv: int):
        """Per-key eviction of keys ``0..n_keys-1``: (hard bool ``[b,h,n]``, ST alpha or None).

        Key ``j`` is decided by the logit of token ``j + 1``; the newest key has no decision yet.
        """
        lg = self.logits[layer][..., 1:n_keys]  # decides keys 0..n_keys-2
        if self.mode == "train":
            dev = self.generator.device if self.generator is not None else lg.device
            u1 = torch.rand(lg.shape, generator=self.generator, device=dev).clamp(1e-9, 1 - 1e-9)
            u2 = torch.rand(lg.shape, generator=self.generator, device=dev).clamp(1e-9, 1 - 1e-9)
            gumbel = (-torch.log(-torch.log(u1)) + torch.log(-torch.log(u2))).to(lg.device)
            if not self.noise:
                gumbel = torch.zeros_like(gumbel)
            x = (lg + gumbel.to(lg.dtype)) / self.config.tau
            soft = torch.sigmoid(x)
            hard = soft > 0.5
            self.soft_logits[layer] = x
            alpha = hard.to(soft.dtype) + soft - soft.detach()
            self.alphas[layer] = alpha
        else:
            hard = lg > 0
            alpha = None
        pad = torch.zeros(*hard.shape[:-1], 1, dtype=hard.dtype, device=hard.device)
        hard = torch.cat([hard, pad], -1)
        sinks = min(self.config.sinks, n_keys)
        if sinks:
            hard[..., :sinks] = False
        if self.keep_from is not None and self.keep_from < n_keys:
            hard[..., self.keep_from:] = False
        if hard.shape[1] == 1:
            hard = hard.expand(-1, n_kv, -1)
        if alpha is not None:
            alpha = torch.cat([alpha, torch.zeros_like(alpha[..., :1])], -1)
            if sinks:
                alpha = torch.cat([torch.zeros_like(alpha[..., :sinks]), alpha[..., sinks:]], -1)
            if alpha.shape[1] == 1:
                alpha = alpha.expand(-1, n_kv, -1)
        return hard, alpha

    def additive_mask(self, layer: int, q_len: int, k_len: int, n_kv: int) -> torch.Tensor:
        """``[b, n_kv, q_len, k_len]`` additive mask for the queries of this call."""
        hard, alpha = self.eviction(layer, k_len, n_kv)
        q_pos = torch.arange(k_len - q_len, k_len, device=hard.device)[:, None]
        k_pos = torch.arange(k_len, device=hard.device)[None, :]
        outside = (q_pos - k_pos) > self.config.window  # [q, k]
        if alpha is None:
            m = torch.where(hard[:, :, None, :] & outside, HARD_MASK, 0.0)
            return m
        if self.forward == "soft":
            x = self.soft_logits[layer]
            x = torch.cat([x, torch.full_like(x[..., :1], -1e4)], -1)  # newest key: undecided, kept
            if x.shape[1] == 1:
                x = x.expand(-1, n_kv, -1)
            sinks = min(self.config.sinks, k_len)
            if sinks:
                x = torch.cat([torch.full_like(x[..., :sinks], -1e4), x[..., sinks:]], -1)
            val = torch.nn.functional.logsigmoid(-x).clamp_min(HARD_MASK)  # log(1 - alpha)
        else:
            soft = torch.log((1 - alpha).clamp_min(1e-6))  # ST: forward log(eps) where evicted
            hard_val = torch.where(alpha.detach() > 0.5, HARD_MASK, 0.0)
            val = hard_val + soft - soft.detach()
        return torch.where(outside, val[:, :, None, :], torch.zeros((), dtype=val.dtype, device=val.device))

    def evicted_fraction(self) -> torch.Tensor:
        """Mean straight-through alpha over layers, heads and decided tokens (training)."""
        return torch.stack([a[..., :-1].mean() for a in self.alphas.values()]).mean()


def install(model, gates: DMSGates) -> list:
    """Register the hooks that compute gate logits into the active :class:`DMSRun`.

    Returns the hook handles. Outside a DMS run the hooks do nothing, so the same model object
    serves as the teacher (original model, repurposed neurons intact) and as the student. A run
    naming other gates (``DMSRun(gates=...)``) is left alone, so several gate sets can be installed
    on one model (e.g. two checkpoints evaluated side by side) without both feeding one run.
    """
    from kvsqueeze.attention import current_state

    cfg = gates.config
    handles = []
    layers = model.model.layers
    per_layer = cfg.granularity == "layer"
    if cfg.gate == "projection":
        for i, layer in enumerate(layers):
            def pre_hook(module, args, kwargs, i=i):
                st = current_state()
                if st is not None and st.dms is not None and st.dms.gates in (None, gates):
                    residual = kwargs.get("hidden_states", args[0] if args else None)
                    lg = gates.layers[i](residual) * cfg.logit_scale + cfg.logit_bias
                    st.dms.add_logits(i, lg[..., :1] if per_layer else lg)
            handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
    else:
        idx = query_neuron_index(model)
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            # after q_norm where the model has one (Qwen3), before RoPE either way
            target = getattr(attn, "q_norm", None) or attn.q_proj

            def q_hook(module, args, out, i=i, has_norm=target is not attn.q_proj):
                st = current_state()
                if st is None or st.dms is None or st.dms.gates not in (None, gates):
                    return None  # no DMS run (the original model: the teacher) or another gate set's
                if has_norm:  # [b, T, heads, d] after q_norm
                    flat = out.reshape(*out.shape[:-2], -1)
                else:
                    flat = out
                lg = flat[..., idx] * cfg.logit_scale + cfg.logit_bias
                st.dms.add_logits(i, lg[..., :1] if per_layer else lg)
                flat = flat.clone()
                flat[..., idx] = 0.0
                return flat.reshape(out.shape)
            handles.append(target.register_forward_hook(q_hook))
    return handles


# ---------------------------------------------------------------------------------------------
# Evaluation: the `dms` method for `kvsqueeze eval`


_RELEASED_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.(dms_proj_alpha(?:_norm)?)\.(weight|bias)$")


def is_released_checkpoint(directory: Path) -> bool:
    """A checkpoint in the released Model-Optimizer format (``dms_*`` keys in config.json)."""
    cfg = Path(directory) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "dms_window_size" in json.loads(cfg.read_text())
    except ValueError:
        return False


def released_config(directory: Path) -> DMSConfig:
    """Map the released config keys onto :class:`DMSConfig` (see docs/dms.md)."""
    c = json.loads((Path(directory) / "config.json").read_text())
    return DMSConfig(
        window=int(c["dms_window_size"]),
        sinks=0,  # the released code keeps no attention sinks
        gate="projection" if c.get("dms_separate_alpha", False) else "query_neuron",
        granularity=c.get("dms_alpha_per", "head"),
        target_ratio=float(c.get("dms_cr", 8)),
        tau=float(c.get("dms_tau", 0.1)),
        logit_scale=float(c.get("dms_alpha_scale", 100.0)),
        logit_bias=-float(c.get("dms_initial_alpha_offset", 5.0)),
    )


def load_config(directory: Path) -> DMSConfig:
    """The DMS config of a kvsqueeze checkpoint, or of a released Model-Optimizer one."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() and is_released_checkpoint(directory):
        return released_config(directory)
    return DMSConfig.load(directory)


def _released_gate_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():
                m = _RELEASED_KEY.match(key)
                if m:
                    if m.group(3) == "bias":
                        raise KvsqueezeError(f"{f}: {key}: gate projections with a bias are not "
                                             "supported; expected bias-free dms_proj_alpha")
                    out[f"layers.{m.group(1)}.{m.group(2)}.weight"] = fh.get_tensor(key)
    return out


def load_gates(directory: Path, model) -> DMSGates:
    """Gates from a kvsqueeze checkpoint or from a released Model-Optimizer DMS checkpoint."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = load_config(directory)
    if not (directory / CONFIG_FILE).is_file():  # released layout (load_config checked it)
        gates = DMSGates.for_model(model, cfg)
        state = _released_gate_tensors(directory)
        if cfg.gate == "projection" and not state:
            raise KvsqueezeError(f"checkpoint={str(directory)!r}: config says dms_separate_alpha but no "
                                 "model.layers.*.self_attn.dms_proj_alpha tensors were found")
        try:
            gates.load_state_dict(state)
        except RuntimeError as exc:
            raise KvsqueezeError(f"{directory}: DMS gate parameters do not fit this model ({exc})") from exc
        return gates.to(next(model.parameters()).dtype)
    gates = DMSGates.for_model(model, cfg)
    path = directory / GATES_FILE
    if not path.is_file():
        raise KvsqueezeError(f"checkpoint={str(directory)!r}: {GATES_FILE} is missing; expected the DMS "
                             "gate parameters written by `kvsqueeze dms train`")
    state = {k: v for k, v in load_file(str(path)).items() if k != "_empty"}
    try:
        gates.load_state_dict(state)
    except RuntimeError as exc:
        raise KvsqueezeError(f"{path}: gate parameters do not fit this model ({exc})") from exc
    return gates


def shipped_gates_dir(ratio: float) -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "dms" / f"smollm2-135m-{ratio:g}x"


def gone_after(run: DMSRun, layer: int, n_tokens: int, n_kv: int) -> torch.Tensor:
    """``[n_kv, n_tokens]``: tokens no longer held once ``n_tokens`` were processed (batch row 0)."""
    hard, _ = run.eviction(layer, n_tokens, n_kv)
    return hard[0] & ((n_tokens - 1 - torch.arange(n_tokens)) > run.config.window)[None, :]


def held_after(run: DMSRun, n_tokens: int, n_kv: int) -> list[torch.Tensor]:
    """Per layer ``[n_kv]`` tokens held once ``n_tokens`` tokens were processed (batch row 0)."""
    return [(~gone_after(run, layer, n_tokens, n_kv)).sum(-1) for layer in sorted(run.logits)]


from kvsqueeze.methods.base import CompressionMethod, register  # noqa: E402


@register
class DMSMethod(CompressionMethod):
    """Learned per-head eviction with a delayed window (needs trained gates).

    ``checkpoint``: a directory from ``kvsqueeze dms train``; without it, the gates shipped for the
    embedded model at ``ratio`` are used. What DMS holds is the ``sinks`` first tokens (4 by default;
    0 in the released checkpoints), the window of the ``window`` most recent tokens, and the tokens
    its gates keep. The achieved ratio is the
    prefix tokens over the tokens actually held after prefill, summed over layers and KV heads.

    ``scored``: what happens to the scored continuation. ``"keep"`` (default): DMS compresses the
    prefix only and holds every scored token, as every other method of ``kvsqueeze eval`` does
    (their ratio is the prefix's, and so is DMS's); flagged prefix tokens still leave as the window
    moves on. ``"evict"``: the gates also evict scored tokens that leave the window, as DMS does while
    it generates (a harder setting than the baselines', at the same prefix ratio).
    """

    name = "dms"
    summary = "Dynamic Memory Sparsification: learned per-head eviction, delayed by a window"
    ratio_unit = "prefix tokens / tokens held after prefill (layers x KV heads)"

    def __init__(self, ratio=None, sinks=4, recent=64, checkpoint: str | None = None, scored: str = "keep",
                 **options):
        if scored not in ("keep", "evict"):
            raise bad_value("scored", scored, "'keep' (prefix-only eviction) or 'evict' (scored "
                            "tokens evicted too)")
        self.scored = scored
        if checkpoint is None:
            if ratio is None:
                raise KvsqueezeError("method 'dms' needs --ratio (shipped gates) or --checkpoint DIR")
            d = shipped_gates_dir(float(ratio))
            if not d.is_dir():
                raise KvsqueezeError(
                    f"ratio={float(ratio):g}: no DMS gates are shipped for this ratio; expected "
                    "--checkpoint DIR from `kvsqueeze dms train`")
            checkpoint = str(d)
        self.checkpoint = Path(checkpoint)
        if not self.checkpoint.is_dir():
            raise bad_value("checkpoint", str(checkpoint), "a DMS checkpoint directory")
        self.config = load_config(self.checkpoint)
        super().__init__(self.config.target_ratio if ratio is None else ratio, sinks, recent, **options)
        self._bound: dict[int, tuple[DMSGates, list]] = {}

    def bind(self, model) -> DMSGates:
        """Install this method's gates on ``model`` (once) and return them (inert outside a run naming
        them)."""
        if id(model) not in self._bound:
            gates = load_gates(self.checkpoint, model)
            self._bound[id(model)] = (gates, install(model, gates))
        return self._bound[id(model)][0]

    def unbind(self, model) -> None:
        gates_handles = self._bound.pop(id(model), None)
        if gates_handles is not None:
            for h in gates_handles[1]:
                h.remove()

    def describe(self) -> str:
        return f"{self.name}@{self.ratio:g}x" + ("" if self.scored == "keep" else "(evict-scored)")

    def segment_details(self) -> dict:
        """Recorded with each evaluation: 1 where the scored tokens were evicted too, 0 where kept."""
        return {"evict_scored": float(self.scored == "evict")}

    def validate_prefix(self, n: int) -> None:
        if self.config.window >= n:
            raise bad_value("prefix_tokens", n, f"more tokens than the DMS window of "
                            f"{self.config.window} (nothing could be evicted)")

    def compress(self, cache):
        raise KvsqueezeError("dms decides eviction inside the model's forward pass; "
                             "it is evaluated through run_segment, not on a finished cache")

    @torch.inference_mode()
    def run_segment(self, model, prefix: torch.Tensor, cont: torch.Tensor):
        """Prefill ``prefix`` and score ``cont`` teacher-forced under hard DMS decisions."""
        from kvsqueeze.attention import AttentionState, attention_state

        gates = self.bind(model)
        n_kv = model.config.num_key_value_heads
        run = DMSRun(self.config, mode="hard", keep_from=len(prefix) if self.scored == "keep" else None,
                     gates=gates)
        with attention_state(AttentionState(dms=run)):
            out = model(prefix[None], use_cache=True)
            held = held_after(run, len(prefix), n_kv)
            logits = model(cont[None], past_key_values=out.past_key_values, use_cache=True).logits[0]
        total = len(prefix) * n_kv * len(held)
        kept = int(sum(h.sum().item() for h in held))
        return logits, kept / total, total / max(kept, 1)

    @torch.inference_mode()
    def greedy(self, model, ids: torch.Tensor, max_new: int, eos: int | None = None,
               margins: list | None = None):
        """Greedy decoding on the reference DMS cache (tokens really dropped per head). ``margins``, if
        given, receives each step's gap between the top two logits (how close a tie it was)."""
        from kvsqueeze.attention import AttentionState, attention_state
        from kvsqueeze.methods.dms_cache import DMSCache

        c = model.config
        run = DMSRun(self.config, mode="hard", gates=self.bind(model))
        cache = DMSCache(run, c.num_hidden_layers, c.num_key_value_heads)
        with attention_state(AttentionState(dms=run)):
            out = model(ids[None], past_key_values=cache, use_cache=True)
            held = int(cache.held().sum())

            def pick(logits):
                if margins is not None:
                    top = logits.float().topk(2).values
                    margins.append(float(top[0] - top[1]))
                return int(logits.argmax())

            tok = pick(out.logits[0, -1])
            toks = [tok]
            for _ in range(max_new - 1):
                if eos is not None and tok == eos:
                    break
                out = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
                tok = pick(out.logits[0, -1])
                toks.append(tok)
        total = len(ids) * c.num_key_value_heads * c.num_hidden_layers
        return toks, total / max(held, 1)
