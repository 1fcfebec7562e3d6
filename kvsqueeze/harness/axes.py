"""The three axes of a W-L configuration (as in the DMS paper's hyper-scaling figure), in one place:
KV-cache token reads per question, peak KV tokens in memory per question, and throughput at the
largest batch of questions that fits a KV budget; plus the memory-bandwidth bound of decode.

Definitions (``docs/metrics.md`` says the same in prose):

- **reads**: decode-step KV token reads of the W samples of a question, summed over layers and KV
  heads: the server's own count where it reports one (DMS), else computed for a dense cache
  (:func:`kv_reads_computed`).
- **peak per question**: the KV tokens one question holds at its peak, whatever else runs: where the
  server reports its samples' peaks (DMS's per-head pool, in dense-token equivalents: slots / (layers
  x KV heads)), the prompt slots they share from the prefix cache once plus each sample's own part,
  else computed for a dense cache from lengths: the prompt once plus every sample's generated tokens
  when the W samples of one request share the prompt's prefix-cache pages (mode ``n``), the prompt
  per sample otherwise (:func:`question_peak_tokens`).
- **maximum batch**: ``floor(budget / peak per question)`` questions at once (:func:`max_batch`),
  the budget being the server's KV pool (``sglang:max_total_num_tokens``); the harness runs the
  configuration's remaining questions at that concurrency and checks that the server retracted none
  (after retractions it verifies smaller batches, :func:`kvsqueeze.harness.sweep.run_two_phase`).
- **bandwidth bound**: a decode step reads the weights once and the KV every running sample holds;
  with ``B`` questions of ``W`` samples running, ``B*W`` tokens per step can come out at most
  ``bandwidth / (weight bytes + B * peak per question * KV bytes per token)`` times a second
  (:func:`decode_bound_tok_s`); bandwidth from a copy benchmark run on the same machine
  (:func:`copy_bandwidth`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def kv_reads_computed(prompt_tokens, output_tokens, layers: int, kv_heads: int):
    """KV token reads of a sample's decode steps on a dense cache, summed over layers and KV heads.

    The decode step that produces output token t (t = 2..T) attends to the P prompt tokens and the
    t-1 output tokens before it: sum_{t=2..T} (P + t - 1) = (T-1) P + T (T-1) / 2 token positions,
    times layers x KV heads. The first output token comes from prefill, whose reads are not counted.
    """
    P, T = int(prompt_tokens), int(output_tokens)
    if T < 2:
        return 0
    return layers * kv_heads * ((T - 1) * P + T * (T - 1) // 2)


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else f


def question_peak_tokens(samples: list[dict], layers: int, kv_heads: int, shares_prompt: bool) -> float | None:
    """Peak KV tokens one question holds: ``samples`` are its rows (``prompt_tokens``,
    ``output_tokens``, ``kv_held_peak_server``, ``kv_shared_server``). From the server's figures: the
    prefix its samples took from the prefix cache once (the largest), plus each sample's own; from
    lengths otherwise. None if a sample failed or has no lengths."""
    if not samples:
        return None
    held = [_num(s.get("kv_held_peak_server")) for s in samples]
    if all(h is not None for h in held) and layers and kv_heads:
        shared = [_num(s.get("kv_shared_server")) or 0 for s in samples]
        return (max(shared) + sum(h - c for h, c in zip(held, shared))) / (layers * kv_heads)
    P = [_num(s.get("prompt_tokens")) for s in samples]
    T = [_num(s.get("output_tokens")) for s in samples]
    if any(p is None for p in P) or any(t is None for t in T):
        return None
    # the last sampled token is never stored: a sample of T tokens holds P + T - 1
    gen = sum(max(t - 1, 0) for t in T)
    return max(P) + gen if shares_prompt else sum(P) + gen


def max_batch(budget_tokens: float, peak_per_question: float) -> int:
    """Questions of this size that fit the budget at once (0 if not even one)."""
    if not peak_per_question or peak_per_question <= 0:
        return 0
    return int(math.floor(budget_tokens / peak_per_question + 1e-9))


def decode_bound_tok_s(bandwidth_bytes_s: float, weight_bytes: float, kv_bytes_per_token: float,
                       questions: int, W: int, peak_per_question: float) -> float:
    """Output tokens/s a decode step cannot beat with ``questions`` x ``W`` samples running."""
    step_bytes = weight_bytes + questions * peak_per_question * kv_bytes_per_token
    return questions * W * bandwidth_bytes_s / step_bytes if step_bytes > 0 else float("nan")


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> dict:
    """Memory bandwidth of this machine by a copy benchmark: the best of ``repeats`` copies of a
    ``mib`` MiB buffer with torch's ``copy_`` (each copy reads and writes every byte: 2 x size moved).
    On a GPU machine, the device's buffer."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    best = float("inf")
    for _ in range(repeats):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if dev == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"device": dev, "buffer_mib": mib, "repeats": repeats, "seconds": best,
            "bytes_s": 2 * n * 4 / best, "threads": torch.get_num_threads()}


def weight_count(model_path: Path) -> int:
    """Parameters of a checkpoint, from its safetensors headers (nothing is loaded)."""
    total = 0
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for name, t in header.items():
            if name != "__metadata__":
                total += math.prod(t["shape"])
    return total


DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "auto": 2}
