"""Retrofit training of DMS gates by self-distillation (``kvsqueeze dms train``).

Teacher: the same model with eviction disabled (with ``query_neuron`` gates, by default, also with
the repurposed neuron zeroed before and after RoPE, as the released code's teacher mode; ``teacher
="intact"``: the original model). Student: the model with DMS gates and Gumbel-sigmoid decisions.
The training forward (``forward``) is by default ``soft``, the released code's: the relaxed decision
``alpha`` enters attention as ``log(1 - alpha)`` for keys outside the window; ``straight_through``
uses the hard decision forward and the soft mask's gradient backward (see
:mod:`kvsqueeze.methods.dms.run`). Loss = KL(student || teacher) on next-token distributions +
the compression loss ``max(0, a* - evicted fraction)`` with ``a* = 1 - 1 / CR(step)``, the target
ratio rising linearly from 1 to CR over ``ramp_steps`` and held there after; by default
(``compression_loss="sequence"``, the released code's) the hinge is taken per sequence over every
decided key and averaged over the batch; ``"batch"`` hinges the batch mean over keys 0..T-3 (how the
shipped gates were trained; identical at batch 1 but for one key per sequence). Adapter mode freezes
the base model and trains the gates (for ``query_neuron`` gates: the repurposed rows of ``q_proj``
only); full mode trains every weight. Checkpoints are written every ``save_every`` steps and resumed
automatically.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvsqueeze.attention import AttentionState, attention_state
from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.methods.dms.config import GATES_FILE, DMSConfig
from kvsqueeze.methods.dms.gates import DMSGates, install, query_neuron_index
from kvsqueeze.methods.dms.run import DMSRun


@dataclass(frozen=True)
class TrainConfig:
    target_ratio: float = 4.0
    steps: int = 400
    ramp_steps: int = 300
    seq_len: int = 256
    batch: int = 1
    lr: float = 3e-5
    mode: str = "adapter"
    window: int = 64
    sinks: int = 4
    forward: str = "soft"  # training mask: relaxed ("soft") or hard decisions ("straight_through")
    gate: str = "projection"
    granularity: str = "head"
    seed: int = 0
    save_every: int = 50
    threads: int = 0
    precision: str = "float32"  # "bfloat16": teacher and student forwards under bf16 autocast
    lr_decay: str = "none"  # "cosine": after the ramp, lr falls to 0 at the last step (a cosine)
    init: str = "zeros"  # "attention": gates fitted to the teacher's far attention first (warmstart.py)
    init_sequences: int = 8  # calibration sequences the attention warm start reads
    teacher: str = "zeroed"  # query_neuron gates: the teacher has the neuron zeroed too ("intact": not)
    compression_loss: str = "sequence"  # hinge per sequence over every decision ("batch": batch mean)

    def __post_init__(self):
        if not self.target_ratio >= 1:
            raise bad_value("target_ratio", self.target_ratio, "a compression ratio >= 1")
        if self.steps < 1:
            raise bad_value("steps", self.steps, "a number of steps >= 1")
        if not 0 <= self.ramp_steps <= self.steps:
            raise bad_value("ramp_steps", self.ramp_steps, f"between 0 and steps={self.steps}")
        if self.mode not in ("adapter", "full"):
            raise bad_value("mode", self.mode, "'adapter' (base frozen) or 'full'")
        if self.window >= self.seq_len:
            raise bad_value("window", self.window, f"fewer tokens than seq_len={self.seq_len}")
        if self.seq_len < 2 or self.batch < 1:
            raise bad_value("seq_len/batch", (self.seq_len, self.batch), "seq_len >= 2, batch >= 1")
        if not self.lr > 0:
            raise bad_value("lr", self.lr, "a learning rate > 0")
        if self.precision not in ("float32", "bfloat16"):
            raise bad_value("precision", self.precision, "float32 or bfloat16 (autocast)")
        if self.lr_decay not in ("none", "cosine"):
            raise bad_value("lr_decay", self.lr_decay, "'none' (constant lr) or 'cosine' (after the ramp)")
        if self.init not in ("zeros", "attention"):
            raise bad_value("init", self.init, "'zeros' (the paper) or 'attention' (warm start)")
        if self.init == "attention" and self.gate != "projection":
            raise bad_value("init", self.init, "'zeros' for query_neuron gates (the warm start fits "
                            "projection gates)")
        if self.teacher not in ("zeroed", "intact"):
            raise bad_value("teacher", self.teacher, "'zeroed' (query-neuron gates: the neuron zeroed in "
                            "the teacher too, as the released code) or 'intact' (the original model)")
        if self.compression_loss not in ("sequence", "batch"):
            raise bad_value("compression_loss", self.compression_loss, "'sequence' (hinged per sequence, "
                            "the released code's) or 'batch' (hinge of the batch mean)")
        if self.init_sequences < 1:
            raise bad_value("init_sequences", self.init_sequences, "a number of sequences >= 1")

    def dms(self) -> DMSConfig:
        return DMSConfig(window=self.window, sinks=self.sinks, gate=self.gate, granularity=self.granularity,
                         target_ratio=self.target_ratio)

    def lr_at(self, step: int) -> float:
        """Learning rate for step ``step`` (1-based): constant through the ramp; with ``cosine``, it
        then falls along a half cosine to 0 after the last step, so the last steps of a small-batch
        run move the gates ever less."""
        if self.lr_decay == "none" or step <= self.ramp_steps:
            return self.lr
        t = (step - self.ramp_steps) / (self.steps - self.ramp_steps + 1)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * t))

    def target_at(self, step: int) -> float:
        if self.ramp_steps == 0:
            return self.target_ratio
        return 1.0 + (self.target_ratio - 1.0) * min(1.0, step / self.ramp_steps)


def kl_student_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(student || teacher)."""
    ls = torch.log_softmax(student_logits.float(), -1)
    lt = torch.log_softmax(teacher_logits.float(), -1)
    return (ls.exp() * (ls - lt)).sum(-1).mean()


