"""Block-fusion hot loop: L2 norms of flattened KV blocks and the cosine-similarity (Gram) matrix.

``block_gram(x)`` takes ``x: [n_blocks, dim]`` (a key block flattened over heads, tokens and head
dimensions per row) and returns ``(norms [n], gram [n, n])`` with ``gram[i, j]`` the cosine
similarity of blocks i and j (a block of norm 0 has similarity 0 with every block, 1 with itself).

Two implementations that must agree:

- ``block_gram_reference``: PyTorch, float64 accumulation; the CPU path and the test oracle;
- ``block_gram_triton``: a Triton kernel (one program per ``BLOCK_M x BLOCK_N`` tile of the Gram
  matrix, float32 ``tl.dot`` over ``BLOCK_K`` slices of the rows, norms from the diagonal terms of the
  same pass) for GPUs; tested against the reference under ``TRITON_INTERPRET=1`` on CPU.

``block_gram`` picks Triton for CUDA tensors when Triton is importable, the reference otherwise.
"""

from __future__ import annotations

import torch

from kvsqueeze.kernels import use_triton

EPS = 1e-12


def block_gram_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2:
        raise ValueError(f"x: expected [n_blocks, dim], got shape {tuple(x.shape)}")
    xd = x.double()
    norms = xd.norm(dim=1)
    units = xd / norms.clamp_min(EPS)[:, None]
    gram = units @ units.T
    gram.fill_diagonal_(1.0)
    return norms.to(torch.float32), gram.to(torch.float32)


def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gram_kernel(x_ptr, inv_ptr, out_ptr, n, dim, stride_x, stride_o,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            kk = k0 + rk
            a = tl.load(x_ptr + rm[:, None] * stride_x + kk[None, :],
                        mask=(rm[:, None] < n) & (kk[None, :] < dim), other=0.0)
            b = tl.load(x_ptr + rn[:, None] * stride_x + kk[None, :],
                        mask=(rn[:, None] < n) & (kk[None, :] < dim), other=0.0)
            acc += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        inv_m = tl.load(inv_ptr + rm, mask=rm < n, other=0.0)
        inv_n = tl.load(inv_ptr + rn, mask=rn < n, other=0.0)
        cos = acc * inv_m[:, None] * inv_n[None, :]
        cos = tl.where(rm[:, None] == rn[None, :], 1.0, cos)
        tl.store(out_ptr + rm[:, None] * stride_o + rn[None, :], cos,
                 mask=(rm[:, None] < n) & (rn[None, :] < n))

    @triton.jit
    def norm_kernel(x_ptr, norm_ptr, inv_ptr, n, dim, stride_x, BLOCK_K: tl.constexpr):
        row = tl.program_id(0)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            kk = k0 + rk
            v = tl.load(x_ptr + row * stride_x + kk, mask=kk < dim, other=0.0).to(tl.float32)
            acc += v * v
        nrm = tl.sqrt(tl.sum(acc, axis=0))
        tl.store(norm_ptr + row, nrm)
        tl.store(inv_ptr + row, tl.where(nrm > 1e-12, 1.0 / tl.maximum(nrm, 1e-12), 0.0))

    return norm_kernel, gram_kernel


_KERNELS = None


def block_gram_triton(x: torch.Tensor, block_m: int = 32, block_n: int = 32,
                      block_k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    global _KERNELS
    if x.dim() != 2:
        raise ValueError(f"x: expected [n_blocks, dim], got shape {tuple(x.shape)}")
    if _KERNELS is None:
        _KERNELS = _triton_kernel()
    norm_kernel, gram_kernel = _KERNELS
    x = x.contiguous()
    n, dim = x.shape
    norms = torch.empty(n, dtype=torch.float32, device=x.device)
    inv = torch.empty(n, dtype=torch.float32, device=x.device)
    gram = torch.empty((n, n), dtype=torch.float32, device=x.device)
    if n == 0:
        return norms, gram
    norm_kernel[(n,)](x, norms, inv, n, dim, x.stride(0), BLOCK_K=block_k)
    grid = (triton_cdiv(n, block_m), triton_cdiv(n, block_n))
    gram_kernel[grid](x, inv, gram, n, dim, x.stride(0), gram.stride(0),
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return norms, gram


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return block_gram_triton(x) if use_triton(x) else block_gram_reference(x)
