"""Decode attention over per-head paged KV (DMS): each (sequence, KV head) has its own pages and length.

Inputs, one layer:

- ``q``: ``[batch, q_heads, dim]`` (one decode token per sequence; q_heads a multiple of kv_heads, GQA);
- ``k_pages``, ``v_pages``: ``[num_pages, page_size, dim]`` (a page holds one KV head's tokens);
- ``page_table``: ``[batch, kv_heads, max_pages]`` int32/int64 page ids (entries past a head's pages
  are ignored);
- ``lengths``: ``[batch, kv_heads]`` tokens held by each (sequence, KV head); slots ``0..length-1``;
- ``scale``: softmax scale (default ``dim ** -0.5``).

Returns ``[batch, q_heads, dim]``. Slots are attended in slot order; keys carry RoPE already, so the
order of slots does not matter. A head with length 0 returns zeros.

``paged_decode_reference`` is PyTorch (float32 accumulation), one (sequence, head) at a time: the
reference; ``paged_decode_torch`` is the same computation batched (one gather of every held slot,
padded to the tables' width, and a masked softmax): the CPU path of the SGLang backend;
``paged_decode_triton`` is split-K (flash-decoding): one program per (sequence, KV head, split of its
held slots) walks its pages ``BLOCK_N`` slots at a time with an online softmax, every query head of the
GQA group sharing each K/V load, and a second kernel merges the splits; tested against the reference
under ``TRITON_INTERPRET=1``. Page sizes: 1 (a table of slots, as the DMS slot pool hands it) and
powers of two from 8 to 128 (anything else is a clear error); head dims up to 256.
"""

from __future__ import annotations

import torch

from kvsqueeze.errors import bad_value
from kvsqueeze.kernels import use_triton

SUPPORTED_PAGE_SIZES = (1, 8, 16, 32, 64, 128)  # 1: slot tables (the DMS slot pool)


def _check(q, k_pages, v_pages, page_table, lengths, check_lengths: bool = True):
    if q.dim() != 3 or k_pages.dim() != 3 or v_pages.shape != k_pages.shape:
        raise bad_value("shapes", (tuple(q.shape), tuple(k_pages.shape), tuple(v_pages.shape)),
                        "q [batch, q_heads, dim], k/v pages [num_pages, page_size, dim]")
    b, hq, d = q.shape
    if page_table.dim() != 3 or page_table.shape[0] != b or lengths.shape != page_table.shape[:2]:
        raise bad_value("page_table", tuple(page_table.shape),
                        "[batch, kv_heads, max_pages] with lengths [batch, kv_heads]")
    hkv = page_table.shape[1]
    if hq % hkv:
        raise bad_value("q_heads", hq, f"a multiple of kv_heads={hkv}")
    if k_pages.shape[2] != d:
        raise bad_value("dim", k_pages.shape[2], f"the query dim {d}")
    cap = page_table.shape[2] * k_pages.shape[1]
    if check_lengths and len(lengths) and int(lengths.max()) > cap:
        raise bad_value("lengths", int(lengths.max()), f"at most max_pages x page_size = {cap}")
    return b, hq, hkv, d


