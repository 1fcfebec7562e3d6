"""The one way kvsqueeze extends SGLang: the patch helper records, chains, applies once and refuses an
SGLang it was not written for; DMS's and fusion's output-streamer patches both survive in one process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kvsqueeze  # noqa: F401  (its torchvision shim precedes the first SGLang import)
from kvsqueeze.errors import KvsqueezeError

pytest.importorskip("sglang")

from kvsqueeze.backends.sglang import patch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_patches_chain_in_order_apply_once_and_are_recorded():
    calls = []

    class Engine:
        def step(self, x):
            calls.append(("sglang", x))
            return [x]

    def wrap(tag):
        def make(orig):
            def step(self, x):
                calls.append((tag, x))
                return orig(self, x) + [tag]
            return step
        return make

    patch.patch(Engine, "step", "test.a", wrap("a"))
    patch.patch(Engine, "step", "test.b", wrap("b"))
    patch.patch(Engine, "step", "test.a", wrap("a"))  # applied once: nothing changes
    assert Engine().step(1) == [1, "a", "b"]
    assert calls == [("b", 1), ("a", 1), ("sglang", 1)]
    assert patch.is_applied(Engine, "step", "test.a") and patch.is_applied(Engine, "step", "test.b")
    first = patch.original(patch.original(Engine.step))
    assert first.__qualname__.endswith("Engine.step") and patch.original(first) is None
    recs = [r for r in patch.applied() if r.owner.endswith("Engine")]
    assert [(r.name, r.key, r.chains) for r in recs] == [("step", "test.a", True), ("step", "test.b", True)]


def test_a_patch_of_one_object_and_a_static_method():
    class Pool:
        def size(self):
            return 10

        @staticmethod
        def unit():
            return 1

    pool, other = Pool(), Pool()
    patch.patch(pool, "size", "test.pool", lambda orig: lambda: min(orig(), 4))
    patch.patch(Pool, "unit", "test.unit", lambda orig: lambda: orig() * 2)
    assert (pool.size(), other.size()) == (4, 10)  # only that object
    assert Pool.unit() == 2 and pool.unit() == 2


def test_refusals_name_the_symbol_the_version_and_the_reason():
    class Engine:
        pass

    with pytest.raises(KvsqueezeError, match=r"Engine\.missing not found; kvsqueeze's test\.x patch was "
                                             r"written for SGLang 0\.5\.23"):
        patch.patch(Engine, "missing", "test.x", lambda orig: orig)
    with pytest.raises(ValueError, match="must say why"):
        patch.patch(Engine, "__init__", "test.y", lambda orig: orig, chains=False)


def test_another_sglang_version_is_refused_unless_asked_for(monkeypatch):
    monkeypatch.setattr(patch, "_checked", [])
    monkeypatch.setattr(patch, "sglang_version", lambda: "0.6.0")
    monkeypatch.delenv(patch.ANY_VERSION_ENV, raising=False)

    class Engine:
        def step(self):
            return 1

    with pytest.raises(KvsqueezeError, match=r"SGLang 0\.6\.0: kvsqueeze's SGLang integration was written "
                                             r"for SGLang 0\.5\.23; expected that version"):
        patch.patch(Engine, "step", "test.v", lambda orig: orig)
    monkeypatch.setenv(patch.ANY_VERSION_ENV, "1")
    patch.patch(Engine, "step", "test.v", lambda orig: lambda self: orig(self) + 1)
    assert Engine().step() == 2


def test_dms_and_fusion_both_add_their_meta_info_in_one_process(tmp_path):
    """Both methods patch SGLang's output streamer (and its prefill scheduling); with both installed,
    each request's customized info carries both methods' entries (before the helper, the second
    installed replaced the first)."""
    code = textwrap.dedent(f"""
        import os, sys, json
        from types import SimpleNamespace
        os.environ["KVSQUEEZE_FUSION"] = '{{"threshold": 0.9}}'
        os.environ["KVSQUEEZE_DMS"] = {str(ROOT / "kvsqueeze/data/dms/smollm2-135m-4x")!r}
        from kvsqueeze.backends.sglang import cpu_shims, dms, fusion, patch
        cpu_shims.apply_all()
        fusion.install(); dms.install()
        fusion.install(); dms.install()  # once per process
        from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer as S
        from sglang.srt.managers.scheduler import Scheduler
        assert S.has_additional_customized_info
        class FusionState:
            per_request = {{"r1": [4, 1]}}
            def stats(self): return {{}}
        st = dms._State(64, 2, 1, 4, 4, __import__("torch").float32, "cpu", rows=2, window=2, sinks=0,
                        num_tokens=65)
        st.per_request["r1"] = {{"peak": 6, "reads": 30, "steps": 3, "dense_reads": 40, "held": 5, "seen": 8,
                                 "slots_per_token": 2, "shared": 0}}
        alloc = SimpleNamespace(_kvsqueeze_dms=st)
        alloc.__dict__["_kvsqueeze_fusion"] = FusionState()
        me = SimpleNamespace(tree_cache=SimpleNamespace(token_to_kv_pool_allocator=alloc))
        reqs = [SimpleNamespace(rid="r1", finished=lambda: True), SimpleNamespace(rid="r2", finished=lambda: False)]
        out = S.build_additional_customized_info(me, reqs)
        print(json.dumps({{k: v for k, v in out.items()}}))
        keys = [(r.key, r.name) for r in patch.applied()]
        print(json.dumps([k for k in keys if k[1] in ("build_additional_customized_info", "get_new_batch_prefill")]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    lines = out.stdout.strip().splitlines()
    info = json.loads(lines[-2])
    assert info["kvsqueeze_fusion"] == [[{"pages": 4, "fused_pages": 1, "fused_fraction": 0.25}], []]
    dms_meta = info["kvsqueeze_dms"][0][0]
    assert dms_meta["kv_token_reads"] == 30 and dms_meta["kv_tokens_held_peak"] == 6
    assert info["kvsqueeze_dms"][1] == []
    assert json.loads(lines[-1]) == [["fusion", "get_new_batch_prefill"], ["fusion", "build_additional_customized_info"],
                                     ["dms", "get_new_batch_prefill"], ["dms", "build_additional_customized_info"]]
