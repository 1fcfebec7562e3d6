"""`kvsqueeze dms train` end to end (a few short steps, on a small random model with the embedded
model's tokenizer: the mechanics do not depend on the weights): the output directory,
resumption after an interruption (bit-for-bit the uninterrupted run), bf16 autocast, the cosine
learning-rate decay and flushing subnormals."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.methods.dms import train as dms_train
from kvsqueeze.methods.dms.train import TrainConfig, train

CFG = dict(target_ratio=4, steps=4, ramp_steps=2, seq_len=48, window=8, lr=1e-3, save_every=2, threads=1)


def _gates(d):
    return load_file(str(d / "dms_gates.safetensors"))


def test_train_writes_a_loadable_checkpoint_and_resumes_exactly(small_model, tmp_path, monkeypatch):
    path = small_model
    cfg = TrainConfig(**CFG)
    full = tmp_path / "full"
    before = torch.get_num_threads()
    summary = train(path, full, cfg, progress=False)
    assert summary["steps"] == 4 and all(k in summary for k in ("final_loss", "final_evicted_fraction"))
    # trained on the configured 1 thread, and the caller's thread count given back afterwards (it
    # once stayed at 1 for the rest of the process: every later torch computation on one core)
    assert summary["torch_threads"] == 1 and torch.get_num_threads() == before
    for f in ("config.json", "model.safetensors", "dms_config.json", "dms_gates.safetensors",
              "train_state.pt", "train_summary.json", "train_history.json"):
        assert (full / f).is_file(), f
    hist = json.loads((full / "train_history.json").read_text())
    assert [h["target_ratio"] for h in hist] == [2.5, 4.0, 4.0, 4.0]  # linear ramp, then held
    assert any(v.abs().sum() > 0 for v in _gates(full).values())  # the gates learned something

    calls = {"n": 0}
    real = dms_train.kl_student_teacher

    def interrupted(*a):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3: the state saved after step 2 is what survives
            raise KeyboardInterrupt
        return real(*a)

    part = tmp_path / "part"
    monkeypatch.setattr(dms_train, "kl_student_teacher", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(path, part, cfg, progress=False)
    monkeypatch.setattr(dms_train, "kl_student_teacher", real)
    assert torch.load(part / "train_state.pt", weights_only=False)["step"] == 2
    train(path, part, cfg, progress=False)
    a, b = _gates(full), _gates(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((part / "train_history.json").read_text()) == hist

    with pytest.raises(KvsqueezeError, match="another configuration"):
        train(path, part, TrainConfig(**{**CFG, "lr": 2e-3}), progress=False)
    # a state written before a field existed (here: precision) resumes under that field's default
    state = torch.load(part / "train_state.pt", weights_only=False)
    del state["config"]["precision"]
    torch.save(state, part / "train_state.pt")
    assert train(path, part, cfg, progress=False)["steps"] == 4


def test_train_under_bf16_autocast(small_model, tmp_path):
    path = small_model
    summary = train(path, tmp_path / "bf16", TrainConfig(**{**CFG, "precision": "bfloat16"}), progress=False)
    hist = json.loads((tmp_path / "bf16" / "train_history.json").read_text())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert summary["config"]["precision"] == "bfloat16"
    assert any(v.abs().sum() > 0 for v in _gates(tmp_path / "bf16").values())
    assert all(v.dtype == torch.float32 for v in _gates(tmp_path / "bf16").values())
    with pytest.raises(KvsqueezeError, match="precision='fp8'"):
        TrainConfig(precision="fp8")


def _mmapped_bytes() -> int:
    """glibc's count of bytes held in mmap'd blocks (mallinfo2().hblkhd)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                   "usmblks", "fsmblks", "uordblks", "fordblks",
                                                   "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2().hblkhd


def _big_tensor_mmapped(size: int = 64 << 20) -> bool:
    """Whether a fresh tensor of ``size`` bytes (above glibc's largest mmap threshold, 32 MiB) got
    its own mmap. Pages are never touched. With mmap allowed, glibc still serves a request from a
    free heap chunk large enough (after training the heap holds some), so checks that mmap is
    back ask for 1 GiB, more than any step here frees."""
    before = _mmapped_bytes()
    t = torch.empty(size, dtype=torch.uint8)
    grew = _mmapped_bytes() - before >= size
    del t
    return grew


GIB = 1 << 30


def _skip_unless_glibc():
    from kvsqueeze import allocator

    if allocator._glibc() is None:
        pytest.skip("glibc's mallopt is not available on this platform")
    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc older than 2.33 (no mallinfo2)")


