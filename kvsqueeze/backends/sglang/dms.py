"""DMS inside SGLang: the gates run in SGLang's model, evicted tokens leave a per-head slot pool, the
radix cache shares prefixes per (layer, KV head), and the scheduler admits requests into the room that
eviction leaves.

Turned on by ``KVSQUEEZE_DMS=<checkpoint dir>`` (a ``kvsqueeze dms train`` output or the shipped gates)
with ``--attention-backend dms --radix-cache-backend kvsqueeze-dms`` (the serving spec,
:mod:`kvsqueeze.backends.sglang.serving`, adds them for ``kvsqueeze serve --method dms:4``); the radix
cache and chunked prefill stay on. Installed by the kvsqueeze plugin, every SGLang symbol through
:mod:`kvsqueeze.backends.sglang.patch` or one of SGLang's registries:

- **Model.** ``LlamaForCausalLM`` is registered in SGLang's ``ModelRegistry`` as a subclass that, after
  SGLang loads the weights, loads the DMS gates (:func:`kvsqueeze.methods.dms.checkpoint.load_gates`) and hooks
  each layer's ``input_layernorm``: its input is the layer's residual stream (plus the previous
  output, which SGLang's stage boundary adds in the norm call), the gate input of
  :mod:`kvsqueeze.methods.dms.gates`. The logits of the forward's tokens are kept for that layer's
  attention. Every decision follows :mod:`kvsqueeze.methods.dms.rule`.
- **Storage.** The K/V live in a :class:`~kvsqueeze.methods.dms.pages.HeadSlotPool`: one slot per
  stored (token, layer, KV head), taken from one free list, for the memory SGLang's pool would have
  had (``--max-total-tokens B`` buys ``B x layers x KV heads`` slots). A slot belongs to the SGLang
  token index that produced it and is referenced by every running request whose head holds it and by
  the radix cache once the cache holds the token; it is freed with its last reference. SGLang's own
  token pool keeps only its indices (its K/V buffers are cut to one row); its allocator hands out
  indices from a range 16x larger, reports as available the free slots in dense-token equivalents,
  and tells the pool which indices it frees (a radix node evicted, a duplicate, an uncached tail).
- **Radix cache** (``kvsqueeze-dms``, SGLang's unified radix tree, registered as a radix-cache
  backend): the tokens it takes in keep their slots (where it already holds a prefix under its own
  indices, the slots this continuation holds there move to them first: ``HeadSlotPool.adopt``); a
  hit is cut back to the longest prefix whose held tokens are all still stored
  (``HeadSlotPool.resumable``), and the request resumes from it without copying: its view references
  the prefix's slots, the window's flags come from the decisions stored per token. Its evictable
  size is what evicting it would free.
- **Attention backend ``dms``** (a ``torch_native`` subclass). An extend (a prefill, a prefill chunk,
  the rest of a prompt after a radix hit) attends to the held prefix and to itself under the DMS rule
  (key ``j`` visible to query ``i`` iff ``j <= i`` and (``i - j <= window`` or ``j`` unflagged)); then
  the view holds exactly what is held at the extend's end, and only the new tokens that are unflagged
  or in the window take slots. Decode: before the forward, each request's next token takes a fresh
  slot per layer and head, and the flagged token leaving the window leaves the view; the token
  attends to exactly its head's held slots (``kvsqueeze.kernels.paged_decode`` with pages of one slot:
  the batched PyTorch path on CPU, the Triton kernel on a GPU). Each layer's forward only touches
  device tensors (``kvsqueeze.methods.dms.pages.decode_layer``: the gate logits go to a buffer); the
  pool takes in the step's decisions after ``ModelRunner.forward``, with one read of that buffer.
  For SGLang's decode graph runners (CUDA graphs; CPU graphs with ``--enable-torch-compile``) what a
  step reads lives in buffers allocated once for the largest captured batch (:class:`_DecodeGraph`);
  before each replay the batch is placed into them, padding rows (request row 0) holding nothing and
  writing their K/V to a scratch slot.
- **Admission.** The allocator's prefill budget charges a new request the tokens its extend computes
  in full for the pass (the gates decide during it), its later footprint as the measured kept
  fraction of the tokens that left the window (``HeadSlotPool.kept_fraction``; 1 before any did);
  running requests' expected growth is scaled the same way. The radix cache is evicted only for
  slots that are needed now: an extend evicts what each layer's kept tokens lack when it places them
  (not the whole extend's dense length before its forward, which would drop cached prompts whose
  requests are about to arrive, such as the prompt SGLang caches before the samples of an ``n>1``
  request); the decode-memory check counts exactly the slots the next step needs (evicting the radix
  cache first), so a shortfall retracts a request (SGLang's path) instead of failing. Finished,
  aborted and retracted requests let their slots go when SGLang frees their request row.
- **Metrics.** ``meta_info["kvsqueeze_dms"]`` of each finished request (held, peak, ratio, KV token
  reads, the slots taken from the radix cache; the harness reads ``kv_token_reads``,
  ``kv_tokens_held_peak`` and ``kv_tokens_prefix_shared``); gauges on ``/metrics``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

import torch

from kvsqueeze.backends.sglang.metrics import gauges
from kvsqueeze.backends.sglang.patch import patch, patch_item, set_value
from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.methods.dms.checkpoint import load_config, load_gates
from kvsqueeze.methods.dms.gates import query_neuron_index, read_query_neuron, zero_neurons
from kvsqueeze.methods.dms.pages import HeadSlotPool, SlotsExhausted, decode_layer

logger = logging.getLogger(__name__)

ENV = "KVSQUEEZE_DMS"
VIRTUAL_FACTOR = 16  # SGLang's token indices: this many times the dense budget
META_KEY = "kvsqueeze_dms"
RADIX_BACKEND = "kvsqueeze-dms"  # --radix-cache-backend: SGLang's tree with the head pool's rules
METRICS = {
    "held_tokens": ("kvsqueeze_dms_held_tokens", "KV held (running requests and the prefix cache), in "
                    "dense-token equivalents (per-head slots / (layers x KV heads))"),
    "peak_held_tokens": ("kvsqueeze_dms_peak_held_tokens", "Peak of kvsqueeze_dms_held_tokens"),
    "dense_tokens": ("kvsqueeze_dms_dense_tokens", "Tokens of running requests (what a dense cache holds)"),
    "ratio": ("kvsqueeze_dms_ratio", "dense_tokens / held_tokens of running requests"),
    "reads_per_step": ("kvsqueeze_dms_reads_per_step", "KV token reads of the last decode step, summed "
                       "over layers and KV heads"),
    "kept_fraction": ("kvsqueeze_dms_kept_fraction", "Share of tokens kept after leaving the window"),
    "free_slots": ("kvsqueeze_dms_free_slots", "Free (layer, KV head) slots of the per-head pool"),
    "cached_tokens": ("kvsqueeze_dms_cached_tokens", "Slots only the prefix cache holds, in dense-token "
                      "equivalents (freed when its entries are evicted)"),
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


class _QueryNeuronRope(torch.nn.Module):
    """One layer's RoPE with query-neuron gates: the repurposed neuron of the query (after q-norm,
    before RoPE) is read as the gate and zeroed, and zeroed again after RoPE, which rotates part of its
    pair back into it (:func:`kvsqueeze.methods.dms.gates.read_query_neuron`, then ``zero_neurons``:
    the released code's rule)."""

    def __init__(self, rope, layer: int, idx: torch.Tensor, cfg, kv_heads: int):
        super().__init__()
        self.rope, self.layer, self.cfg, self.kv_heads = rope, layer, cfg, kv_heads
        self.register_buffer("idx", idx, persistent=False)

    def forward(self, positions, q, k, *args, **kwargs):
        shape = q.shape
        lg, flat = read_query_neuron(q.reshape(shape[0], -1), self.idx, self.cfg)
        _LOGITS[self.layer] = lg.expand(shape[0], self.kv_heads).detach()
        q, k = self.rope(positions, flat.reshape(shape), k, *args, **kwargs)
        return zero_neurons(q.reshape(q.shape[0], -1), self.idx).reshape(q.shape), k


def _install_gates(model, directory: Path) -> None:
    cfg = load_config(directory)
    gates = load_gates(directory, model).to(next(model.parameters()).device)
    model._kvsqueeze_dms = (cfg, gates)
    n_kv = model.config.num_key_value_heads
    if cfg.gate == "projection":
        dtype = gates.layers[0].dms_proj_alpha.weight.dtype
        for i, layer in enumerate(model.model.layers):
            def pre_hook(module, args, i=i):
                x = args[0]
                if len(args) > 1 and args[1] is not None:
                    x = x + args[1]  # the boundary adds the previous output into the residual here
                _LOGITS[i] = gates.logits(i, x.to(dtype)).expand(*x.shape[:-1], n_kv).detach()
            layer.input_layernorm.register_forward_pre_hook(pre_hook)
    else:
        idx = query_neuron_index(model)
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            if getattr(attn, "use_fused_qk_norm_rope", False):  # a fused kernel would skip the wrapper
                set_value(attn, "use_fused_qk_norm_rope", "dms.query_neuron", False)
            set_value(attn, "rotary_emb", "dms.query_neuron",
                      _QueryNeuronRope(attn.rotary_emb, i, idx.to(next(model.parameters()).device), cfg, n_kv))
    logger.info("kvsqueeze DMS: %s gates from %s (window %d, sinks %d%s)", cfg.gate, directory, cfg.window,
                cfg.sinks, "" if cfg.evict else ", eviction off")


# ---- the per-process state: the head slot pool and its storage -----------------------------------


class _State:
    def __init__(self, budget_tokens: int, n_layers: int, kv_heads: int, head_dim: int, v_head_dim: int,
                 dtype, device, rows: int, window: int, sinks: int, num_tokens: int, req_to_token=None):
        self.budget = budget_tokens
        self.n_layers, self.kv_heads, self.window = n_layers, kv_heads, window
        self.lh = n_layers * kv_heads
        self.num_slots = budget_tokens * self.lh
        self.args = (rows, window, sinks, num_tokens)
        self.pool = HeadSlotPool(self.num_slots, n_layers, kv_heads, window, sinks, num_tokens, rows)
        # one row more than the pool's slots: the scratch slot that a captured decode step's padded
        # batch rows write their K/V to (the pool never hands it out)
        self.scratch = self.num_slots
        self.k = torch.zeros(self.num_slots + 1, 1, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(self.num_slots + 1, 1, v_head_dim, dtype=dtype, device=device)
        self.graph: _DecodeGraph | None = None  # static decode buffers once a graph runner asks for them
        self.req_to_token = req_to_token
        self.per_request: dict[str, dict] = {}
        self.peak_held = 0
        self.peak_sequences = 0  # most requests holding slots at once
        self.last_reads = 0
        self.kept_seen = None  # the kept fraction at the last admission pass that found no room
        self.decode = None  # on the device: slots [L, bs * H], slot tables [L, bs, H, W], lengths [L, bs, H]
        self.step_logits = None  # [L, bs, H] gate logits of the decode step, written by the forward
        self.pending = None  # (rows, positions, tokens) of the decode step whose decisions are not taken in
        self.extend = None  # per request of the extend in progress: its tokens' engine indices
        self.room = None  # (tree cache, slots) -> whether evicting the prefix cache freed that many more
        self.reclaim = None  # slots -> the same, with the tree cache of the batch being allocated

    def place_decode(self, rows: list[int], seq_lens: list[int], tokens: torch.Tensor, padded: int) -> None:
        """Before a decode forward: each request's next token takes a slot per (layer, KV head) and the
        slot tables go to the device, with ``padded`` more batch rows that hold nothing (a graph's
        padding), written into the static buffers when a graph runner set them up."""
        slots = []
        for row, n, tok in zip(rows, seq_lens, tokens.tolist()):
            r = self.pool.rows.get(row)
            if r is None or r.seen != n - 1:
                raise RuntimeError(f"DMS: request row {row} decodes token {n - 1} but the head "
                                   "pool has not placed the tokens before it")
            try:
                slots.append(self.pool.append(row, tok))
            except SlotsExhausted as exc:  # the decode-memory check is exact; this is a bug
                raise RuntimeError(f"DMS: {exc} although SGLang's decode check passed") from exc
        self.peak_sequences = max(self.peak_sequences, len(self.pool.rows))
        pt, ln = self.pool.tables(rows)
        self.last_reads = int(ln.sum())
        slots = torch.stack(slots, 1).reshape(self.n_layers, -1) if slots else \
            torch.zeros(self.n_layers, 0, dtype=torch.long)
        bs = len(rows) + padded
        if self.graph is not None and bs <= self.graph.max_bs:
            self.decode, self.step_logits = self.graph.stage(slots, pt, ln, bs)
        else:
            if padded:  # rows that hold nothing (a runner's dummy batch): their K/V go to the scratch slot
                L, H = self.n_layers, self.kv_heads
                slots = torch.cat([slots, torch.full((L, padded * H), self.scratch, dtype=torch.long)], 1)
                pt = torch.cat([pt, torch.zeros(L, padded, H, pt.shape[-1], dtype=pt.dtype)], 1)
                ln = torch.cat([ln, torch.zeros(L, padded, H, dtype=ln.dtype)], 1)
            dev = self.k.device  # one copy to the device per step; the layers read only the device
            self.decode = (slots.to(dev), pt.to(dev), ln.to(dev))
            self.step_logits = torch.zeros(self.n_layers, bs, self.kv_heads, dtype=torch.float32, device=dev)
        self.pending = (torch.tensor(rows, dtype=torch.long), torch.tensor(seq_lens) - 1, tokens)

    def finish_decode(self) -> None:
        """After a decode forward: the gates' decisions of every layer go to the pool, with one read
        of the step's logits (none inside the forward, which a CUDA graph can then capture); a graph's
        padding rows are left out."""
        if self.pending is None:
            return
        rows, positions, tokens = self.pending
        self.pending = None
        logits = self.step_logits[:, :len(rows)].cpu()
        for layer in range(self.n_layers):
            self.pool.decode_flags(rows, layer, positions, logits[layer], tokens)

    def reset(self) -> None:
        rows, window, sinks, num_tokens = self.args
        self.pool = HeadSlotPool(self.num_slots, self.n_layers, self.kv_heads, window, sinks, num_tokens, rows)
        self.per_request.clear()
        self.decode = self.extend = self.pending = None

    def kept(self) -> float:
        f = self.pool.kept_fraction()
        return 1.0 if f is None else f

    def available_tokens(self) -> int:
        """Free slots in dense-token equivalents (what SGLang's allocator reports as available)."""
        return self.pool.free_slots // self.lh

    def evictable_tokens(self) -> int:
        """What evicting every unlocked prefix-cache entry would free, in dense-token equivalents: the
        slots only the cache references, less those on running requests' prefixes (locked). With the
        available tokens it adds up to the budget when nothing runs (SGLang's idle leak check)."""
        only = self.pool.cached & (self.pool.view_refs == 0)
        if self.pool.rows and self.req_to_token is not None and bool(only.any()):
            toks = torch.cat([self.req_to_token[row, :r.seen].long().cpu() for row, r in self.pool.rows.items()])
            s = self.pool.token_slot[toks].reshape(-1)
            only[s[s >= 0]] = False
        return -(-int(only.sum()) // self.lh)

    def slots_for_next_decode(self, rows) -> int:
        need = 0
        for row in rows:
            r = self.pool.rows.get(row)
            need += self.pool.slots_for_append(row) if r is not None and r.placed == self.n_layers else self.lh
        return need

    def release(self, row: int, rid: str | None = None) -> None:
        if row not in self.pool.rows:
            return
        st = self.pool.release(row)
        if rid is not None:
            rec = self.per_request.setdefault(rid, {"peak": 0, "reads": 0, "steps": 0, "dense_reads": 0,
                                                    "shared": 0})
            rec["peak"] = max(rec["peak"], st["peak"])
            rec["reads"] += st["reads"]
            rec["steps"] += st["steps"]
            rec["shared"] = max(rec["shared"], st["shared"])
            # a dense cache reads every token so far at each step: sum of (t + 1) over the steps
            rec["dense_reads"] += (st["seen"] * (st["seen"] + 1) - st["prompt"] * (st["prompt"] + 1)) // 2 \
                * st["slots_per_token"]
            rec.update(held=st["held"], seen=st["seen"], slots_per_token=st["slots_per_token"])

    def request_meta(self, rid: str) -> dict:
        """A finished request's figures: held and peak in dense-token equivalents, its ratio, KV token
        reads per decode step (DMS's and a dense cache's), and the totals the harness reads
        (``kv_token_reads``: summed over decode steps, layers and KV heads; ``kv_tokens_held_peak``:
        peak (layer, KV head) slots stored for it, ``HeadSlotPool.footprint``;
        ``kv_tokens_prefix_shared``: of those, the slots it took from the prefix cache, shared with
        whoever else holds that prefix)."""
        rec = self.per_request.pop(rid, None)
        if rec is None:
            return {}
        lh = rec["slots_per_token"]
        return {"held_tokens": round(rec["held"] / lh, 2), "peak_held_tokens": round(rec["peak"] / lh, 2),
                "dense_tokens": rec["seen"], "ratio": round(rec["seen"] * lh / max(rec["held"], 1), 3),
                "reads_per_step": round(rec["reads"] / rec["steps"], 1) if rec["steps"] else 0.0,
                "dense_reads_per_step": round(rec["dense_reads"] / rec["steps"], 1) if rec["steps"] else 0.0,
                "kv_token_reads": rec["reads"], "kv_tokens_held_peak": rec["peak"],
                "kv_tokens_prefix_shared": rec["shared"]}

    def stats(self) -> dict:
        rows = self.pool.rows
        held = sum(self.pool.held(q) for q in rows)
        dense = sum(r.seen for r in rows.values())
        used = self.num_slots - self.pool.free_slots
        self.peak_held = max(self.peak_held, used)
        return {"held_tokens": used / self.lh, "peak_held_tokens": self.peak_held / self.lh,
                "dense_tokens": dense, "ratio": dense * self.lh / held if held else 0.0,
                "reads_per_step": self.last_reads, "kept_fraction": self.kept(),
                "free_slots": self.pool.free_slots, "cached_tokens": self.pool.cache_only_slots() / self.lh,
                "peak_sequences": self.peak_sequences}


class _DecodeGraph:
    """What a captured decode step reads, at addresses fixed for the server's life: the new tokens'
    slots ``[layers, max_bs * kv_heads]``, slot tables ``[layers, max_bs, kv_heads, width]`` (int32;
    ``width``, the context length, bounds every head's view), lengths ``[layers, max_bs, kv_heads]`` and
    the gate logits ``[layers, max_bs, kv_heads]``. A step of ``bs`` rows (padding included) reads the
    first ``bs`` rows of each; padding rows hold nothing and write to the scratch slot."""

    def __init__(self, st: _State, max_bs: int, width: int):
        L, H, dev = st.n_layers, st.kv_heads, st.k.device
        self.max_bs, self.width, self.kv_heads, self.scratch = max_bs, width, H, st.scratch
        self.slots = torch.full((L, max_bs * H), st.scratch, dtype=torch.long, device=dev)
        self.tables = torch.zeros(L, max_bs, H, width, dtype=torch.int32, device=dev)
        self.lengths = torch.zeros(L, max_bs, H, dtype=torch.long, device=dev)
        self.logits = torch.zeros(L, max_bs, H, dtype=torch.float32, device=dev)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.slots, self.tables, self.lengths, self.logits))

    def views(self, bs: int):
        """The first ``bs`` rows: (slots, tables, lengths) and the logits buffer."""
        return (self.slots[:, :bs * self.kv_heads], self.tables[:, :bs], self.lengths[:, :bs]), \
            self.logits[:, :bs]

    def capture(self, bs: int):
        """A capture's batch: every row padding."""
        self.slots[:, :bs * self.kv_heads] = self.scratch
        self.lengths[:, :bs] = 0
        return self.views(bs)

    def stage(self, slots: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, bs: int):
        """A step's placement (``n`` real rows) into the buffers, rows ``n..bs`` padding."""
        n, w = tables.shape[1], tables.shape[-1]
        if w > self.width:
            raise RuntimeError(f"DMS: a head holds {w} slots, more than the graph tables' width {self.width} "
                               "(the context length)")
        H = self.kv_heads
        self.slots[:, :n * H].copy_(slots)
        self.slots[:, n * H:bs * H] = self.scratch
        self.tables[:, :n, :, :w].copy_(tables)
        self.lengths[:, :n].copy_(lengths)
        self.lengths[:, n:bs] = 0
        return self.views(bs)


def _state_of(obj) -> _State | None:
    return getattr(obj, "_kvsqueeze_dms", None)


def _prefill_budget_class():
    from sglang.srt.mem_cache.prefill_budget import PrefillBudget

    class DMSPrefillBudget(PrefillBudget):
        """Charges a new request the tokens its extend computes in full for this pass (``current``;
        a prefix-cache hit is already stored), and for the long run (``total``) what it is expected
        to hold: those tokens and its new tokens at the kept fraction, plus the window. Room is the
        head pool's free slots plus what evicting the unlocked prefix cache would free."""

        def __init__(self, allocator, tree_cache, *, num_mixed_decode_tokens=0):
            super().__init__(allocator, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)
            self.st = _state_of(allocator)
            self.kept = self.st.kept()

        def _available_and_evictable(self):
            evictable = self.st.evictable_tokens() if self.tree_cache.supports_prefix_sharing() else 0
            return self.allocator.available_size() + evictable

        def _long_run(self, extend: int, max_new: int) -> int:
            w = self.st.window + 2  # the window and the lagging token
            prompt = extend if extend <= w else w + math.ceil(self.kept * (extend - w))
            return prompt + math.ceil(self.kept * max_new) + 1

        def check_prefill(self, *, extend_input_len, total_tokens, max_new_tokens, **kw):
            other = total_tokens - extend_input_len - max_new_tokens  # SGLang's per-request extras
            ok = (other + self._long_run(extend_input_len, max_new_tokens) < self.remaining_total
                  and extend_input_len + 1 + other <= self.remaining_current)
            return (True, kw.get("chunk_limit")) if ok else (False, None)

        def can_allocate_prefill(self, *, paged_input, **kw):
            return paged_input + 1 <= self.remaining_current

        def reserve(self, extend_input_len, max_new_tokens, *, extra_tokens=0, **kw):
            self.current_offset += extend_input_len + 1 + self.page_size + extra_tokens
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
                        "pool allocates its own slots)")
    k0 = pool.get_key_buffer(0)
    v0 = pool.get_value_buffer(0)
    num_tokens = pool.size * VIRTUAL_FACTOR + 1  # SGLang's indices start at 1 (0 is its padding slot)
    st = _State(pool.size, pool.layer_num, pool.head_num, k0.shape[-1], v0.shape[-1], k0.dtype, k0.device,
                rtp.req_to_token.shape[0], cfg.window, cfg.sinks, num_tokens, rtp.req_to_token)
    key = "dms.pool"
    # SGLang's K/V buffers are not used: keep one row each, so the memory is the head pool's
    set_value(pool, "k_buffer", key, [b[:1].clone() for b in pool.k_buffer])
    set_value(pool, "v_buffer", key, [b[:1].clone() for b in pool.v_buffer])
    set_value(alloc, "size", key, pool.size * VIRTUAL_FACTOR)
    alloc.clear()
    budget_cls = _prefill_budget_class()
    indices = {}

    def available_size(available):
        indices["free"] = available  # SGLang's own count: free token indices
        return lambda: min(available(), st.available_tokens())

    patch(alloc, "available_size", key, available_size)

    def evict(evict_to_free):
        def room(tree_cache, slots: int) -> bool:
            """Evict the prefix cache until ``slots`` more slots are free than now."""
            before = st.pool.free_slots
            if tree_cache is not None:
                evict_to_free(tree_cache, -(-(before + slots) // st.lh))
            return st.pool.free_slots >= before + slots

        def _evict(tree_cache, num_tokens):
            # SGLang evicts for a whole extend's (or a decode batch's) tokens before it allocates their
            # indices. An extend stores only the tokens its gates keep, which are not known before its
            # forward: the extend evicts what each layer lacks when it places it (``reclaim``), so a
            # cached prompt whose requests are about to arrive is not evicted for room that is not
            # needed. Here only SGLang's token indices must suffice (rare: 16x the budget).
            st.reclaim = lambda slots: room(tree_cache, slots)
            if num_tokens > indices["free"]():
                evict_to_free(tree_cache, num_tokens)
        st.room = room
        return _evict

    patch(alloc, "evict_to_free_tokens", key, evict, chains=False,
          why="SGLang evicts the prefix cache for an extend's dense length before its forward; DMS stores "
          "only the tokens the gates keep, so the extend evicts what it lacks while it places them, and "
          "SGLang's eviction runs only when its token indices run short")

    def check_decode(check):
        def _check(*, num_tokens, tree_cache, requests=None, spec_algorithm=None):
            need = st.slots_for_next_decode([r.kv.req_pool_idx for r in requests or []])
            if need > st.pool.free_slots:  # the prefix cache gives back what it alone holds first
                st.room(tree_cache, need - st.pool.free_slots + st.lh)
            return need <= st.pool.free_slots
        return _check

    patch(alloc, "check_decode_capacity", key, check_decode, chains=False,
          why="the head pool's exact count of the slots the next step needs replaces SGLang's count of "
          "free token indices (a step frees the slots of the tokens that leave windows)")
    patch(alloc, "create_prefill_budget", key, lambda create: (
        lambda tree_cache, *, num_mixed_decode_tokens=0: budget_cls(
            alloc, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)),
        chains=False, why="DMS's budget (a subclass of SGLang's PrefillBudget) charges the measured kept "
        "fraction instead of one slot per token")

    def free(orig):
        def _free(free_index):
            # token indices SGLang frees (a radix node evicted, a duplicate, an uncached tail) lose
            # their slots unless a running request's view still reads them
            st.pool.forget(free_index)
            orig(free_index)
        return _free

    def free_rows(orig):
        def _free_rows(indices):
            for row in indices:
                st.release(int(row))
            orig(indices)
        return _free_rows

    def free_req(orig):
        def _free_req(req):
            if req.kv.req_pool_idx is not None:
                st.release(int(req.kv.req_pool_idx), req.rid)
            orig(req)
        return _free_req

    def clear(orig):
        def _clear():
            orig()
            st.reset()
        return _clear

    def forward(orig):
        def _forward(*args, **kwargs):
            out = orig(*args, **kwargs)
            st.finish_decode()
            return out
        return _forward

    patch(model_runner, "forward", key, forward)
    patch(alloc, "free", key, free)
    patch(rtp, "free_rows", key, free_rows)
    patch(rtp, "free", key, free_req)
    patch(rtp, "clear", key, clear)
    alloc._kvsqueeze_dms = st
    logger.info("kvsqueeze DMS: per-head pool of %d slots (%d dense tokens x %d layers x %d KV heads), "
                "%.1f MB; token tables for %d SGLang indices", st.num_slots, st.budget, st.n_layers,
                st.kv_heads, (st.k.numel() * st.k.element_size() + st.v.numel() * st.v.element_size()) / 1e6,
                num_tokens)
    return st


def _backend_class():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    class DMSAttnBackend(TorchNativeAttnBackend):
        def __init__(self, model_runner):
            super().__init__(model_runner)
            cfg = load_config(checkpoint_dir())
            self.window, self.sinks = cfg.window, cfg.sinks
            self.st = _attach(model_runner, cfg)
            self.req_to_token = model_runner.req_to_token_pool.req_to_token
            self.context_len = int(model_runner.model_config.context_len)

        # ---- placing the batch's tokens -------------------------------------------------------
        def init_forward_metadata(self, forward_batch):
            super().init_forward_metadata(forward_batch)
            fb, st = forward_batch, self.st
            st.finish_decode()  # a decode forward that ran outside ModelRunner.forward
            st.decode = st.extend = None
            if fb.req_pool_indices is None or fb.req_pool_indices.numel() == 0:
                return
            rows = [int(r) for r in fb.req_pool_indices.tolist()]
            locs = fb.out_cache_loc.long().cpu()
            if fb.forward_mode.is_decode():
                # a graph runner pads the batch with rows that point at SGLang's reserved request row 0
                n = len(rows) - rows.count(0)
                if rows[n:].count(0) != len(rows) - n:
                    raise RuntimeError(f"DMS: request row 0 (SGLang's padding row) amid a decode batch {rows}")
                st.place_decode(rows[:n], fb.seq_lens[:n].tolist(), locs[:n], len(rows) - n)
            elif fb.forward_mode.is_extend():
                prefix = fb.extend_prefix_lens.tolist() if fb.extend_prefix_lens is not None else [0] * len(rows)
                rtt = self.req_to_token
                st.extend = []
                s = 0
                for row, e, pre in zip(rows, fb.extend_seq_lens.tolist(), prefix):
                    try:
                        st.pool.begin(row, rtt[row, :pre], pre + e)
                    except KvsqueezeError as exc:  # the prefix match checks resumable(); this is a bug
                        raise RuntimeError(f"DMS: request row {row} cannot extend from its {pre}-token "
                                           f"prefix: {exc}") from exc
                    st.extend.append(locs[s:s + e])
                    s += e
            else:
                raise RuntimeError(f"DMS: forward mode {fb.forward_mode} is not supported")

        # ---- graph runners: SGLang's CUDA graphs and its CPU graphs (torch.compile) ------------------
        # What a decode step reads lives in static buffers (_DecodeGraph), filled before each replay
        # by the same placement as an eager step; the captured forward is decode_layer per layer.
        def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
            st = self.st
            st.graph = _DecodeGraph(st, max_bs, self.context_len)
            logger.info("kvsqueeze DMS: decode graph buffers for %d requests x %d slots per head, %.1f MB",
                        max_bs, self.context_len, st.graph.nbytes() / 1e6)

        init_cpu_graph_state = init_cuda_graph_state

        def get_cuda_graph_seq_len_fill_value(self):
            return 1

        get_cpu_graph_seq_len_fill_value = get_cuda_graph_seq_len_fill_value

        def _capture(self, bs: int, forward_mode) -> None:
            st = self.st
            if not forward_mode.is_decode():
                raise RuntimeError(f"DMS: graphs capture decode steps only, not {forward_mode}")
            if st.graph is None:
                raise RuntimeError("DMS: a graph capture before init_cuda_graph_state")
            st.finish_decode()
            st.pending = st.extend = None
            st.decode, st.step_logits = st.graph.capture(bs)

        def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
            # CUDA graphs: before a capture (every row padding) or a replay (the batch, padded)
            if in_capture:
                self._capture(forward_batch.batch_size, forward_batch.forward_mode)
            else:
                self.init_forward_metadata(forward_batch)

        def init_forward_metadata_capture_cpu_graph(self, bs, num_tokens, req_pool_indices, seq_lens,
                                                    out_cache_loc, encoder_lens, forward_mode, spec_info):
            self._capture(bs, forward_mode)  # CPU graphs replay through init_forward_metadata

        def _logits(self, layer_id: int, n: int) -> torch.Tensor:
            lg = _LOGITS.pop(layer_id, None)
            if lg is None:
                raise RuntimeError(f"{ENV} is set but no DMS gate ran for layer {layer_id}: the gates are "
                                   f"wired into {', '.join(MODELS)} only")
            if lg.shape[0] != n:
                raise RuntimeError(f"DMS gate logits for {lg.shape[0]} tokens, but the batch has {n}")
            return lg

        # ---- prefill, prefill chunks, the rest of a prompt after a prefix-cache hit ----------------
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
            for i, (row, n) in enumerate(zip(fb.req_pool_indices.tolist(), fb.extend_seq_lens.tolist())):
                cf = st.pool.chunk_flags(int(row), lg[s:s + n])
                pre, vis = st.pool.extend_attention(int(row), lid, cf)  # [hk, P], [hk, n, P + n]
                kk = torch.cat([st.k[pre.to(st.k.device), 0].to(q.dtype), k_[s:s + n].transpose(0, 1).to(q.dtype)], 1)
                vv = torch.cat([st.v[pre.to(st.v.device), 0].to(q.dtype), v_[s:s + n].transpose(0, 1).to(q.dtype)], 1)
                qq = q_[s:s + n].transpose(0, 1)
                out = torch.nn.functional.scaled_dot_product_attention(
                    qq, kk.repeat_interleave(group, 0), vv.repeat_interleave(group, 0),
                    attn_mask=vis.to(q.device).repeat_interleave(group, 0), scale=layer.scaling)
                o[s:s + n] = out.transpose(0, 1)
                placed = self._place(int(row), lid, cf, st.extend[i])
                for h, (offs, slots) in enumerate(placed):
                    kp = offs.to(q.device) + s
                    st.k[slots.to(st.k.device), 0] = k_[kp, h].to(st.k.dtype)
                    st.v[slots.to(st.v.device), 0] = v_[kp, h].to(st.v.dtype)
                s += n
            return o.reshape(-1, hq * vd)

        def _place(self, row: int, lid: int, cf, tokens):
            st = self.st
            try:
                return st.pool.extend_place(row, lid, cf, tokens)
            except SlotsExhausted as exc:  # the prefix cache gives back what this layer lacks
                if st.reclaim is None or not st.reclaim(exc.short):
                    raise RuntimeError(f"DMS: {exc}, and the prefix cache has no more to evict, although "
                                       "admission counted room for the whole extend") from exc
            return st.pool.extend_place(row, lid, cf, tokens)

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
            out = decode_layer(q.reshape(bs, hq, d), k.reshape(-1, d), v.reshape(-1, vd), self._logits(lid, bs),
                               slots[lid], pt[lid], ln[lid], st.k, st.v, st.step_logits[lid], layer.scaling)
            return out.reshape(-1, hq * vd).to(q.dtype)

    return DMSAttnBackend


def _radix_cache_class():
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    class DMSRadixCache(UnifiedRadixCache):
        """SGLang's radix cache (the unified tree it builds by default), aware of the head pool: a
        hit is cut back to where every token the prefix holds is still stored, the tokens it takes
        in keep their slots, and its evictable size is what evicting it would free."""

        def _dms(self) -> _State | None:
            return _state_of(self.token_to_kv_pool_allocator)

        def match_prefix(self, params):
            res = super().match_prefix(params)
            st, m = self._dms(), res.device_prefix_len
            if st is None or m == 0:
                return res
            # flagged tokens a request let go before its tokens entered the tree are not stored
            ok = st.pool.resumable(self.path_device_indices(res.last_device_node)[:m])
            return res if ok == m else super().match_prefix(dataclasses.replace(params, key=params.key[:ok]))

        def insert(self, params):
            st = self._dms()
            if st is not None and params.value is not None and params.key is not None and len(params.key):
                # the tree keeps its own indices of a prefix it holds and frees this request's: first
                # the slots this continuation holds there and the tree's tokens lack move over
                have = super().match_prefix(MatchPrefixParams(key=params.key))
                if have.device_prefix_len:
                    k = have.device_prefix_len
                    st.pool.adopt(self.path_device_indices(have.last_device_node)[:k], params.value[:k])
            res = super().insert(params)
            if st is not None and params.value is not None:
                st.pool.publish(params.value[res.prefix_len:len(params.key)])
            return res

        def evictable_size(self):
            st = self._dms()
            return super().evictable_size() if st is None else st.evictable_tokens()

    return DMSRadixCache


MODELS = ("LlamaForCausalLM", "Qwen3ForCausalLM")  # SGLang model classes DMS is wired into


def _model_class(base_cls, directory: Path):
    class DMSForCausalLM(base_cls):
        def load_weights(self, weights):
            # a released checkpoint keeps its gates among the weights: they are DMS's, not the model's
            out = super().load_weights((n, w) for n, w in weights if "dms_proj_alpha" not in n)
            _install_gates(self, directory)
            return out

    DMSForCausalLM.__name__ = DMSForCausalLM.__qualname__ = f"DMS{base_cls.__name__}"
    return DMSForCausalLM


def install() -> bool:
    """Register the DMS model subclass and the ``dms`` attention backend, and wrap SGLang's admission
    and output streamer (once per process)."""
    global _installed
    directory = checkpoint_dir()
    if directory is None or _installed:
        return _installed
    from sglang.srt.arg_groups.choices import add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.managers.schedule_policy import PrefillAdder
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer
    from sglang.srt.mem_cache.registry import create_unified_radix_cache, register_radix_cache_backend
    from sglang.srt.models.registry import ModelRegistry

    from kvsqueeze.backends.sglang.cpu_shims import cpu_graphs

    cpu_graphs()  # the dms backend implements SGLang's CPU graph hooks (--enable-torch-compile on a CPU)
    add_attention_backend_choices(["dms"])
    register_attention_backend("dms")(lambda runner: _backend_class()(runner))
    for name in MODELS:
        patch_item(ModelRegistry.models, name, "dms", lambda cls: _model_class(cls, directory),
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

    register_radix_cache_backend(RADIX_BACKEND, lambda ctx: create_unified_radix_cache(
        ctx, cache_class=_radix_cache_class()))
    patch(PrefillAdder, "_get_running_request_total_token_offset", "dms", running_offset)
    patch(Scheduler, "get_new_batch_prefill", "dms", new_batch_prefill)
    set_value(SchedulerOutputStreamer, "has_additional_customized_info", "dms", True)
    patch(SchedulerOutputStreamer, "build_additional_customized_info", "dms", customized_info)
    _installed = True
    return True
