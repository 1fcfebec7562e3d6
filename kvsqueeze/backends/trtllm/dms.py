"""DMS on TensorRT-LLM's PyTorch backend: a registered model whose attention applies the DMS gates.

Engine-agnostic part (imports nothing from TensorRT-LLM; every decision is
:mod:`kvsqueeze.methods.dms.rule`'s; tested on CPU against that rule and against
:class:`kvsqueeze.methods.dms.run.DMSRun`, the reference the HF path is tested with):

- :class:`EvictionFlags`: per engine cache slot and layer, which tokens are marked for eviction. The
  logit computed at token ``t`` decides token ``t - 1`` (shift by one); the first ``sinks`` tokens and
  the newest token are never marked; a slot is rewritten from position 0 when a new sequence takes it
  (as the engine rewrites its KV there), so flags never leak between requests.
- :func:`keep_mask`: the per-KV-head mask of one request's queries: causal, and a marked key is
  dropped once it is more than ``window`` tokens behind the query (delayed eviction).
- :func:`dms_attention`: softmax attention of one request's queries over its cached keys under that
  mask, grouped-query heads mapped to their KV head as the engine's vanilla backend does.

TensorRT-LLM part (created on first access when ``tensorrt_llm`` imports; verified only by
``scripts/check_trtllm_gpu.sh`` on a GPU machine, not here):

- ``DMSVanillaAttention``: the ``VANILLA`` attention backend with the DMS mask: it receives the gate
  logits of the layer's tokens, updates the slot's flags and attends under :func:`keep_mask`;
- ``KvsqueezeDMSLlamaForCausalLM`` and ``KvsqueezeDMSQwen3ForCausalLM``: registered with
  ``register_auto_model``; Llama / Qwen3 models whose decoder layers hand gate logits to their
  attention backend: projection gates from the layer input (the residual stream the input norm
  returns), query-neuron gates from the query in the module's RoPE (:class:`QueryNeuronRotary`: read
  after the q-norm, zeroed before and after RoPE; Qwen3's fused q/k-norm + RoPE kernel is turned off
  for it); ``load_weights`` takes the DMS parameters (released naming,
  ``model.layers.N.self_attn.dms_proj_alpha[_norm].weight``; none for query-neuron gates) out of the
  checkpoint and loads the rest as the base model's weights.

:func:`export_checkpoint` writes a directory TensorRT-LLM loads as that model (HF weights, config with
``architectures`` naming ours and ``kvsqueeze_dms`` = the DMS config; projection gates in
``dms_gates.safetensors`` under the released names). Serve it with ``attn_backend="VANILLA"`` after
``kvsqueeze.backends.trtllm.dms.register()`` (registers the architecture in the calling process).

Memory: TensorRT-LLM 1.2's vanilla backend keeps each sequence in one contiguous cache block, and its
C++ block manager has no call that returns part of a live sequence's blocks, so DMS on 1.2.x saves
attention reads of evicted tokens only in the sense that they are masked, not memory. Reclaiming
evicted pages needs the KV-compression manager hooks of newer releases (``on_generation_step_end`` with
compaction on ``KVCacheManagerV2``); :func:`reclaim_support` reports which applies (docs/trtllm.md).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.methods.dms import rule
from kvsqueeze.methods.dms.checkpoint import load_released_tensors, released_tensors, split_released
from kvsqueeze.methods.dms.config import GATES_FILE, DMSConfig
from kvsqueeze.methods.dms.gates import DMSGates, neuron_index, read_query_neuron, zero_neurons

ARCHITECTURE = "KvsqueezeDMSLlamaForCausalLM"
ARCHITECTURES = {"llama": ARCHITECTURE, "qwen3": "KvsqueezeDMSQwen3ForCausalLM"}  # model_type -> ours
CONFIG_KEY = "kvsqueeze_dms"


class EvictionFlags:
    """Eviction marks per (cache slot, layer): bool ``[capacity, kv_heads]``, grown on demand."""

    def __init__(self, config: DMSConfig, kv_heads: int):
        if kv_heads < 1:
            raise bad_value("kv_heads", kv_heads, "a number of KV heads >= 1")
        self.config, self.kv_heads = config, kv_heads
        self._flags: dict[tuple[int, int], torch.Tensor] = {}
        self._lengths: dict[tuple[int, int], int] = {}

    def _buffer(self, key, need: int, device) -> torch.Tensor:
        buf = self._flags.get(key)
        if buf is None or buf.shape[0] < need or buf.device != torch.device(device):
            new = torch.zeros(max(need, 2 * (0 if buf is None else buf.shape[0]), 64), self.kv_heads,
                              dtype=torch.bool, device=device)
            if buf is not None:
                new[:buf.shape[0]] = buf.to(device)
            self._flags[key] = buf = new
        return buf

    def update(self, slot: int, layer: int, start: int, logits: torch.Tensor) -> None:
        """Record the gate logits ``[n, kv_heads or 1]`` of tokens ``start .. start + n - 1``."""
        n = logits.shape[0]
        if logits.dim() != 2 or logits.shape[1] not in (1, self.kv_heads):
            raise bad_value("logits", tuple(logits.shape), f"[tokens, {self.kv_heads} or 1]")
        key = (slot, layer)
        if start == 0:
            self._lengths[key] = 0  # a new sequence in this slot: nothing before it counts
        elif self._lengths.get(key) != start:
            raise KvsqueezeError(f"DMS flags of slot {slot}, layer {layer}: tokens from {start} given, "
                                 f"but {self._lengths.get(key, 0)} were recorded")
        buf = self._buffer(key, start + n, logits.device)
        first, decided = rule.decide_chunk(logits.expand(n, self.kv_heads).T, start, self.config.sinks)
        buf[first:first + decided.shape[-1]] = decided.T
        buf[start + n - 1] = False  # the newest token is undecided
        self._lengths[key] = start + n

    def flags(self, slot: int, layer: int) -> torch.Tensor:
        key = (slot, layer)
        return self._flags[key][:self._lengths.get(key, 0)]

    def held(self, slot: int, layer: int, position: int) -> torch.Tensor:
        """Tokens per KV head still attendable by a query at ``position`` (the cache DMS keeps)."""
        f = self.flags(slot, layer)[:position + 1]
        k = torch.arange(f.shape[0], device=f.device)
        return (~(f & ((position - k) > self.config.window)[:, None])).sum(0)

    def release(self, slot: int) -> None:
        for key in [k for k in self._flags if k[0] == slot]:
            del self._flags[key]
            self._lengths.pop(key, None)


def keep_mask(flags: torch.Tensor, q_start: int, q_len: int, window: int) -> torch.Tensor:
    """Bool ``[kv_heads, q_len, q_start + q_len]``: which keys each new query attends (``flags``:
    ``[tokens, kv_heads]``, the engine slot's layout)."""
    k_len = q_start + q_len
    if flags.shape[0] < k_len:
        raise bad_value("flags", tuple(flags.shape), f"at least {k_len} tokens")
    return rule.visible(flags[:k_len].T, q_start, q_len, window)


def dms_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                  scale: float | None = None) -> torch.Tensor:
    """``q [q_len, heads, d]``, ``k``/``v`` ``[k_len, kv_heads, d]``, ``keep [kv_heads, q_len, k_len]``
    -> ``[heads, q_len, d]`` (the vanilla backend's per-request output layout)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    qh = q.transpose(0, 1).unsqueeze(0)                                     # [1, H, q, d]
    kh = k.transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0).to(q.dtype)
    vh = v.transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0).to(q.dtype)
    mask = keep.repeat_interleave(group, 0).unsqueeze(0)                    # [1, H, q, k]
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.squeeze(0)


def gate_logits(gates: DMSGates, layer: int, layer_input: torch.Tensor) -> torch.Tensor:
    """Projection-gate logits ``[tokens, kv_heads or 1]`` from the layer input (pre-norm residual)."""
    cfg = gates.config
    if cfg.gate != "projection":
        raise bad_value("gate", cfg.gate, "'projection' (query-neuron gates are read in RoPE: QueryNeuronRotary)")
    weight = gates.layers[layer].dms_proj_alpha.weight
    if weight.device != layer_input.device:  # the engine may build the model before placing it
        gates.to(layer_input.device)
    return gates.logits(layer, layer_input.to(weight.dtype))


class QueryNeuronRotary(torch.nn.Module):
    """A layer's RoPE for query-neuron gates, with the call convention of TensorRT-LLM's
    ``RotaryEmbedding`` (``rotary(position_ids, [q, k], ...) -> [q, k]``, ``q [tokens, heads * head_dim]``):
    the repurposed neurons of the query (after the q-norm where the model has one, before RoPE) are read
    as the gate logits and handed to the layer's attention backend (``backend.dms_logits``), zeroed, and
    zeroed again after RoPE (:func:`kvsqueeze.methods.dms.gates.read_query_neuron`, ``zero_neurons``: the
    rule every engine calls)."""

    def __init__(self, rotary, idx: torch.Tensor, config: DMSConfig, kv_heads: int, backend):
        super().__init__()
        self.rotary, self.config, self.kv_heads, self._backend = rotary, config, kv_heads, [backend]
        self.register_buffer("idx", idx, persistent=False)

    def forward(self, position_ids, targets, *args, **kwargs):
        q, *rest = targets
        n, idx = q.shape[0], self.idx.to(q.device)
        logits, flat = read_query_neuron(q.reshape(n, -1), idx, self.config)
        self._backend[0].dms_logits = logits.expand(n, self.kv_heads)
        out = list(self.rotary(position_ids, [flat.reshape(q.shape), *rest], *args, **kwargs))
        out[0] = zero_neurons(out[0].reshape(n, -1), idx).reshape(out[0].shape)
        return out


def reclaim_support(version: tuple[int, ...] | None) -> tuple[bool, str]:
    """Whether this TensorRT-LLM can return evicted tokens' memory, and why (not)."""
    if version is None:
        return False, "TensorRT-LLM is not installed"
    try:  # the KV-compression manager framework of newer releases
        import tensorrt_llm._torch.pyexecutor.resource_manager as rm  # noqa: F401
        has_v2 = hasattr(rm, "KVCacheManagerV2")
    except Exception:  # noqa: BLE001
        has_v2 = False
    if not has_v2:
        return False, (f"TensorRT-LLM {'.'.join(map(str, version))}: no KVCacheManagerV2, and the C++ block "
                       "manager cannot release part of a live sequence; DMS masks evicted tokens only")
    return False, ("KVCacheManagerV2 found: its KV-compression manager hooks (on_generation_step_end, "
                   "compaction) are the way to reclaim; kvsqueeze does not drive them yet, DMS masks only")


