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
padded to the longest head, and a masked softmax): the CPU path of the SGLang backend;
``paged_decode_triton`` is one program per (sequence, query head) looping over its KV head's pages with
an online softmax; tested against the reference under ``TRITON_INTERPRET=1``. Page sizes: powers of
two from 8 to 128 (anything else is a clear error); head dims up to 256.
"""

from __future__ import annotations

import torch

from kvsqueeze.errors import bad_value
from kvsqueeze.kernels import use_triton

SUPPORTED_PAGE_SIZES = (8, 16, 32, 64, 128)


def _check(q, k_pages, v_pages, page_table, lengths):
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
    if len(lengths) and int(lengths.max()) > cap:
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
    b, hq, hkv, d = _check(q, k_pages, v_pages, page_table, lengths)
    ps = k_pages.shape[1]
    scale = d ** -0.5 if scale is None else scale
    n = int(lengths.max()) if lengths.numel() else 0
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


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_kernel(q_ptr, k_ptr, v_ptr, pt_ptr, len_ptr, out_ptr, scale,
                      stride_qb, stride_qh, stride_kp, stride_ks, stride_ptb, stride_pth,
                      stride_lb, stride_ob, stride_oh, group, max_pages,
                      PAGE: tl.constexpr, DIM: tl.constexpr, DIM_P: tl.constexpr):
        b = tl.program_id(0)
        hq = tl.program_id(1)
        hk = hq // group
        rd = tl.arange(0, DIM_P)
        dmask = rd < DIM
        q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + rd, mask=dmask, other=0.0).to(tl.float32)
        n = tl.load(len_ptr + b * stride_lb + hk)
        m = tl.full((), float("-inf"), tl.float32)
        l = tl.zeros((), tl.float32)
        acc = tl.zeros((DIM_P,), tl.float32)
        rs = tl.arange(0, PAGE)
        n_pages = (n + PAGE - 1) // PAGE
        for pi in range(0, max_pages):
            if pi < n_pages:
                page = tl.load(pt_ptr + b * stride_ptb + hk * stride_pth + pi).to(tl.int64)
                slot_ok = (pi * PAGE + rs) < n
                offs = page * stride_kp + rs[:, None] * stride_ks + rd[None, :]
                k = tl.load(k_ptr + offs, mask=slot_ok[:, None] & dmask[None, :], other=0.0)
                v = tl.load(v_ptr + offs, mask=slot_ok[:, None] & dmask[None, :], other=0.0)
                s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
                s = tl.where(slot_ok, s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=0))
                alpha = tl.exp(m - m_new)
                p = tl.exp(s - m_new)
                l = l * alpha + tl.sum(p, axis=0)
                acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
                m = m_new
        res = tl.where(l > 0, acc / tl.maximum(l, 1e-30), 0.0)
        tl.store(out_ptr + b * stride_ob + hq * stride_oh + rd, res, mask=dmask)

    return decode_kernel


_KERNEL = None


def paged_decode_triton(q, k_pages, v_pages, page_table, lengths, scale=None):
    global _KERNEL
    b, hq, hkv, d = _check(q, k_pages, v_pages, page_table, lengths)
    ps = k_pages.shape[1]
    if ps not in SUPPORTED_PAGE_SIZES:
        raise bad_value("page_size", ps, f"one of {', '.join(map(str, SUPPORTED_PAGE_SIZES))} "
                        "for the Triton paged-decode kernel")
    if d > 256:
        raise bad_value("head_dim", d, "at most 256 for the Triton paged-decode kernel")
    if _KERNEL is None:
        _KERNEL = _kernel()
    scale = d ** -0.5 if scale is None else scale
    q, k_pages, v_pages = q.contiguous(), k_pages.contiguous(), v_pages.contiguous()
    pt = page_table.to(torch.int32).contiguous()
    ln = lengths.to(torch.int32).contiguous()
    out = torch.empty(b, hq, d, dtype=torch.float32, device=q.device)
    dim_p = 1 << (d - 1).bit_length()
    _KERNEL[(b, hq)](q, k_pages, v_pages, pt, ln, out, float(scale),
                     q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1),
                     pt.stride(0), pt.stride(1), ln.stride(0), out.stride(0), out.stride(1),
                     hq // hkv, pt.shape[2], PAGE=ps, DIM=d, DIM_P=dim_p)
    return out.to(q.dtype)


def paged_decode(q, k_pages, v_pages, page_table, lengths, scale=None):
    impl = paged_decode_triton if use_triton(q) else paged_decode_torch
    return impl(q, k_pages, v_pages, page_table, lengths, scale)
