"""`kvsqueeze dms train` end to end on the embedded model (a few short steps): the output directory,
resumption after an interruption (bit-for-bit the uninterrupted run) and bf16 autocast."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.methods import dms_train
from kvsqueeze.methods.dms_train import TrainConfig, train

CFG = dict(target_ratio=4, steps=4, ramp_steps=2, seq_len=48, window=8, lr=1e-3, save_every=2, threads=1)


def _gates(d):
    return load_file(str(d / "dms_gates.safetensors"))


def test_train_writes_a_loadable_checkpoint_and_resumes_exactly(embedded, tmp_path, monkeypatch):
    path, _, _ = embedded
    cfg = TrainConfig(**CFG)
    full = tmp_path / "full"
    summary = train(path, full, cfg, progress=False)
    assert summary["steps"] == 4 and all(k in summary for k in ("final_loss", "final_evicted_fraction"))
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


def test_train_under_bf16_autocast(embedded, tmp_path):
    path, _, _ = embedded
    summary = train(path, tmp_path / "bf16", TrainConfig(**{**CFG, "precision": "bfloat16"}), progress=False)
    hist = json.loads((tmp_path / "bf16" / "train_history.json").read_text())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert summary["config"]["precision"] == "bfloat16"
    assert any(v.abs().sum() > 0 for v in _gates(tmp_path / "bf16").values())
    assert all(v.dtype == torch.float32 for v in _gates(tmp_path / "bf16").values())
    with pytest.raises(KvsqueezeError, match="precision='fp8'"):
        TrainConfig(precision="fp8")