def compression_loss(evicted_fraction: torch.Tensor, target_ratio: float) -> torch.Tensor:
    """``max(0, a* - evicted fraction)``, averaged when the fraction is per sequence (``[batch]``)."""
    a_star = 1.0 - 1.0 / target_ratio
    return torch.clamp(a_star - evicted_fraction, min=0.0).mean()


def teacher_run(cfg: TrainConfig) -> DMSRun | None:
    """The teacher's DMS state: None (the original model: the gate hooks stay silent), or, for
    ``query_neuron`` gates with ``teacher="zeroed"``, a run that evicts nothing but takes the neuron
    out of the query before and after RoPE (the released code's teacher mode)."""
    if cfg.gate == "query_neuron" and cfg.teacher == "zeroed":
        return DMSRun(cfg.dms(), evict=False)
    return None


_CALIBRATION_IDS: dict[tuple, list[int]] = {}  # per tokenizer: tokenising the text takes seconds


def _calibration_ids(tokenizer) -> list[int]:
    from kvsqueeze.corpus import calibration_documents

    key = (tokenizer.name_or_path, len(tokenizer), tokenizer.eos_token_id)
    if key not in _CALIBRATION_IDS:
        ids: list[int] = []
        for doc in calibration_documents():
            ids += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        _CALIBRATION_IDS.clear()
        _CALIBRATION_IDS[key] = ids
    return _CALIBRATION_IDS[key]


def _batches(tokenizer, seq_len: int, batch: int, seed: int):
    ids = _calibration_ids(tokenizer)
    if len(ids) < seq_len * 4:
        raise KvsqueezeError(f"only {len(ids)} calibration tokens found; expected at least {seq_len * 4}")
    rng = random.Random(seed)
    while True:
        starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(batch)]
        yield torch.tensor([ids[s:s + seq_len] for s in starts])


