"""The DMS gate parameters of a model, and the hooks that compute their logits in a Hugging Face model.

Parameter names follow the released Qwen3-DMS checkpoints (``dms_proj_alpha``, ``dms_proj_alpha_norm``;
see :mod:`kvsqueeze.methods.dms.checkpoint`). The logits go to the active
:class:`~kvsqueeze.methods.dms.run.DMSRun` through kvsqueeze's attention state.
"""

from __future__ import annotations

import torch
from torch import nn

from kvsqueeze.attention import current_state
from kvsqueeze.errors import bad_value
from kvsqueeze.methods.dms import rule
from kvsqueeze.methods.dms.config import DMSConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def supported(model) -> None:
    arch = getattr(model.config, "model_type", None)
    if arch not in SUPPORTED_MODEL_TYPES:
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

    def logits(self, layer: int, layer_input: torch.Tensor) -> torch.Tensor:
        """Projection-gate logits ``[..., kv_heads or 1]`` (float32) from a layer's input (the
        residual stream before its input norm; an engine casts it to the gates' dtype first)."""
        if self.config.gate != "projection":
            raise bad_value("gate", self.config.gate, "'projection' (query-neuron gates have no "
                            "parameters of their own)")
        c = self.config
        return rule.gate_logits(self.layers[layer](layer_input).float(), c.logit_scale, c.logit_bias,
                                c.per_layer, c.evict)


def neuron_index(config) -> torch.Tensor:
    """Positions, in a query of ``heads * head_dim`` values, of the neurons repurposed as gates: the
    last dimension of each GQA group's first query head (one per KV head). ``config``: a Hugging Face
    style model config (``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` or
    ``hidden_size``), as every engine's model carries one."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise bad_value("heads", (heads, kv_heads), "query heads a whole multiple of KV heads")
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv_heads
    return torch.tensor([(g * group) * d + d - 1 for g in range(kv_heads)])


def query_neuron_index(model) -> torch.Tensor:
    """Output rows of ``q_proj`` repurposed as gates (:func:`neuron_index` of the model's config)."""
    return neuron_index(model.config)


def read_query_neuron(query: torch.Tensor, idx: torch.Tensor, config: DMSConfig
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The query-neuron gate of every engine: ``query [..., heads * head_dim]`` after the q-norm (where
    the model has one) and before RoPE -> (gate logits ``[..., kv_heads or 1]`` in float32, the query
    with the neurons zeroed, so that they no longer contribute to ``q . k``)."""
    c = config
    logits = rule.gate_logits(query[..., idx].float(), c.logit_scale, c.logit_bias, c.per_layer, c.evict)
    return logits, zero_neurons(query, idx)


def zero_neurons(query: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A copy of ``query [..., heads * head_dim]`` with the repurposed neurons zeroed: before RoPE
    (:func:`read_query_neuron`) and again after it, which rotates part of each neuron's pair back into
    it (the released code zeroes both times)."""
    out = query.clone()
    out[..., idx] = 0.0
    return out


def zero_query_neuron(query: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``query [b, heads, q, head_dim]`` after RoPE with the repurposed neurons zeroed again (the
    reference attention's layout; :func:`zero_neurons` for an engine's flat layout)."""
    q = query.clone()
    q[:, ::query.shape[1] // n_kv, :, -1] = 0.0
    return q


def install(model, gates: DMSGates) -> list:
    """Register the hooks that compute gate logits into the active DMS run.

    Returns the hook handles. Outside a DMS run the hooks do nothing, so the same model object
    serves as the teacher (original model, repurposed neurons intact) and as the student. A run
    naming other gates (``DMSRun(gates=...)``) is left alone, so several gate sets can be installed
    on one model (e.g. two checkpoints evaluated side by side) without both feeding one run.
    """
    cfg = gates.config
    handles = []
    layers = model.model.layers

    def active_run():
        st = current_state()
        if st is None or st.dms is None or st.dms.gates not in (None, gates):
            return None  # no DMS run (the original model: the teacher) or another gate set's
        return st.dms

    if cfg.gate == "projection":
        for i, layer in enumerate(layers):
            def pre_hook(module, args, kwargs, i=i):
                run = active_run()
                if run is not None:
                    residual = kwargs.get("hidden_states", args[0] if args else None)
                    run.add_logits(i, gates.logits(i, residual))
            handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
    else:
        idx = query_neuron_index(model)
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            # after q_norm where the model has one (Qwen3), before RoPE; the attention zeroes the
            # neuron once more after RoPE (DMSRun.rotated_query)
            target = getattr(attn, "q_norm", None) or attn.q_proj

            def q_hook(module, args, out, i=i, has_norm=target is not attn.q_proj):
                run = active_run()
                if run is None:
                    return None
                flat = out.reshape(*out.shape[:-2], -1) if has_norm else out  # [b, T, heads, d] after q_norm
                logits, flat = read_query_neuron(flat, idx, cfg)
                run.add_logits(i, logits)
                return flat.reshape(out.shape)
            handles.append(target.register_forward_hook(q_hook))
    return handles