def paged_decode_reference(q, k_pages, v_pages, page_table, lengths, scale=None):
    b, hq, hkv, d = _check(q, k_pages, v_pages, page_table, lengths)
    ps = k_pages.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=q.device)
    group = hq // hkv
    for i in range(b):
        for h in range(hkv):
            n = int(lengths[i, h])
            if n == 0:
                continue
            slots = torch.arange(n, device=q.device)
            pages = page_table[i, h].long()[slots // ps]
            k = k_pages[pages, slots % ps].float()
            v = v_pages[pages, slots % ps].float()
            qs = q[i, h * group:(h + 1) * group].float()
            p = torch.softmax(qs @ k.T * scale, dim=-1)
            out[i, h * group:(h + 1) * group] = p @ v
    return out.to(q.dtype)


def paged_decode_torch(q, k_pages, v_pages, page_table, lengths, scale=None):
    # traced (torch.compile, a graph capture), the lengths are not read back: the tables cover them
    b, hq, hkv, d = _check(q, k_pages, v_pages, page_table, lengths,
                           check_lengths=not torch.compiler.is_compiling())
    ps = k_pages.shape[1]
    scale = d ** -0.5 if scale is None else scale
    n = page_table.shape[2] * ps  # the tables' width, known without reading the lengths
    if n == 0:
        return torch.zeros(b, hq, d, dtype=q.dtype, device=q.device)
    j = torch.arange(n, device=q.device)
    pages = page_table.long()[:, :, torch.div(j, ps, rounding_mode="floor")]  # [b, hkv, n]
    slots = pages * ps + j % ps
    valid = j < lengths.to(q.device).long()[..., None]  # [b, hkv, n]
    slots = torch.where(valid, slots, torch.zeros_like(slots))
    k = k_pages.reshape(-1, d)[slots].float()  # [b, hkv, n, d]
    v = v_pages.reshape(-1, v_pages.shape[-1])[slots].float()
    qs = q.float().reshape(b, hkv, hq // hkv, d)
    s = torch.einsum("bhgd,bhnd->bhgn", qs, k) * scale
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a head holding nothing attends to nothing
    return torch.einsum("bhgn,bhnd->bhgd", p, v).reshape(b, hq, -1).to(q.dtype)


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(q_ptr, k_ptr, v_ptr, pt_ptr, len_ptr, acc_ptr, ml_ptr, scale,
                     stride_qb, stride_qh, stride_kp, stride_ks, stride_vp, stride_vs,
                     stride_ptb, stride_pth, stride_lb, group, n_splits,
                     PAGE: tl.constexpr, DIM: tl.constexpr, DIM_P: tl.constexpr, G_P: tl.constexpr,
                     BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        # one program per (sequence, KV head, split of its held slots); the GQA group's query heads
        # (padded to G_P rows for tl.dot) share every K/V load
        b = tl.program_id(0)
        hk = tl.program_id(1)
        sp = tl.program_id(2)
        n_kv = tl.num_programs(1)
        rg = tl.arange(0, G_P)
        rd = tl.arange(0, DIM_P)
        gmask = rg < group
        dmask = rd < DIM
        q = tl.load(q_ptr + b * stride_qb + (hk * group + rg)[:, None] * stride_qh + rd[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)
        # this head's held slots split evenly over the programs, whole blocks each: the work follows
        # the length read on the device, not the tables' width (a graph's tables are context-wide)
        n = tl.load(len_ptr + b * stride_lb + hk)
        per = tl.cdiv(tl.cdiv(n, n_splits), BLOCK_N) * BLOCK_N
        start = sp * per
        end = tl.minimum(start + per, n)
        m = tl.full((G_P,), float("-inf"), tl.float32)
        l = tl.zeros((G_P,), tl.float32)
        acc = tl.zeros((G_P, DIM_P), tl.float32)
        for it in range(0, tl.cdiv(tl.maximum(end - start, 0), BLOCK_N)):
            j = start + it * BLOCK_N + tl.arange(0, BLOCK_N)
            ok = j < end
            page = tl.load(pt_ptr + b * stride_ptb + hk * stride_pth + j // PAGE, mask=ok, other=0).to(tl.int64)
            slot = j % PAGE
            kmask = ok[:, None] & dmask[None, :]
            k = tl.load(k_ptr + page[:, None] * stride_kp + slot[:, None] * stride_ks + rd[None, :],
                        mask=kmask, other=0.0)
            v = tl.load(v_ptr + page[:, None] * stride_vp + slot[:, None] * stride_vs + rd[None, :],
                        mask=kmask, other=0.0)
            s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=PRECISION) * scale  # [G_P, BLOCK_N]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a block with nothing held
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        base = (b * n_kv + hk) * n_splits + sp
        tl.store(acc_ptr + (base * G_P + rg)[:, None] * DIM_P + rd[None, :], acc)
        tl.store(ml_ptr + (base * G_P + rg) * 2, m)
        tl.store(ml_ptr + (base * G_P + rg) * 2 + 1, l)

    @triton.jit
    def reduce_kernel(acc_ptr, ml_ptr, out_ptr, stride_ob, stride_oh, group, n_splits,
                      DIM: tl.constexpr, DIM_P: tl.constexpr, G_P: tl.constexpr, S_P: tl.constexpr):
        # one program per (sequence, query head): merge the splits' partial softmaxes
        b = tl.program_id(0)
        hq = tl.program_id(1)
        n_kv = tl.num_programs(1) // group
        hk = hq // group
        g = hq % group
        rs = tl.arange(0, S_P)
        rd = tl.arange(0, DIM_P)
        smask = rs < n_splits
        base = ((b * n_kv + hk) * n_splits + rs) * G_P + g
        m = tl.load(ml_ptr + base * 2, mask=smask, other=float("-inf"))
        l = tl.load(ml_ptr + base * 2 + 1, mask=smask, other=0.0)
        acc = tl.load(acc_ptr + base[:, None] * DIM_P + rd[None, :], mask=smask[:, None], other=0.0)
        mx = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp(m - mx), 0.0)
        den = tl.sum(w * l, axis=0)
        num = tl.sum(w[:, None] * acc, axis=0)
        res = tl.where(den > 0, num / tl.maximum(den, 1e-30), 0.0)
        tl.store(out_ptr + b * stride_ob + hq * stride_oh + rd, res, mask=rd < DIM)

    return split_kernel, reduce_kernel


_KERNELS = None
BLOCK_N = 64


def _n_splits(b: int, hkv: int, longest: int, device) -> int:
    """Splits of each head's slots: enough programs to fill the GPU, none shorter than a block."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(1, -(-2 * sms // max(1, b * hkv)))
    return max(1, min(want, -(-longest // BLOCK_N)))


def paged_decode_triton(q, k_pages, v_pages, page_table, lengths, scale=None):
    global _KERNELS
    # on a GPU the lengths are not read back (a device sync per call, and none is allowed while a
    # CUDA graph captures): the caller's page tables must cover them, as the engine's do
    b, hq, hkv, d = _check(q, k_pages, v_pages, page_table, lengths, check_lengths=not q.is_cuda)
    ps = k_pages.shape[1]
    if ps not in SUPPORTED_PAGE_SIZES:
        raise bad_value("page_size", ps, f"one of {', '.join(map(str, SUPPORTED_PAGE_SIZES))} "
                        "for the Triton paged-decode kernel")
    if d > 256:
        raise bad_value("head_dim", d, "at most 256 for the Triton paged-decode kernel")
    if _KERNELS is None:
        _KERNELS = _kernels()
    split_kernel, reduce_kernel = _KERNELS
    scale = d ** -0.5 if scale is None else scale
    q, k_pages, v_pages = q.contiguous(), k_pages.contiguous(), v_pages.contiguous()
    pt = page_table.to(torch.int32).contiguous()
    ln = lengths.to(torch.int32).contiguous()
    group = hq // hkv
    longest = pt.shape[2] * ps  # a bound known on the host (no device sync)
    n_splits = _n_splits(b, hkv, longest, q.device)
    dim_p = max(16, 1 << (d - 1).bit_length())
    g_p = max(16, 1 << (group - 1).bit_length())
    acc = torch.empty(b, hkv, n_splits, g_p, dim_p, dtype=torch.float32, device=q.device)
    ml = torch.empty(b, hkv, n_splits, g_p, 2, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    split_kernel[(b, hkv, n_splits)](q, k_pages, v_pages, pt, ln, acc, ml, float(scale),
                                     q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1),
                                     v_pages.stride(0), v_pages.stride(1), pt.stride(0), pt.stride(1),
                                     ln.stride(0), group, n_splits,
                                     PAGE=ps, DIM=d, DIM_P=dim_p, G_P=g_p, BLOCK_N=BLOCK_N,
                                     PRECISION=precision)
    out = torch.empty(b, hq, d, dtype=torch.float32, device=q.device)
    reduce_kernel[(b, hq)](acc, ml, out, out.stride(0), out.stride(1), group, n_splits,
                           DIM=d, DIM_P=dim_p, G_P=g_p, S_P=max(2, 1 << (n_splits - 1).bit_length()))
    return out.to(q.dtype)


def paged_decode(q, k_pages, v_pages, page_table, lengths, scale=None):
    impl = paged_decode_triton if use_triton(q) else paged_decode_torch
    return impl(q, k_pages, v_pages, page_table, lengths, scale)