def _trainable(model, gates: DMSGates, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(cfg.mode == "full")
    params = list(gates.parameters())
    if cfg.gate == "query_neuron" and cfg.mode == "adapter":
        idx = query_neuron_index(model)
        for layer in model.model.layers:
            w = layer.self_attn.q_proj.weight
            w.requires_grad_(True)
            mask = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
            mask[idx] = 1.0
            w.register_hook(lambda g, mask=mask: g * mask)  # only the repurposed rows learn
            params.append(w)
    elif cfg.mode == "full":
        params += [p for p in model.parameters()]
    return params


def train(model_path: Path, out_dir: Path, cfg: TrainConfig, progress: bool = True,
          device: str = "cpu") -> dict:
    """Train; ``device`` (not part of the configuration: a run resumes on any device) places the
    model, gates, data and Gumbel noise. A CUDA run draws other noise than a CPU run of the same seed."""
    threads_before = torch.get_num_threads()  # the caller's setting, given back at the end
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(model_path, out_dir, cfg, progress, device)
    finally:
        torch.set_num_threads(threads_before)


def _train(model_path: Path, out_dir: Path, cfg: TrainConfig, progress: bool, device: str) -> dict:
    from safetensors.torch import save_file

    from kvsqueeze.allocator import retain_freed_memory
    from kvsqueeze.model import load_hf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok, model = load_hf(model_path)
    model.to(device)
    dms_cfg = cfg.dms()
    gates = DMSGates.for_model(model, dms_cfg).to(device)
    install(model, gates)
    params = _trainable(model, gates, cfg)
    # weight_decay 0: rows masked to zero gradient must stay exactly as they were
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    step, history = 0, []
    ckpt = out_dir / "train_state.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        # fields added since a checkpoint was written take their defaults
        if {**asdict(TrainConfig()), **state["config"]} != asdict(cfg):
            raise KvsqueezeError(f"{ckpt} was written with another configuration; expected the same "
                                 f"flags to resume, or a new --out directory ({state['config']})")
        gates.load_state_dict(state["gates"])
        if cfg.mode == "full" or cfg.gate == "query_neuron":
            model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"].cpu())
        step, history = state["step"], state["history"]
        print(f"resuming from step {step} ({ckpt})")
    t0 = time.monotonic()  # the warm start counts in the run's time
    if cfg.init == "attention" and step == 0:
        from kvsqueeze.methods.dms.warmstart import warm_start

        # its own draw of calibration text (seed + 1): the training data order stays that of --init zeros
        say = (lambda m: print(m, flush=True)) if progress else (lambda m: None)
        warm = warm_start(model, gates, _batches(tok, cfg.seq_len, 1, cfg.seed + 1), cfg.init_sequences,
                          1 - 1 / cfg.target_ratio, log=say)
        (out_dir / "warm_start.json").write_text(json.dumps(
            {**warm, "seconds": time.monotonic() - t0}, indent=1) + "\n")
    data = _batches(tok, cfg.seq_len, cfg.batch, cfg.seed)
    for _ in range(step):  # the same data order as an uninterrupted run
        next(data)

    def save_state():
        state = {"config": asdict(cfg), "gates": gates.state_dict(), "opt": opt.state_dict(),
                 "gen": gen.get_state(), "step": step, "history": history}
        if cfg.mode == "full" or cfg.gate == "query_neuron":
            state["model"] = model.state_dict()
        torch.save(state, ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").replace(ckpt)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"DMS {cfg.target_ratio:g}x", dynamic_ncols=True)
    model.train()
    dev_type = torch.device(device).type

    def autocast():  # bf16 matrix products (CPUs with AVX512-BF16/AMX, GPUs); losses stay float32
        return torch.autocast(dev_type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16")

    # Soft eviction masks drive many activations to subnormal floats, which x86 CPUs process in
    # microcode: flushing them to zero halved the time per step here (7 s -> 3 s at 80% evicted).
    flushed_before = (torch.tensor([1e-39]) * torch.tensor([1.0])).item() == 0.0  # a caller's setting
    flush = dev_type == "cpu" and not flushed_before and torch.set_flush_denormal(True)
    # Freed tensors stay in the heap for reuse instead of going back to the kernel (glibc mmap):
    # half the step time at 1024 tokens on the 2-core machine (kvsqueeze/allocator.py).
    with retain_freed_memory(dev_type == "cpu"):
        try:
            while step < cfg.steps:
                ids = next(data).to(device)
                with torch.no_grad(), attention_state(AttentionState(dms=teacher_run(cfg))), autocast():
                    teacher = model(ids).logits
                run = DMSRun(dms_cfg, mode="train", generator=gen, forward=cfg.forward)
                with attention_state(AttentionState(dms=run)), autocast():
                    student = model(ids).logits
                target = cfg.target_at(step + 1)
                kl = kl_student_teacher(student, teacher)
                per_seq = run.evicted_fraction(per_sequence=cfg.compression_loss == "sequence")
                comp = compression_loss(per_seq, target)
                frac = per_seq.mean()
                loss = kl + comp
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lr = cfg.lr_at(step + 1)
                for group in opt.param_groups:
                    group["lr"] = lr
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                step += 1
                rec = {"step": step, "loss": loss.item(), "kl": kl.item(), "evicted": frac.item(),
                       "target_ratio": target, "target_evicted": 1 - 1 / target, "lr": lr}
                history.append(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", kl=f"{rec['kl']:.4f}",
                                    evicted=f"{rec['evicted']:.3f}", target=f"{rec['target_evicted']:.3f}")
                    bar.update(1)
                if step % cfg.save_every == 0 or step == cfg.steps:
                    save_state()
            if bar is not None:
                bar.close()
        finally:
            if flush:
                torch.set_flush_denormal(False)
    model.eval()
    seconds = time.monotonic() - t0
    save_file({k: v.detach().cpu().contiguous() for k, v in gates.state_dict().items()} or
              {"_empty": torch.zeros(0)}, str(out_dir / GATES_FILE))
    dms_cfg.save(out_dir)
    # The directory loads as a normal Hugging Face model (the trained weights in full mode, the
    # unchanged base in adapter mode) plus dms_config.json and dms_gates.safetensors.
    model.to("cpu").save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "base_model.txt").write_text(str(model_path) + "\n")
    last = history[-min(20, len(history)):]
    summary = {
        "config": asdict(cfg), "steps": step, "seconds_this_run": seconds,
        "final_loss": sum(h["loss"] for h in last) / len(last),
        "final_kl": sum(h["kl"] for h in last) / len(last),
        "final_evicted_fraction": sum(h["evicted"] for h in last) / len(last),
        "target_evicted_fraction": 1 - 1 / cfg.target_ratio,
        "torch_threads": torch.get_num_threads(),
    }
    if (out_dir / "warm_start.json").is_file():
        w = json.loads((out_dir / "warm_start.json").read_text())
        summary["warm_start"] = {k: w[k] for k in ("seconds", "label_evicted", "fitted_evicted", "agreement")}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "train_history.json").write_text(json.dumps(history) + "\n")
    if not math.isfinite(summary["final_loss"]):
        raise KvsqueezeError("training diverged (non-finite loss); try a lower --lr")
    return summary
