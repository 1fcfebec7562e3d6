"""The method interface, over every registered method on a tiny random Llama: each hook a method
declares runs and gives what its contract says (checked against independent references where one
exists: a dense-cache forward, a written-out greedy loop); a hook it does not support raises the one
clear error; the spelling METHOD[:SETTING[:VARIANT]] builds the same method as its options."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.methods import Unsupported, available, create, create_spec, parse_spec

P, C = 96, 12


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(layers=6, max_positions=512)


@pytest.fixture(scope="module")
def specs(tiny, tmp_path_factory):
    """A spec for every registered method, with what it needs for the tiny model: a KVTC calibration
    fitted on it, DMS gates (random, saved as a checkpoint) for it."""
    from safetensors.torch import save_file

    from kvsqueeze.forward import dense_prefill
    from kvsqueeze.methods.dms.config import DMSConfig
    from kvsqueeze.methods.dms.gates import DMSGates
    from kvsqueeze.methods.kvtc import calibrate as kvtc

    d = tmp_path_factory.mktemp("dms-ckpt")
    cfg = DMSConfig(window=8, sinks=2)
    gates = DMSGates.for_model(tiny, cfg)
    torch.manual_seed(1)
    for g in gates.layers:
        g.dms_proj_alpha.weight.data.normal_(0, 0.05)
    cfg.save(d)
    save_file({k: v.contiguous() for k, v in gates.state_dict().items()}, str(d / "dms_gates.safetensors"))
    inv, sc = kvtc.rope_params(tiny)
    c = tiny.config
    b = kvtc.CalibrationBuilder(c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads,
                                inv, sc)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        b.add(dense_prefill(tiny, torch.randint(0, 97, (P,), generator=gen))[0])
    cal = tmp_path_factory.mktemp("kvtc") / "cal.safetensors"
    b.build(kvtc.model_fingerprint(tiny)).save(cal)
    out = {"dense": ("dense", {}), "window": ("window:4", {}), "snapkv": ("snapkv:4", {}),
           "int8": ("int8", {}), "int4": ("int4", {}), "int2": ("int2", {}),
           "kvtc": ("kvtc:4", {"calibration": str(cal)}), "fusion": ("fusion:0.9:block", {}),
           "dms": (f"dms:{d}", {})}
    assert set(out) == set(available()), "a registered method has no contract case"
    return out


def _ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed))


def _method(specs, name):
    text, options = specs[name]
    return create_spec(text, sinks=4, recent=16, **options)


@pytest.mark.parametrize("name", ["dense", "window", "snapkv", "int8", "int4", "int2", "kvtc", "fusion", "dms"])
def test_every_declared_hook_runs_and_keeps_its_contract(tiny, specs, name):
    from kvsqueeze.forward import continue_with, dense_prefill, greedy_with

    m = _method(specs, name)
    assert m.name == name and m.summary
    m.prepare(tiny)
    ids = _ids(3, P + C)
    prefix, cont = ids[:P], ids[P:]
    seg = m.run_segment(tiny, prefix, cont)
    assert seg.logits.shape == (C, 97) and torch.isfinite(seg.logits).all()
    assert 0 < seg.held <= 1 and seg.ratio >= 1 - 1e-9
    assert all(isinstance(v, (int, float)) for v in seg.details.values())
    assert all(isinstance(v, (int, float)) for v in m.segment_details().values())
    toks, ratio = m.greedy(tiny, prefix, max_new=5)
    assert 1 <= len(toks) <= 5 and all(0 <= t < 97 for t in toks) and ratio >= 1 - 1e-9
    cache, last = dense_prefill(tiny, prefix, m.observation_window)
    if name == "dms":
        with pytest.raises(Unsupported, match="method 'dms' does not support compress"):
            m.compress(cache)
        return
    comp = m.compress(cache)
    # run_segment and greedy are the compressed cache read back: the same figures and tokens
    assert seg.ratio == pytest.approx(comp.ratio)
    assert seg.held == pytest.approx(comp.tokens_held() / (cache.n_layers * cache.kv_heads * P))
    torch.testing.assert_close(seg.logits, continue_with(tiny, comp, cont))
    assert toks == greedy_with(tiny, comp, last, 5)


def test_dense_hooks_equal_a_plain_forward_and_a_written_out_greedy_loop(tiny, specs):
    """The dense method through the hooks against the model itself: teacher-forced logits of the
    whole sequence, and greedy decoding by recomputing the full sequence each step (no cache)."""
    m = _method(specs, "dense")
    ids = _ids(4, P + C)
    with torch.no_grad():
        full = tiny(ids[None]).logits[0]
    seg = m.run_segment(tiny, ids[:P], ids[P:])
    torch.testing.assert_close(seg.logits, full[P:], atol=1e-4, rtol=1e-4)
    assert seg.ratio == 1.0 and seg.held == 1.0
    seq = ids[:P].tolist()
    want = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(tiny(torch.tensor([seq])).logits[0, -1].argmax())
            want.append(nxt)
            seq.append(nxt)
    assert m.greedy(tiny, ids[:P], max_new=6)[0] == want


def test_evicting_methods_hold_what_their_ratio_says(tiny, specs):
    for name in ("window", "snapkv"):
        seg = _method(specs, name).run_segment(tiny, _ids(5, P + C)[:P], _ids(5, P + C)[P:])
        assert seg.held == pytest.approx(round(P / 4) / P)
        assert seg.ratio == pytest.approx(P / round(P / 4))


def test_dms_run_segment_evicts_by_its_gates(tiny, specs):
    from kvsqueeze.forward import dense_prefill

    m = _method(specs, "dms")
    seg = m.run_segment(tiny, _ids(6, P + C)[:P], _ids(6, P + C)[P:])
    assert seg.held < 1 and seg.ratio == pytest.approx(1 / seg.held)
    assert seg.details == {"evict_scored": 0.0}
    # a dense prefill handed in changes nothing: DMS decides during its own prefill
    again = m.run_segment(tiny, _ids(6, P + C)[:P], _ids(6, P + C)[P:],
                          prefill=dense_prefill(tiny, _ids(6, P + C)[:P])[0])
    torch.testing.assert_close(again.logits, seg.logits)


@pytest.mark.parametrize("text,check", [
    ("window:4", lambda m: m.name == "window" and m.ratio == 4.0),
    ("snapkv:8", lambda m: m.name == "snapkv" and m.ratio == 8.0),
    ("fusion:0.7:token", lambda m: (m.threshold, m.similarity) == (0.7, "token")),
    ("fusion:0.8", lambda m: (m.threshold, m.similarity) == (0.8, "token")),
    ("dms:4", lambda m: m.checkpoint.name == "smollm2-135m-4x" and m.ratio == 4.0),
    ("dms:8", lambda m: m.checkpoint.name == "smollm2-135m-8x"),
    ("int4", lambda m: m.ratio == 4.0),
    ("none", lambda m: m.name == "dense"),
])
def test_the_spelling_builds_the_method_its_options_do(text, check):
    assert check(create_spec(text))


def test_spelling_errors_name_the_spec():
    for text, msg in (("window:x", "window:RATIO with RATIO a number"), ("int2:2", "int2 without a setting"),
                      ("window:4:fast", "window without a variant"), ("fusion:0.9:cos", "a variant of fusion"),
                      ("a:b:c:d", "at most two ':'"), ("", "METHOD[:SETTING[:VARIANT]]"),
                      ("dms:4:x", "dms:RATIO or dms:CHECKPOINT_DIR"), ("nope", "expected one of")):
        with pytest.raises(KvsqueezeError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            create_spec(text)
    assert parse_spec("dms:/a/b").setting == "/a/b" and parse_spec("fusion:0.9:token").label == "fusion:0.9:token"


def test_eval_spelling_and_ratio_lists_build_the_same_methods():
    from kvsqueeze.evaluate import build_methods

    a = build_methods(["window", "snapkv", "int4"], [2.0, 4.0])
    b = build_methods(["window:2", "window:4", "snapkv:2", "snapkv:4", "int4"], [None])
    assert [m.describe() for m in a] == [m.describe() for m in b]
    assert [m.describe() for m in a] == ["window@2x", "window@4x", "snapkv@2x", "snapkv@4x", "int4@4x"]
