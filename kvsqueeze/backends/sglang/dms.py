"""DMS inside SGLang: the gates run in SGLang's model, evicted tokens leave a per-head paged pool, and
the scheduler admits requests into the room that eviction leaves.

Turned on by ``KVSQUEEZE_DMS=<checkpoint dir>`` (a ``kvsqueeze dms train`` output or the shipped gates)
with ``--attention-backend dms --disable-radix-cache --chunked-prefill-size -1`` (the serving spec,
:mod:`kvsqueeze.backends.sglang.serving`, adds them for ``kvsqueeze serve --method dms:4``);
installed by the kvsqueeze plugin, every SGLang symbol through :mod:`kvsqueeze.backends.sglang.patch`:

- **Model.** ``LlamaForCausalLM`` is registered in SGLang's ``ModelRegistry`` as a subclass that, after
  SGLang loads the weights, loads the DMS gates (:func:`kvsqueeze.methods.dms.checkpoint.load_gates`) and hooks
  each layer's ``input_layernorm``: its input is the layer's residual stream (plus the previous
  output, which SGLang's stage boundary adds in the norm call), the gate input of
  :mod:`kvsqueeze.methods.dms.gates`. The logits of the forward's tokens are kept for that layer's
  attention. Every decision follows :mod:`kvsqueeze.methods.dms.rule`.
- **Storage.** The K/V live in a :class:`~kvsqueeze.methods.dms.pages.HeadPagePool`: every (request,
  layer, KV head) owns its own pages of ``KVSQUEEZE_DMS_PAGE_SIZE`` (default 16) token slots, taken
  from one shared free list, for the memory SGLang's pool would have had: ``--max-total-tokens B``
  buys ``B x layers x KV heads`` slots. SGLang's own token pool keeps only its indices (its K/V
  buffers are cut to one row); its allocator hands out indices from a range 16x larger, and what it
  reports as available is the head pool's free room in dense-token equivalents (``B x free pages /
  pages``), so admission, SGLang's decode-memory check and its idle leak check all see the head pool.
- **Attention backend ``dms``** (a ``torch_native`` subclass). Prefill: the logit of the token at
  position ``p`` flags ``p - 1`` (the first ``sinks`` never); the prompt attends to itself under the
  DMS rule (key ``j`` visible to query ``i`` iff ``j <= i`` and (``i - j <= window`` or ``j``
  unflagged)), then only its unflagged tokens and the last ``window + 1`` take slots, head by head.
  Decode: before the forward, each request's next token takes, per layer and head, the slot of the
  token leaving the window if that one is flagged, else a new slot; the token attends to exactly its
  head's held slots (``kvsqueeze.kernels.paged_decode``: the batched PyTorch path on CPU, the Triton
  kernel on a GPU). Flags of the positions still in the window are kept per request row
  (:class:`~kvsqueeze.methods.dms.pages.WindowFlags`).
- **Admission.** The allocator's prefill budget charges a new request its prompt in full for the
  pass (the gates decide during the prefill), its later footprint as the measured kept fraction of
  the tokens that left the window (``HeadPagePool.kept_fraction``; 1 before any did), plus a page per
  head for rounding; running requests' expected growth is scaled the same way. The decode-memory
  check counts exactly the new pages the next step needs, so a shortfall retracts a request (SGLang's
  path) instead of failing. Finished, aborted and retracted requests give their pages back when
  SGLang frees their request row.
- **Prefix reuse** is off: a radix hit would hand a request another request's evicted heads.
  **Chunked prefill** is off: a chunk boundary would split the prompt's eviction decisions.
- **Metrics.** ``meta_info["kvsqueeze_dms"]`` of each finished request (held, peak, ratio, KV token
  reads; the harness reads ``kv_token_reads`` and ``kv_tokens_held_peak``); gauges on ``/metrics``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from kvsqueeze.backends.sglang.metrics import gauges
from kvsqueeze.backends.sglang.patch import patch, patch_item, set_value
from kvsqueeze.errors import bad_value
from kvsqueeze.kernels.paged_decode import SUPPORTED_PAGE_SIZES, paged_decode
from kvsqueeze.methods.dms import rule
from kvsqueeze.methods.dms.checkpoint import load_config, load_gates
from kvsqueeze.methods.dms.pages import HeadPagePool, PagesExhausted, WindowFlags

logger = logging.getLogger(__name__)

ENV = "KVSQUEEZE_DMS"
PAGE_ENV = "KVSQUEEZE_DMS_PAGE_SIZE"
VIRTUAL_FACTOR = 16  # SGLang's token indices: this many times the dense budget
META_KEY = "kvsqueeze_dms"
METRICS = {
    "held_tokens": ("kvsqueeze_dms_held_tokens", "KV held by running requests, in dense-token "
                    "equivalents (per-head slots / (layers x KV heads))"),
    "peak_held_tokens": ("kvsqueeze_dms_peak_held_tokens", "Peak of kvsqueeze_dms_held_tokens"),
    "dense_tokens": ("kvsqueeze_dms_dense_tokens", "Tokens of running requests (what a dense cache holds)"),
    "ratio": ("kvsqueeze_dms_ratio", "dense_tokens / held_tokens of running requests"),
    "reads_per_step": ("kvsqueeze_dms_reads_per_step", "KV token reads of the last decode step, summed "
                       "over layers and KV heads"),
    "kept_fraction": ("kvsqueeze_dms_kept_fraction", "Share of tokens kept after leaving the window"),
    "free_pages": ("kvsqueeze_dms_free_pages", "Free pages of the per-head pool"),
    "peak_sequences": ("kvsqueeze_dms_peak_sequences", "Most requests holding pages at once since start"),
}
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


def page_size(raw: str | None = None, what: str = PAGE_ENV) -> int:
    """The per-head pool's page size (``KVSQUEEZE_DMS_PAGE_SIZE``, default 16), checked."""
    raw = os.environ.get(PAGE_ENV, "16") if raw is None else raw
    if not raw.isdigit() or int(raw) not in SUPPORTED_PAGE_SIZES:
        raise bad_value(what, raw, f"one of {', '.join(map(str, SUPPORTED_PAGE_SIZES))} (the page "
                        "sizes of the paged-decode kernel)")
    return int(raw)


