"""DMS inside SGLang, first stage: the gates run in SGLang's model and attention obeys their decisions.

Turned on by ``KVSQUEEZE_DMS=<checkpoint dir>`` (a ``kvsqueeze dms train`` output or the shipped gates)
with ``--attention-backend dms --disable-radix-cache``; installed by the kvsqueeze plugin:

- **Model.** ``LlamaForCausalLM`` is registered in SGLang's ``ModelRegistry`` as a subclass that, after
  SGLang loads the weights, loads the DMS gates (:func:`kvsqueeze.methods.dms.load_gates`) and hooks
  each layer's ``input_layernorm``: its input is the layer's residual stream (plus the previous
  output, which SGLang's stage boundary adds in the norm call), the gate input of
  :mod:`kvsqueeze.methods.dms`. The logits of the forward's tokens are kept for that layer's attention.
- **Attention backend ``dms``** (the PyTorch reference path, a ``torch_native`` subclass): before a
  layer attends, the logit of the token at position ``p`` flags position ``p - 1`` of the same
  request (shift by one; the first ``sinks`` positions never), stored per (token slot, KV head); key
  ``j`` is then visible to query ``i`` iff ``j <= i`` and (``i - j <= window`` or ``j`` is unflagged):
  exactly the reference cache's rule (``kvsqueeze.methods.dms_cache``).

What this stage does not do yet (issue 4): evicted tokens still occupy SGLang's token slots (its pool
keeps one slot for all layers and heads), so no memory is freed and admission is unchanged; the
per-head pool (``kvsqueeze.methods.dms_pages``) and the paged-decode kernel are the next stage. Prefix
reuse is off (a radix hit would hand over another request's evicted heads).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from kvsqueeze.errors import bad_value

logger = logging.getLogger(__name__)

ENV = "KVSQUEEZE_DMS"
_LOGITS: dict[int, torch.Tensor] = {}  # layer -> [tokens, kv heads] gate logits of the current forward
_installed = False


def checkpoint_dir() -> Path | None:
    raw = os.environ.get(ENV)
    if not raw:
        return None
    d = Path(raw)
    if not d.is_dir():
        raise bad_value(ENV, raw, "a DMS checkpoint directory")
    return d


def check_server_args(args: list[str]) -> None:
    if "--disable-radix-cache" not in args:
        raise bad_value("disable-radix-cache", None, "given with DMS (a radix hit would reuse another "
                        "request's evicted heads)")
    i = args.index("--attention-backend") if "--attention-backend" in args else -1
    if i < 0 or i + 1 >= len(args) or args[i + 1] != "dms":
        raise bad_value("attention-backend", args[i + 1] if 0 <= i < len(args) - 1 else None, "dms")


def _install_gates(model, directory: Path) -> None:
    from kvsqueeze.methods.dms import load_config, load_gates

    cfg = load_config(directory)
    if cfg.gate != "projection":
        raise bad_value("gate", cfg.gate, "projection gates (query-neuron gates are not wired into "
                        "SGLang yet)")
    gates = load_gates(directory, model).to(next(model.parameters()).device)
    model._kvsqueeze_dms = (cfg, gates)
    per_layer = cfg.granularity == "layer"
    for i, layer in enumerate(model.model.layers):
        def pre_hook(module, args, i=i):
            x = args[0]
            if len(args) > 1 and args[1] is not None:
                x = x + args[1]  # the boundary adds the previous output into the residual here
            lg = gates.layers[i](x.to(gates.layers[i].dms_proj_alpha.weight.dtype))
            lg = lg * cfg.logit_scale + cfg.logit_bias
            _LOGITS[i] = (lg[..., :1].expand_as(lg) if per_layer else lg).detach()
        layer.input_layernorm.register_forward_pre_hook(pre_hook)
    logger.info("kvsqueeze DMS: gates from %s (window %d, sinks %d)", directory, cfg.window, cfg.sinks)


def _backend_class():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    from kvsqueeze.methods.dms import load_config

    class DMSAttnBackend(TorchNativeAttnBackend):
        def __init__(self, model_runner):
            super().__init__(model_runner)
            cfg = load_config(checkpoint_dir())
            self.window, self.sinks = cfg.window, cfg.sinks
            self.flags: dict[int, torch.Tensor] = {}

        def _flags(self, layer_id: int, rows: int, n_kv: int) -> torch.Tensor:
            f = self.flags.get(layer_id)
            if f is None:
                f = self.flags[layer_id] = torch.zeros(rows, n_kv, dtype=torch.bool, device=self.device)
            return f

        def _write_flags(self, layer, fb, extend: bool) -> torch.Tensor:
            k_buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
            flags = self._flags(layer.layer_id, k_buf.shape[0], layer.tp_k_head_num)
            flags[fb.out_cache_loc] = False  # new tokens: undecided (kept)
            lg = _LOGITS.pop(layer.layer_id, None)
            if fb.out_cache_loc.shape[0] == 0:  # an empty batch: the norm (and the gate) did not run
                return flags
            if lg is None:
                raise RuntimeError(f"{ENV} is set but no DMS gate ran for layer {layer.layer_id}: the "
                                   "gates are wired into LlamaForCausalLM only")
            if lg.shape[0] != fb.out_cache_loc.shape[0]:
                raise RuntimeError(f"DMS gate logits for {lg.shape[0]} tokens, but the batch writes "
                                   f"{fb.out_cache_loc.shape[0]}")
            bs = fb.req_pool_indices.shape[0]
            if extend:
                req = torch.repeat_interleave(torch.arange(bs, device=lg.device), fb.extend_seq_lens)
            else:
                req = torch.arange(bs, device=lg.device)
            target = fb.positions.long() - 1  # the logit at p decides p - 1
            ok = target >= self.sinks
            rows = fb.req_pool_indices[req[ok]]
            slots = self.req_to_token_pool.req_to_token[rows, target[ok]].long()
            flags[slots] = lg[ok] > 0
            return flags

        def _attend(self, q, o, layer, fb, flags, q_starts, q_lens, kv_lens):
            k_buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
            v_buf = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
            group = layer.tp_q_head_num // layer.tp_k_head_num
            rtt = self.req_to_token_pool.req_to_token
            for b in range(len(q_lens)):
                s, n, kv = int(q_starts[b]), int(q_lens[b]), int(kv_lens[b])
                slots = rtt[fb.req_pool_indices[b], :kv].long()
                keys = k_buf[slots].transpose(0, 1)  # [kv heads, kv, d]
                vals = v_buf[slots].transpose(0, 1)
                fl = flags[slots].transpose(0, 1)  # [kv heads, kv]
                qpos = torch.arange(kv - n, kv, device=q.device)[:, None]
                kpos = torch.arange(kv, device=q.device)[None, :]
                vis = (kpos <= qpos)[None] & (((qpos - kpos) <= self.window)[None] | ~fl[:, None, :])
                vis = vis.repeat_interleave(group, 0)  # [q heads, n, kv]
                qq = q[s:s + n].transpose(0, 1)  # [q heads, n, d]
                out = torch.nn.functional.scaled_dot_product_attention(
                    qq, keys.repeat_interleave(group, 0).to(qq.dtype),
                    vals.repeat_interleave(group, 0).to(qq.dtype), attn_mask=vis, scale=layer.scaling)
                o[s:s + n] = out.transpose(0, 1)

        def _forward(self, q, k, v, layer, fb, save_kv_cache, extend: bool):
            if save_kv_cache and k is not None and v is not None:
                self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(fb.out_cache_loc, None), k, v)
            flags = self._write_flags(layer, fb, extend)
            q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
            o = q_.new_empty((q_.shape[0], layer.tp_q_head_num, layer.v_head_dim))
            if extend:
                q_lens = fb.extend_seq_lens.tolist()
            else:
                q_lens = [1] * fb.req_pool_indices.shape[0]
            starts = [0]
            for n in q_lens[:-1]:
                starts.append(starts[-1] + n)
            self._attend(q_, o, layer, fb, flags, starts, q_lens, fb.seq_lens.tolist())
            return o.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            return self._forward(q, k, v, layer, forward_batch, save_kv_cache, True)

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            return self._forward(q, k, v, layer, forward_batch, save_kv_cache, False)

    return DMSAttnBackend


def install() -> bool:
    """Register the DMS model subclass and the ``dms`` attention backend (once per process)."""
    global _installed
    directory = checkpoint_dir()
    if directory is None or _installed:
        return _installed
    from sglang.srt.arg_groups.choices import add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.models.llama import LlamaForCausalLM
    from sglang.srt.models.registry import ModelRegistry

    add_attention_backend_choices(["dms"])
    register_attention_backend("dms")(lambda runner: _backend_class()(runner))

    class DMSLlamaForCausalLM(LlamaForCausalLM):
        def load_weights(self, weights):
            out = super().load_weights(weights)
            _install_gates(self, directory)
            return out

    ModelRegistry.models["LlamaForCausalLM"] = DMSLlamaForCausalLM
    _installed = True
    return True
