"""The serving specs: what each method's server is started with, what composes, what is refused (no
server starts here; the real servers are in the test_sglang_* files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.backends.sglang.serving import ServeContext, parse_server, plan_server
from kvsqueeze.errors import KvsqueezeError

SHIPPED = Path(__file__).resolve().parents[1] / "kvsqueeze" / "data" / "dms"


@pytest.fixture
def ctx(tmp_path):
    cal = tmp_path / "cal.safetensors"
    cal.write_bytes(b"not read by a plan")
    return ServeContext(model=tmp_path, calibration=str(cal), stats_file=str(tmp_path / "stats.json"))


def _value(args, flag):
    return args[args.index(flag) + 1]


def test_labels_fill_in_the_default_settings():
    assert [parse_server(t).label for t in ("none", "dense", "dms", "dms:8", "kvtc", "fusion", "fusion:0.8",
                                            "fusion:0.8:block", "kvtc:16+fusion")] == [
        "none", "none", "dms:4", "dms:8", "kvtc:8", "fusion:0.9:token", "fusion:0.8:token", "fusion:0.8:block",
        "kvtc:16+fusion:0.9:token"]


def test_each_method_gets_its_flags_and_environment(ctx):
    none = plan_server(parse_server("none"), ctx)
    assert none.args == ["--enable-metrics"] and none.env == {}
    fus = plan_server(parse_server("fusion:0.8:block"), ctx)
    assert _value(fus.args, "--page-size") == "16"
    assert json.loads(fus.env["KVSQUEEZE_FUSION"]) == {"threshold": 0.8, "similarity": "block", "layers": None,
                                                       "max_candidates": 64}
    dms = plan_server(parse_server("dms:8"), ctx)
    assert dms.env["KVSQUEEZE_DMS"] == str(SHIPPED / "smollm2-135m-8x")
    assert _value(dms.args, "--attention-backend") == "dms" and "--disable-radix-cache" not in dms.args
    assert _value(dms.args, "--radix-cache-backend") == "kvsqueeze-dms"  # radix cache and chunked prefill on
    assert "--chunked-prefill-size" not in dms.args and "--page-size" not in dms.args
    kv = plan_server(parse_server("kvtc:16"), ctx)
    assert _value(kv.args, "--page-size") == "64" and "--enable-hierarchical-cache" in kv.args
    extra = json.loads(_value(kv.args, "--hicache-storage-backend-extra-config"))
    assert (extra["kvtc_ratio"], extra["kvtc_calibration"], extra["kvtc_stats_file"]) == (
        16.0, ctx.calibration, ctx.stats_file)
    assert kv.args.count("--page-size") == 1


def test_composed_methods_share_one_page_size_and_both_switches(ctx):
    plan = plan_server(parse_server("kvtc:8+fusion:0.9:token"), ctx)
    assert plan.args.count("--page-size") == 1 and _value(plan.args, "--page-size") == "64"
    assert "KVSQUEEZE_FUSION" in plan.env and "--enable-hierarchical-cache" in plan.args


def test_the_users_flags_win_and_are_checked(ctx):
    plan = plan_server(parse_server("fusion"), ctx, ["--page-size", "32", "--enable-metrics"])
    assert "--page-size" not in plan.args and "--enable-metrics" not in plan.args  # given by the user
    dms = plan_server(parse_server("dms"), ctx, ["--mem-fraction-static", "0.5", "--disable-radix-cache"])
    assert "--mem-fraction-static" not in dms.args and "--disable-radix-cache" not in dms.args
    for spec, args, msg in (("fusion", ["--page-size", "1"], "page-size='1'"),
                            ("kvtc", ["--page-size", "8"], "at least 16 tokens"),
                            ("kvtc", ["--disable-radix-cache"], "keeps radix-cache pages"),
                            ("dms", ["--attention-backend", "torch_native"], "expected dms"),
                            ("dms", ["--page-size", "16"], "expected 1 with DMS"),
                            ("dms", ["--enable-hierarchical-cache"], "not given with dms")):
        with pytest.raises(KvsqueezeError, match=msg):
            plan_server(parse_server(spec), ctx, args)


def test_combinations_that_cannot_work_are_refused_with_the_reason():
    for text, msg in (("dms+kvtc", "dms and kvtc cannot run in one server: the KVTC tier stores"),
                      ("fusion+dms:8", "dms and fusion cannot run in one server: fusion shares whole pages"),
                      ("none+fusion", "none alone"), ("fusion+fusion:0.8", "each method once per server"),
                      ("snapkv:4", "kvsqueeze eval` only"), ("kvtc:8+window:4", "kvsqueeze eval` only")):
        with pytest.raises(KvsqueezeError, match=msg.replace("(", r"\(")):
            parse_server(text)


def test_a_missing_calibration_is_refused_before_anything_loads(tmp_path):
    ctx = ServeContext(model=tmp_path, calibration=str(tmp_path / "none.safetensors"))
    with pytest.raises(KvsqueezeError, match="calibration=.*expected an existing KVTC calibration file"):
        plan_server(parse_server("kvtc:8+fusion"), ctx)


def test_dms_refuses_a_model_it_is_not_wired_into_before_it_starts(tmp_path, ctx):
    """A model architecture the gates are not wired into: one clear error naming the value, before
    SGLang starts (instead of a server whose first forward finds no gate)."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    with pytest.raises(KvsqueezeError, match="architecture='MistralForCausalLM': expected one of "
                                             "LlamaForCausalLM, Qwen3ForCausalLM"):
        plan_server(parse_server("dms:4"), ctx)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    assert "--attention-backend" in plan_server(parse_server("dms:4"), ctx).args


def test_dms_decode_graphs_stay_off_unless_their_sizes_are_given(ctx):
    """DMS turns SGLang's decode graphs off by default; giving their batch sizes (or, on a CPU,
    ``--enable-torch-compile``) keeps them on, and the plan says so."""
    plain = plan_server(parse_server("dms:4"), ctx)
    assert "--disable-cuda-graph" in plain.args and "--disable-overlap-schedule" in plain.args
    for given in (["--cuda-graph-bs-decode", "1", "2", "4"], ["--enable-torch-compile"],
                  ["--cuda-graph-max-bs-decode=8"]):
        plan = plan_server(parse_server("dms:4"), ctx, given)
        assert "--disable-cuda-graph" not in plan.args, given
        assert "--disable-overlap-schedule" in plan.args
        assert any("decode graphs captured" in n for n in plan.notes), plan.notes