def _install_gates(model, directory: Path) -> None:
    cfg = load_config(directory)
    if cfg.gate != "projection":
        raise bad_value("gate", cfg.gate, "projection gates (query-neuron gates are not wired into "
                        "SGLang yet)")
    gates = load_gates(directory, model).to(next(model.parameters()).device)
    model._kvsqueeze_dms = (cfg, gates)
    dtype = gates.layers[0].dms_proj_alpha.weight.dtype
    for i, layer in enumerate(model.model.layers):
        def pre_hook(module, args, i=i):
            x = args[0]
            if len(args) > 1 and args[1] is not None:
                x = x + args[1]  # the boundary adds the previous output into the residual here
            _LOGITS[i] = gates.logits(i, x.to(dtype)).expand(*x.shape[:-1], gates.layers[i].dms_proj_alpha
                                                             .out_features).detach()
        layer.input_layernorm.register_forward_pre_hook(pre_hook)
    logger.info("kvsqueeze DMS: gates from %s (window %d, sinks %d)", directory, cfg.window, cfg.sinks)


# ---- the per-process state: the head pool, its storage, the flag rings -------------------------


class _State:
    def __init__(self, budget_tokens: int, n_layers: int, kv_heads: int, head_dim: int, v_head_dim: int,
                 dtype, device, rows: int, window: int, sinks: int, ps: int):
        self.budget = budget_tokens
        self.n_layers, self.kv_heads, self.window, self.ps = n_layers, kv_heads, window, ps
        self.num_pages = math.ceil(budget_tokens * n_layers * kv_heads / ps)
        self.pool = HeadPagePool(self.num_pages, ps, n_layers, kv_heads, window)
        self.k = torch.zeros(self.num_pages, ps, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(self.num_pages, ps, v_head_dim, dtype=dtype, device=device)
        self.flags = WindowFlags(rows, n_layers, kv_heads, window, sinks)
        self.per_request: dict[str, dict] = {}
        self.peak_held = 0
        self.peak_sequences = 0  # most requests holding pages at once
        self.last_reads = 0
        self.kept_seen = None  # the kept fraction at the last admission pass that found no room
        self.decode = None  # (slots [L, bs, H], page tables [L, bs, H, P], lengths [L, bs, H])

    def reset(self) -> None:
        self.pool = HeadPagePool(self.num_pages, self.ps, self.n_layers, self.kv_heads, self.window)
        self.flags.reset()
        self.per_request.clear()
        self.decode = None

    def kept(self) -> float:
        f = self.pool.kept_fraction()
        return 1.0 if f is None else f

    def available_tokens(self) -> int:
        return self.budget * self.pool.free_pages // self.num_pages

    def leaving_flags(self, row: int) -> torch.Tensor | None:
        return self.flags.leaving(row, self.pool.seen(row))

    def pages_for_next_decode(self, rows) -> int:
        need = 0
        for row in rows:
            if row in self.pool.seqs:
                need += self.pool.pages_for_append(row, self.leaving_flags(row))
            else:  # not placed yet: a page per (layer, head) at most
                need += self.n_layers * self.kv_heads
        return need

    def release(self, row: int, rid: str | None = None) -> None:
        if row not in self.pool.seqs:
            return
        if rid is not None:
            st = self.pool.stats(row)
            rec = self.per_request.setdefault(rid, {"peak": 0, "reads": 0, "steps": 0, "dense_reads": 0})
            rec["peak"] = max(rec["peak"], st["peak"])
            rec["reads"] += st["reads"]
            rec["steps"] += st["steps"]
            # a dense cache reads every token so far at each step: sum of (t + 1) over the steps
            rec["dense_reads"] += (st["seen"] * (st["seen"] + 1) - st["prompt"] * (st["prompt"] + 1)) // 2 \
                * st["slots_per_token"]
            rec.update(held=st["held"], seen=st["seen"], slots_per_token=st["slots_per_token"])
        self.pool.release(row)

    def request_meta(self, rid: str) -> dict:
        """A finished request's figures: held and peak in dense-token equivalents, its ratio, KV token
        reads per decode step (DMS's and a dense cache's), and the totals the harness reads
        (``kv_token_reads``: summed over decode steps, layers and KV heads; ``kv_tokens_held_peak``:
        peak (layer, KV head) slots held)."""
        rec = self.per_request.pop(rid, None)
        if rec is None:
            return {}
        lh = rec["slots_per_token"]
        return {"held_tokens": round(rec["held"] / lh, 2), "peak_held_tokens": round(rec["peak"] / lh, 2),
                "dense_tokens": rec["seen"], "ratio": round(rec["seen"] * lh / max(rec["held"], 1), 3),
                "reads_per_step": round(rec["reads"] / rec["steps"], 1) if rec["steps"] else 0.0,
                "dense_reads_per_step": round(rec["dense_reads"] / rec["steps"], 1) if rec["steps"] else 0.0,
                "kv_token_reads": rec["reads"], "kv_tokens_held_peak": rec["peak"]}

    def stats(self) -> dict:
        held = sum(self.pool.tokens_held(q) for q in self.pool.seqs)
        dense = sum(self.pool.seen(q) for q in self.pool.seqs)
        lh = self.n_layers * self.kv_heads
        self.peak_held = max(self.peak_held, held)
        return {"held_tokens": held / lh, "peak_held_tokens": self.peak_held / lh, "dense_tokens": dense,
                "ratio": dense * lh / held if held else 0.0, "reads_per_step": self.last_reads,
                "kept_fraction": self.kept(), "free_pages": self.pool.free_pages,
                "peak_sequences": self.peak_sequences}


def _state_of(obj) -> _State | None:
    return getattr(obj, "_kvsqueeze_dms", None)


def _prefill_budget_class():
    from sglang.srt.mem_cache.prefill_budget import PrefillBudget

    class DMSPrefillBudget(PrefillBudget):
        """Charges a new request its prompt in full for this pass (``current``), and for the long run
        (``total``) what it is expected to hold: its prompt and new tokens at the kept fraction, plus
        the window and a page per head for rounding."""

        def __init__(self, allocator, tree_cache, *, num_mixed_decode_tokens=0):
            super().__init__(allocator, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)
            self.st = _state_of(allocator)
            self.kept = self.st.kept()

        def _long_run(self, extend: int, max_new: int) -> int:
            w = self.st.window + 1
            prompt = extend if extend <= w else w + math.ceil(self.kept * (extend - w))
            return prompt + math.ceil(self.kept * max_new) + self.st.ps

        def check_prefill(self, *, extend_input_len, total_tokens, max_new_tokens, **kw):
            other = total_tokens - extend_input_len - max_new_tokens  # SGLang's per-request extras
            ok = (other + self._long_run(extend_input_len, max_new_tokens) < self.remaining_total
                  and extend_input_len + self.st.ps + other <= self.remaining_current)
            return (True, kw.get("chunk_limit")) if ok else (False, None)

        def can_allocate_prefill(self, *, paged_input, **kw):
            return paged_input + self.st.ps <= self.remaining_current

        def reserve(self, extend_input_len, max_new_tokens, *, extra_tokens=0, **kw):
            self.current_offset += extend_input_len + self.st.ps + self.page_size + extra_tokens
            self.total_offset += self._long_run(extend_input_len, max_new_tokens) + self.page_size + extra_tokens

    return DMSPrefillBudget


def _attach(model_runner, cfg) -> _State:
    """Build the head pool for ``model_runner``'s budget and wire SGLang's pools to it (once)."""
    alloc = model_runner.token_to_kv_pool_allocator
    st = _state_of(alloc)
    if st is not None:
        return st
    pool = model_runner.token_to_kv_pool
    rtp = model_runner.req_to_token_pool
    if getattr(pool, "start_layer", 0) not in (0, None):
        raise bad_value("start_layer", pool.start_layer, "0 (DMS in SGLang runs without pipeline parallelism)")
    if alloc.page_size != 1:
        raise bad_value("page-size", alloc.page_size, "1 for SGLang's token indices with DMS (the per-head "
                        f"pool has its own pages, {PAGE_ENV})")
    k0 = pool.get_key_buffer(0)
    v0 = pool.get_value_buffer(0)
    st = _State(pool.size, pool.layer_num, pool.head_num, k0.shape[-1], v0.shape[-1], k0.dtype, k0.device,
                rtp.req_to_token.shape[0], cfg.window, cfg.sinks, page_size())
    key = "dms.pool"
    # SGLang's K/V buffers are not used: keep one row each, so the memory is the head pool's
    set_value(pool, "k_buffer", key, [b[:1].clone() for b in pool.k_buffer])
    set_value(pool, "v_buffer", key, [b[:1].clone() for b in pool.v_buffer])
    set_value(alloc, "size", key, pool.size * VIRTUAL_FACTOR)
    alloc.clear()
    budget_cls = _prefill_budget_class()
    patch(alloc, "available_size", key, lambda available: lambda: min(available(), st.available_tokens()))
    patch(alloc, "check_decode_capacity", key, lambda check: (
        lambda *, num_tokens, tree_cache, requests=None, spec_algorithm=None:
        st.pages_for_next_decode([r.kv.req_pool_idx for r in requests or []]) <= st.pool.free_pages),
        chains=False, why="the head pool's exact count of the pages the next step needs replaces SGLang's "
        "count of free token slots (a step may need no new page while fewer slots than requests are free)")
    patch(alloc, "create_prefill_budget", key, lambda create: (
        lambda tree_cache, *, num_mixed_decode_tokens=0: budget_cls(
            alloc, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)),
        chains=False, why="DMS's budget (a subclass of SGLang's PrefillBudget) charges the measured kept "
        "fraction instead of one slot per token")

    def free_rows(orig):
        def _free_rows(indices):
            for row in indices:
                st.release(int(row))
            orig(indices)
        return _free_rows

    def free(orig):
        def _free(req):
            if req.kv.req_pool_idx is not None:
                st.release(int(req.kv.req_pool_idx), req.rid)
            orig(req)
        return _free

    def clear(orig):
        def _clear():
            orig()
            st.reset()
        return _clear

    patch(rtp, "free_rows", key, free_rows)
    patch(rtp, "free", key, free)
    patch(rtp, "clear", key, clear)
    alloc._kvsqueeze_dms = st
    logger.warning("kvsqueeze DMS: prefix reuse (radix cache) and chunked prefill are off: a radix hit "
                   "would hand a request another request's evicted heads, a prefill chunk would split "
                   "the prompt's eviction decisions")
    logger.info("kvsqueeze DMS: per-head pool of %d pages x %d slots (%d dense tokens x %d layers x %d KV "
                "heads), %.1f MB", st.num_pages, st.ps, st.budget, st.n_layers, st.kv_heads,
                (st.k.numel() * st.k.element_size() + st.v.numel() * st.v.element_size()) / 1e6)
    return st


def _backend_class():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    class DMSAttnBackend(TorchNativeAttnBackend):
        def __init__(self, model_runner):
            super().__init__(model_runner)
            cfg = load_config(checkpoint_dir())
            self.window, self.sinks = cfg.window, cfg.sinks
            self.st = _attach(model_runner, cfg)

        # ---- placing the batch's tokens -------------------------------------------------------
        def init_forward_metadata(self, forward_batch):
            super().init_forward_metadata(forward_batch)
            fb, st = forward_batch, self.st
            st.decode = None
            if fb.req_pool_indices is None or fb.req_pool_indices.numel() == 0:
                return
            rows = [int(r) for r in fb.req_pool_indices.tolist()]
            if fb.forward_mode.is_decode():
                slots = []
                for row, n in zip(rows, fb.seq_lens.tolist()):
                    if row not in st.pool.seqs or st.pool.seen(row) != n - 1:
                        raise RuntimeError(f"DMS: request row {row} decodes token {n - 1} but the head "
                                           "pool has not placed the tokens before it")
                    try:
                        slots.append(st.pool.append(row, st.leaving_flags(row)))
                    except PagesExhausted as exc:  # the decode-memory check is exact; this is a bug
                        raise RuntimeError(f"DMS: {exc} although SGLang's decode check passed") from exc
                st.peak_sequences = max(st.peak_sequences, len(st.pool.seqs))
                pt, ln = st.pool.page_tables(rows)
                st.decode = (torch.stack(slots, 1), pt, ln)
                st.last_reads = int(ln.sum())
            elif fb.forward_mode.is_extend():
                prefix = fb.extend_prefix_lens.tolist() if fb.extend_prefix_lens is not None else [0] * len(rows)
                for row, n, pre in zip(rows, fb.extend_seq_lens.tolist(), prefix):
                    if pre:
                        raise RuntimeError(f"DMS: an extend with a {pre}-token prefix (a radix hit or a "
                                           "prefill chunk); DMS needs --disable-radix-cache and "
                                           "--chunked-prefill-size -1")
                    if row in st.pool.seqs:  # a row SGLang reused without freeing through the pool
                        raise RuntimeError(f"DMS: request row {row} starts a prefill but still holds pages")
                    st.pool.begin(row, int(n))
            else:
                raise RuntimeError(f"DMS: forward mode {fb.forward_mode} is not supported")

        def _logits(self, layer_id: int, n: int) -> torch.Tensor:
            lg = _LOGITS.pop(layer_id, None)
            if lg is None:
                raise RuntimeError(f"{ENV} is set but no DMS gate ran for layer {layer_id}: the gates are "
                                   "wired into LlamaForCausalLM only")
            if lg.shape[0] != n:
                raise RuntimeError(f"DMS gate logits for {lg.shape[0]} tokens, but the batch has {n}")
            return lg

        # ---- prefill ------------------------------------------------------------------------------
        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            fb, st, lid = forward_batch, self.st, layer.layer_id
            hq, hk, d, vd = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim
            q_ = q.reshape(-1, hq, d)
            k_ = k.reshape(-1, hk, d)
            v_ = v.reshape(-1, hk, vd)
            o = q_.new_empty((q_.shape[0], hq, vd))
            if q_.shape[0] == 0:
                return o.reshape(-1, hq * vd)
            lg = self._logits(lid, q_.shape[0])
            group = hq // hk
            s = 0
            for row, n in zip(fb.req_pool_indices.tolist(), fb.extend_seq_lens.tolist()):
                flags = prefill_flags(lg[s:s + n], self.sinks)
                vis = rule.visible(flags.to(q.device), 0, n, self.window)  # [hk, n, n]
                qq = q_[s:s + n].transpose(0, 1)
                out = torch.nn.functional.scaled_dot_product_attention(
                    qq, k_[s:s + n].transpose(0, 1).repeat_interleave(group, 0).to(qq.dtype),
                    v_[s:s + n].transpose(0, 1).repeat_interleave(group, 0).to(qq.dtype),
                    attn_mask=vis.repeat_interleave(group, 0), scale=layer.scaling)
                o[s:s + n] = out.transpose(0, 1)
                if save_kv_cache:
                    slots = st.pool.admit_layer(int(row), lid, flags)
                    keep = st.pool.prefill_keep(flags)
                    kf, vf = st.k.view(-1, d), st.v.view(-1, vd)
                    for h in range(hk):
                        kp = keep[h].nonzero()[:, 0].to(q.device) + s
                        kf[slots[h].to(kf.device)] = k_[kp, h].to(kf.dtype)
                        vf[slots[h].to(vf.device)] = v_[kp, h].to(vf.dtype)
                    st.flags.prefill(int(row), lid, flags)
                s += n
            return o.reshape(-1, hq * vd)

        # ---- decode -------------------------------------------------------------------------------
        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            fb, st, lid = forward_batch, self.st, layer.layer_id
            hq, hk, d, vd = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim
            bs = fb.req_pool_indices.shape[0]
            if bs == 0:
                return q.new_empty((0, hq * vd))
            if st.decode is None:
                raise RuntimeError("DMS: a decode forward without its placement (init_forward_metadata)")
            slots, pt, ln = st.decode
            st.flags.decode(fb.req_pool_indices, lid, fb.positions, self._logits(lid, bs))
            if save_kv_cache:
                idx = slots[lid].reshape(-1).to(st.k.device)
                st.k.view(-1, d)[idx] = k.reshape(-1, d).to(st.k.dtype)
                st.v.view(-1, vd)[idx] = v.reshape(-1, vd).to(st.v.dtype)
            out = paged_decode(q.reshape(bs, hq, d), st.k, st.v, pt[lid].to(q.device), ln[lid].to(q.device),
                               layer.scaling)
            return out.reshape(-1, hq * vd).to(q.dtype)

    return DMSAttnBackend


def prefill_flags(logits: torch.Tensor, sinks: int) -> torch.Tensor:
    """Eviction flags ``[kv_heads, n]`` of one request's prefill from its tokens' gate logits
    ``[n, kv_heads]`` (the rule: shift by one, sinks, the newest undecided)."""
    n = logits.shape[0]
    return rule.decide(logits.T.cpu(), n, sinks)


def _model_class(llama_cls, directory: Path):
    class DMSLlamaForCausalLM(llama_cls):
        def load_weights(self, weights):
            out = super().load_weights(weights)
            _install_gates(self, directory)
            return out

    return DMSLlamaForCausalLM


def install() -> bool:
    """Register the DMS model subclass and the ``dms`` attention backend, and wrap SGLang's admission
    and output streamer (once per process)."""
    global _installed
    directory = checkpoint_dir()
    if directory is None or _installed:
        return _installed
    page_size()  # a bad KVSQUEEZE_DMS_PAGE_SIZE fails here, before the server starts
    from sglang.srt.arg_groups.choices import add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.managers.schedule_policy import PrefillAdder
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer
    from sglang.srt.models.registry import ModelRegistry

    add_attention_backend_choices(["dms"])
    register_attention_backend("dms")(lambda runner: _backend_class()(runner))
    patch_item(ModelRegistry.models, "LlamaForCausalLM", "dms", lambda cls: _model_class(cls, directory),
               owner="sglang ModelRegistry.models")

    def running_offset(orig):
        def _running_offset(self, req):
            # a running request grows by the kept fraction of the tokens leaving its window
            st = _state_of(self.token_to_kv_pool_allocator)
            out = orig(self, req)
            return out if st is None else out * st.kept()
        return _running_offset

    def new_batch_prefill(orig):
        def _get_new_batch_prefill(self, running_batch):
            # SGLang stops admitting after a pass that found no room until a request leaves; a new
            # measurement of the kept fraction changes what fits, so the next step tries again
            st = _state_of(self.token_to_kv_pool_allocator)
            if st is not None and running_batch is not None and running_batch.batch_is_full:
                kept = round(st.kept(), 3)
                if kept != st.kept_seen:
                    st.kept_seen = kept
                    running_batch.batch_is_full = False
            return orig(self, running_batch)
        return _get_new_batch_prefill

    def customized_info(orig):
        def build_additional_customized_info(self, reqs):
            out = orig(self, reqs)
            st = _state_of(self.tree_cache.token_to_kv_pool_allocator)
            if st is None:
                return out
            stats = st.stats()
            for key, g in gauges(METRICS).items():
                g.set(stats[key])
            return {**out, META_KEY: [[st.request_meta(r.rid)] if r.finished() else [] for r in reqs]}
        return build_additional_customized_info

    patch(PrefillAdder, "_get_running_request_total_token_offset", "dms", running_offset)
    patch(Scheduler, "get_new_batch_prefill", "dms", new_batch_prefill)
    set_value(SchedulerOutputStreamer, "has_additional_customized_info", "dms", True)
    patch(SchedulerOutputStreamer, "build_additional_customized_info", "dms", customized_info)
    _installed = True
    return True