# ---------------------------------------------------------------------------------------------
# Checkpoint for TensorRT-LLM


def export_checkpoint(model_dir: str | Path, gates: DMSGates, out: str | Path) -> Path:
    """Write ``out``: the HF model of ``model_dir`` (Llama or Qwen3) with the DMS gates, loadable by
    TensorRT-LLM as the matching architecture of :data:`ARCHITECTURES` (see the module docstring)."""
    from safetensors.torch import save_file

    model_dir, out = Path(model_dir), Path(out)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise bad_value("model", str(model_dir), "a Hugging Face model directory with a config.json")
    config = json.loads(cfg_path.read_text())
    if config.get("model_type") not in ARCHITECTURES:
        raise bad_value("model_type", config.get("model_type"),
                        f"one of {', '.join(ARCHITECTURES)} (the TensorRT-LLM DMS models extend those)")
    if gates.config.gate == "projection" and len(gates.layers) != config["num_hidden_layers"]:
        raise bad_value("gates", len(gates.layers), f"{config['num_hidden_layers']} layers (the model's)")
    if out.exists() and any(out.iterdir()):
        raise bad_value("out", str(out), "a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    config["architectures"] = [ARCHITECTURES[config["model_type"]]]
    config[CONFIG_KEY] = asdict(gates.config)
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    if gates.config.gate == "projection":  # query-neuron gates have no tensors of their own
        save_file(released_tensors(gates), str(out / GATES_FILE))
    return out


# ---------------------------------------------------------------------------------------------
# TensorRT-LLM classes (built on first access)


def _build():  # pragma: no cover - needs TensorRT-LLM
    from kvsqueeze.backends.trtllm import require

    require("DMS on TensorRT-LLM")
    from tensorrt_llm._torch.attention_backend.vanilla import VanillaAttention
    from tensorrt_llm._torch.models.modeling_llama import LlamaForCausalLM
    from tensorrt_llm._torch.models.modeling_qwen3 import Qwen3ForCausalLM
    from tensorrt_llm._torch.models.modeling_utils import register_auto_model

    class DMSVanillaAttention(VanillaAttention):
        """VANILLA attention under the DMS mask; ``dms_logits`` is set by the layer before each call."""

        def dms_setup(self, flags: EvictionFlags, layer: int) -> None:
            self.dms_flags, self.dms_layer, self.dms_logits, self._dms_at = flags, layer, None, 0

        def forward(self, q, k, v, metadata, **kwargs):
            if self.dms_logits is None or self.dms_logits.shape[0] != q.shape[0]:
                # the gate was not read this step (a fused norm or RoPE path): never reuse another
                # step's decisions
                raise KvsqueezeError(
                    f"DMS on TensorRT-LLM: layer {self.dms_layer} got no gate logits for its "
                    f"{q.shape[0]} tokens; the decoder layer must call its input_layernorm (projection "
                    "gates) or its rotary embedding (query-neuron gates); fused norm/all-reduce and "
                    "fused RoPE paths are not supported")
            self._dms_at = 0
            try:
                return super().forward(q, k, v, metadata, **kwargs)
            finally:
                self.dms_logits = None

        def _single_request_forward(self, q, k, v, attention_mask, kv_cache_tensor, past_seen_token,
                                    cache_idx):
            n = q.size(0)
            logits = self.dms_logits[self._dms_at:self._dms_at + n]
            self._dms_at += n
            q = q.view(n, self.num_heads, self.head_dim)
            if k is not None and v is not None:
                k = k.view(1, -1, self.num_kv_heads, self.head_dim)
                v = v.view(1, -1, self.num_kv_heads, self.head_dim)
                k_len = past_seen_token + k.shape[1]
            else:
                k_len = past_seen_token
            position = torch.arange(past_seen_token, k_len, device=q.device)
            keys, values = self._single_request_update_kv_cache(k, v, kv_cache_tensor, k_len, int(cache_idx),
                                                                position)
            self.dms_flags.update(int(cache_idx), self.dms_layer, past_seen_token, logits)
            keep = keep_mask(self.dms_flags.flags(int(cache_idx), self.dms_layer), past_seen_token, n,
                             self.dms_flags.config.window)
            return dms_attention(q, keys[0], values[0], keep)

    class _GateRecorder(torch.nn.Module):
        """Wraps a decoder layer's input norm: the residual it returns is the layer input the gates read."""

        def __init__(self, norm, gates: DMSGates, layer: int, backend):
            super().__init__()
            self.norm, self._gates, self.layer, self._backend = norm, [gates], layer, backend

        def forward(self, hidden_states, residual=None, *args, **kwargs):
            layer_input = hidden_states if residual is None else hidden_states + residual
            out = self.norm(hidden_states, residual, *args, **kwargs) if residual is not None \
                else self.norm(hidden_states, *args, **kwargs)
            self._backend.dms_logits = gate_logits(self._gates[0], self.layer, layer_input.reshape(
                -1, layer_input.shape[-1]))
            return out

    def dms_model(base):
        """``base`` (a TensorRT-LLM causal LM) whose attention applies the DMS gates of its config."""

        class DMSModel(base):
            def __init__(self, model_config):
                super().__init__(model_config)
                pc = model_config.pretrained_config
                cfg = DMSConfig(**getattr(pc, CONFIG_KEY))
                self.dms_gates = DMSGates(cfg, pc.hidden_size, pc.num_hidden_layers, pc.num_key_value_heads,
                                          getattr(pc, "rms_norm_eps", 1e-6)).to(pc.torch_dtype)
                self.dms_flags = EvictionFlags(cfg, pc.num_key_value_heads)
                idx = neuron_index(pc)
                for i, layer in enumerate(self.model.layers):
                    attn = layer.self_attn
                    backend = attn.attn
                    if type(backend) is not VanillaAttention:
                        raise KvsqueezeError(f"DMS on TensorRT-LLM: layer {i} attention backend is "
                                             f"{type(backend).__name__}; expected VanillaAttention "
                                             "(LLM(..., attn_backend='VANILLA'))")
                    backend.__class__ = DMSVanillaAttention
                    backend.dms_setup(self.dms_flags, i)
                    if cfg.gate == "projection":
                        layer.input_layernorm = _GateRecorder(layer.input_layernorm, self.dms_gates, i, backend)
                        continue
                    # query-neuron gates: read in the module's RoPE, which must not be fused away
                    if getattr(attn, "fuse_qk_norm_rope", False):
                        attn.fuse_qk_norm_rope = False  # Qwen3: q/k norm, then the module's RoPE
                    if getattr(attn, "rope_fusion", False) or getattr(attn, "rotary_emb", None) is None:
                        raise KvsqueezeError(f"DMS on TensorRT-LLM: layer {i} fuses RoPE into its attention "
                                             "kernel; query-neuron gates need the module's own RoPE "
                                             "(attn_backend='VANILLA')")
                    attn.rotary_emb = QueryNeuronRotary(attn.rotary_emb, idx, cfg, pc.num_key_value_heads, backend)

            def load_weights(self, weights, *args, **kwargs):
                gate = self.dms_gates.config.gate
                rest, gate_tensors = split_released(dict(weights), len(self.model.layers), gate)
                out = super().load_weights(rest, *args, **kwargs)
                if gate == "projection":
                    device = self.dms_gates.layers[0].dms_proj_alpha.weight.device
                    load_released_tensors(self.dms_gates, {k: t.to(device) for k, t in gate_tensors.items()})
                return out

        return DMSModel

    built = {"DMSVanillaAttention": DMSVanillaAttention}
    for arch, base in ((ARCHITECTURES["llama"], LlamaForCausalLM), (ARCHITECTURES["qwen3"], Qwen3ForCausalLM)):
        cls = dms_model(base)
        cls.__name__ = cls.__qualname__ = arch
        built[arch] = register_auto_model(arch)(cls)
    return built


_BUILT: dict | None = None


def __getattr__(name):  # pragma: no cover - needs TensorRT-LLM
    global _BUILT
    if name == "DMSVanillaAttention" or name in ARCHITECTURES.values():
        if _BUILT is None:
            _BUILT = _build()
        return _BUILT[name]
    raise AttributeError(name)


def register() -> None:  # pragma: no cover - needs TensorRT-LLM
    """Register :data:`ARCHITECTURES` with TensorRT-LLM (call before ``LLM(...)``)."""
    __getattr__(ARCHITECTURE)