def test_retain_freed_memory_keeps_big_tensors_off_mmap_then_restores():
    """In a fresh interpreter: whether a big tensor gets its own mmap depends on the free chunks the
    heap already holds, and earlier tests in this process leave some."""
    import inspect
    import subprocess
    import sys
    import textwrap

    _skip_unless_glibc()
    code = "\n".join([inspect.getsource(_mmapped_bytes), inspect.getsource(_big_tensor_mmapped), textwrap.dedent("""
        import torch
        from kvsqueeze.allocator import retain_freed_memory
        GIB = 1 << 30
        assert _big_tensor_mmapped(GIB)  # glibc's default: a fresh mmap per big tensor
        with retain_freed_memory() as applied:
            assert applied
            assert not _big_tensor_mmapped()
            assert not _big_tensor_mmapped(GIB)
        assert _big_tensor_mmapped(GIB)  # mmap back after the block
        with retain_freed_memory(enabled=False) as applied:
            assert not applied and _big_tensor_mmapped(GIB)
        print("ok")
    """)])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _seen_in_training_loop(probe, path, out, monkeypatch) -> list:
    """What ``probe()`` returns inside the loop of a one-step training run (once per step)."""
    seen = []
    real = dms_train.kl_student_teacher

    def spy(*a):
        seen.append(probe())
        return real(*a)

    monkeypatch.setattr(dms_train, "kl_student_teacher", spy)
    train(path, out, TrainConfig(**{**CFG, "steps": 1, "ramp_steps": 1}), progress=False)
    monkeypatch.setattr(dms_train, "kl_student_teacher", real)
    return seen


def test_training_loop_keeps_freed_memory_on_cpu(small_model, tmp_path, monkeypatch):
    _skip_unless_glibc()
    seen = _seen_in_training_loop(_big_tensor_mmapped, small_model, tmp_path / "one", monkeypatch)
    assert seen == [False]  # inside the loop big tensors come from the heap
    assert _big_tensor_mmapped(GIB)  # and glibc's mmap is back afterwards


def test_cosine_lr_decay_schedule_and_its_use(small_model, tmp_path, monkeypatch):
    cfg = TrainConfig(**{**CFG, "steps": 6, "ramp_steps": 2, "lr_decay": "cosine"})
    # closed form: constant through the ramp, then lr * (1 + cos(pi * (s - ramp) / (steps - ramp + 1))) / 2
    assert [cfg.lr_at(s) for s in (1, 2)] == [1e-3, 1e-3]
    for s in range(3, 7):
        assert cfg.lr_at(s) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 5)))
    assert cfg.lr_at(6) > 0 and all(cfg.lr_at(s) > cfg.lr_at(s + 1) for s in range(2, 6))
    assert TrainConfig(**CFG).lr_at(4) == 1e-3  # default: constant
    with pytest.raises(KvsqueezeError, match="lr_decay='linear'"):
        TrainConfig(lr_decay="linear")

    # the optimiser really uses the schedule: with the rate forced to 0 after step 2, four steps leave
    # the gates exactly where a two-step run (same data, same ramp) leaves them
    path = small_model
    two = tmp_path / "two"
    train(path, two, TrainConfig(**{**CFG, "steps": 2, "ramp_steps": 2}), progress=False)
    monkeypatch.setattr(TrainConfig, "lr_at", lambda self, s: self.lr if s <= 2 else 0.0)
    four = tmp_path / "four"
    train(path, four, TrainConfig(**{**CFG, "steps": 4, "ramp_steps": 2, "lr_decay": "cosine"}), progress=False)
    a, b = _gates(two), _gates(four)
    assert all(torch.equal(a[k], b[k]) for k in a)
    hist = json.loads((four / "train_history.json").read_text())
    assert [h["lr"] for h in hist] == [1e-3, 1e-3, 0.0, 0.0]


def test_subnormals_flushed_during_cpu_training_only(small_model, tmp_path, monkeypatch):
    def subnormal_survives():
        return bool((torch.tensor([1e-39]) * torch.tensor([1.0])).item() != 0.0)

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")
    path = small_model
    seen = _seen_in_training_loop(subnormal_survives, path, tmp_path / "one", monkeypatch)
    assert seen == [False]  # flushed inside the loop (the x86 slow path for soft masks)
    assert subnormal_survives()  # and restored afterwards
    torch.set_flush_denormal(True)  # a caller's own setting is left as it was
    try:
        train(path, tmp_path / "two", TrainConfig(**{**CFG, "steps": 1, "ramp_steps": 1}), progress=False)
        assert not subnormal_survives()
    finally:
        torch.set_flush_denormal(False)
