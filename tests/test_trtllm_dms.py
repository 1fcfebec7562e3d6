"""DMS for TensorRT-LLM: the engine-agnostic flags, masks and attention against kvsqueeze's DMS reference
(DMSRun, the mask the Hugging Face path is tested with), the checkpoint export, and the engine
classes' clear refusal where TensorRT-LLM is absent."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from kvsqueeze.backends.trtllm import dms as tdms
from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.methods.dms.checkpoint import load_released_tensors, split_released
from kvsqueeze.methods.dms.config import DMSConfig
from kvsqueeze.methods.dms.gates import DMSGates
from kvsqueeze.methods.dms.run import HARD_MASK, DMSRun, held_after

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


def _reference_keep(cfg, logits, n_kv):
    """Whole-sequence keep mask ``[n_kv, T, T]`` from DMSRun (eviction) and causality."""
    run = DMSRun(cfg)
    run.add_logits(0, logits[None])
    t = logits.shape[0]
    evict = run.additive_mask(0, t, t, n_kv)[0] == HARD_MASK
    causal = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
    return causal[None] & ~evict, run


@pytest.mark.parametrize("granularity", ["head", "layer"])
def test_flags_fed_in_chunks_give_the_reference_mask_for_every_query(granularity):
    """Prefill, a multi-token extend and single-token decode steps: each query's keys are the ones the
    whole-sequence DMS reference keeps (shift by one, sinks, delayed eviction through the window)."""
    cfg = DMSConfig(window=3, sinks=2, granularity=granularity)
    g = torch.Generator().manual_seed(0)
    n_kv, t = 2, 26
    logits = torch.randn(t, n_kv if granularity == "head" else 1, generator=g) * 3
    ref, run = _reference_keep(cfg, logits, n_kv)
    assert 0 < int((~ref & torch.tril(torch.ones(t, t, dtype=torch.bool))).sum())  # something is evicted
    flags = tdms.EvictionFlags(cfg, n_kv)
    chunks = [(0, 9), (9, 4)] + [(s, 1) for s in range(13, t)]
    for start, n in chunks:
        flags.update(7, 0, start, logits[start:start + n])
        got = tdms.keep_mask(flags.flags(7, 0), start, n, cfg.window)
        assert torch.equal(got, ref[:, start:start + n, :start + n]), (start, n)
    assert torch.equal(flags.held(7, 0, t - 1), held_after(run, t, n_kv)[0])


def test_dms_attention_over_chunks_equals_one_pass_with_the_reference_mask():
    """Decode after prefill (GQA, 4 query heads on 2 KV heads) equals a single teacher-forced pass of
    softmax attention through the same eviction pattern."""
    cfg = DMSConfig(window=4, sinks=1)
    g = torch.Generator().manual_seed(1)
    t, heads, n_kv, d = 20, 4, 2, 8
    q = torch.randn(t, heads, d, generator=g)
    k = torch.randn(t, n_kv, d, generator=g)
    v = torch.randn(t, n_kv, d, generator=g)
    logits = torch.randn(t, n_kv, generator=g) * 3
    ref_keep, _ = _reference_keep(cfg, logits, n_kv)
    # the reference pass, written out: softmax over the kept keys of each query's KV head
    want = torch.empty(heads, t, d)
    for h in range(heads):
        kv = h // (heads // n_kv)
        s = (q[:, h] @ k[:, kv].T) / d ** 0.5
        s = s.masked_fill(~ref_keep[kv], float("-inf"))
        want[h] = s.softmax(-1) @ v[:, kv]
    flags = tdms.EvictionFlags(cfg, n_kv)
    for start, n in [(0, 11)] + [(s, 1) for s in range(11, t)]:
        flags.update(0, 3, start, logits[start:start + n])
        keep = tdms.keep_mask(flags.flags(0, 3), start, n, cfg.window)
        got = tdms.dms_attention(q[start:start + n], k[:start + n], v[:start + n], keep)
        torch.testing.assert_close(got, want[:, start:start + n], atol=1e-5, rtol=1e-5)


def test_a_slot_taken_by_a_new_sequence_forgets_the_old_one_and_gaps_are_refused():
    cfg = DMSConfig(window=1, sinks=0)
    flags = tdms.EvictionFlags(cfg, 1)
    flags.update(0, 0, 0, torch.full((8, 1), 5.0))  # every token marked
    assert int(flags.flags(0, 0).sum()) == 7  # the newest is undecided
    flags.update(0, 0, 0, torch.full((3, 1), -5.0))  # a new request in the same slot
    assert flags.flags(0, 0).shape[0] == 3 and not bool(flags.flags(0, 0).any())
    with pytest.raises(KvsqueezeError, match="tokens from 5 given, but 3 were recorded"):
        flags.update(0, 0, 5, torch.zeros(1, 1))
    with pytest.raises(KvsqueezeError, match="logits"):
        flags.update(0, 0, 3, torch.zeros(1, 2))
    flags.release(0)
    with pytest.raises(KeyError):
        flags.flags(0, 0)


def test_gate_logits_read_the_layer_input_as_the_hf_reference_does():
    """The logits the TensorRT-LLM layers hand their attention equal what kvsqueeze's HF DMS hooks
    record, given the layer input (the residual stream before the input norm)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvsqueeze.attention import AttentionState, attention_state
    from kvsqueeze.methods.dms.gates import install

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    gates = DMSGates.for_model(model, DMSConfig(window=2, sinks=1))
    for layer in gates.layers:
        torch.nn.init.normal_(layer.dms_proj_alpha.weight, std=0.05)
    install(model, gates)
    inputs = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: inputs.__setitem__(i, kw.get("hidden_states", a[0] if a else None)),
            with_kwargs=True)
    ids = torch.randint(0, 64, (1, 12))
    run = DMSRun(gates.config)
    with torch.no_grad(), attention_state(AttentionState(dms=run)):
        model(ids)
    for i in range(2):
        got = tdms.gate_logits(gates, i, inputs[i][0])
        torch.testing.assert_close(got, run.logits[i][0].T, atol=1e-5, rtol=1e-5)


def _tiny_query_neuron_model(arch: str):
    """A 2-layer random Llama or Qwen3 (4 query, 2 KV heads of 16 dims; Qwen3 with its q/k norms) on
    kvsqueeze's attention, the reference the HF DMS path is tested with."""
    from kvsqueeze.attention import ATTN_IMPL, register

    register()
    torch.manual_seed(3)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    if arch == "qwen3":
        from transformers import Qwen3Config as Config, Qwen3ForCausalLM as Model
    else:
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model
    cfg = Config(**common)
    cfg._attn_implementation = ATTN_IMPL
    return Model(cfg).eval()


class _TrtllmStyleRope:
    """The HF model's own RoPE behind TensorRT-LLM's ``RotaryEmbedding`` call convention:
    ``rope(position_ids, [q, k]) -> [q, k]`` with ``q [tokens, heads * head_dim]``."""

    def __init__(self, model):
        self.model, c = model, model.config
        self.heads, self.kv_heads, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def __call__(self, position_ids, targets):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q, k = targets
        t = q.shape[0]
        cos, sin = self.model.model.rotary_emb(q, position_ids)
        qr, kr = apply_rotary_pos_emb(q.view(t, self.heads, self.d).transpose(0, 1)[None],
                                      k.view(t, self.kv_heads, self.d).transpose(0, 1)[None], cos, sin)
        return [qr[0].transpose(0, 1).reshape(t, -1), kr[0].transpose(0, 1).reshape(t, -1)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_query_neuron_gates_in_trtllm_rope_equal_the_reference(arch, monkeypatch):
    """TensorRT-LLM's query-neuron path (:class:`QueryNeuronRotary` around a RoPE with the engine's call
    convention, fed the query after the q-norm as the engine's attention module computes it) hands its
    attention backend the gate logits the HF reference (``DMSRun``) records, and its post-RoPE query is
    the one the reference attention scores: the neurons zero after RoPE too, every other value equal."""
    import kvsqueeze.attention as attention
    from kvsqueeze.attention import AttentionState, attention_state
    from kvsqueeze.methods.dms.gates import install, query_neuron_index

    model = _tiny_query_neuron_model(arch)
    cfg = DMSConfig(window=4, sinks=1, gate="query_neuron")
    pre_rope = {}  # the query as the engine's module has it before RoPE (after q_norm for Qwen3)
    for i, layer in enumerate(model.model.layers):
        target = getattr(layer.self_attn, "q_norm", None) or layer.self_attn.q_proj
        target.register_forward_hook(lambda m, a, out, i=i: pre_rope.__setitem__(i, out.detach().clone()))
    install(model, DMSGates.for_model(model, cfg))  # after ours: our hooks see the query unmodified
    scored, original = [], attention.grouped_scores
    monkeypatch.setattr(attention, "grouped_scores",
                        lambda q, k, s: scored.append(q.detach().clone()) or original(q, k, s))
    ids = torch.randint(0, 97, (1, 21), generator=torch.Generator().manual_seed(1))
    run = DMSRun(cfg)
    with torch.no_grad(), attention_state(AttentionState(dms=run)):
        model(ids)
    idx = query_neuron_index(model)
    rope = _TrtllmStyleRope(model)
    positions = torch.arange(21)[None]
    for i in range(2):
        q = pre_rope[i].reshape(21, -1)  # [tokens, heads * head_dim]
        k = torch.randn(21, 2 * 16)
        backend = type("Backend", (), {"dms_logits": None})()
        with torch.no_grad():
            q_out, k_out = tdms.QueryNeuronRotary(rope, idx, cfg, 2, backend)(positions, [q, k])
            unzeroed = rope(positions, [q.index_fill(1, idx, 0.0), k])[0]
        torch.testing.assert_close(backend.dms_logits, run.logits[i][0].T, atol=1e-5, rtol=1e-5)
        assert unzeroed[:, idx].abs().max() > 1e-3  # RoPE rotates part of the pair back into the neuron
        assert torch.equal(q_out[:, idx], torch.zeros(21, 2))  # ... and it is zeroed again
        torch.testing.assert_close(q_out, scored[i][0].transpose(0, 1).reshape(21, -1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k_out, rope(positions, [q, k])[1])  # keys untouched by the gate


def _tiny_model_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_export_writes_a_checkpoint_the_trtllm_model_loads(tmp_path):
    """Config names the registered architecture and carries the DMS config; the gate tensors (released
    names) come back out of the merged weights into fresh gates exactly; the model's weights pass on."""
    from safetensors.torch import load_file

    base = _tiny_model_dir(tmp_path)
    cfg = DMSConfig(window=16, sinks=4, target_ratio=4.0)
    gates = DMSGates(cfg, 32, 2, 2)
    for layer in gates.layers:
        torch.nn.init.normal_(layer.dms_proj_alpha.weight)
        torch.nn.init.normal_(layer.dms_proj_alpha_norm.weight)
    out = tdms.export_checkpoint(base, gates, tmp_path / "trt")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [tdms.ARCHITECTURE]
    assert DMSConfig(**config[tdms.CONFIG_KEY]) == cfg
    weights = {}
    for f in sorted(out.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    model_weights = load_file(str(base / "model.safetensors"))
    rest, gate_tensors = split_released(weights, 2)
    assert set(rest) == set(model_weights) and len(gate_tensors) == 4
    fresh = DMSGates(cfg, 32, 2, 2)
    load_released_tensors(fresh, gate_tensors)
    for a, b in zip(fresh.state_dict().values(), gates.state_dict().values()):
        assert torch.equal(a, b)
    del gate_tensors["model.layers.1.self_attn.dms_proj_alpha.weight"]
    with pytest.raises(KvsqueezeError, match="1 gate tensors missing"):
        split_released({**rest, **gate_tensors}, 2)
    with pytest.raises(KvsqueezeError, match="a new or empty directory"):
        tdms.export_checkpoint(base, gates, out)
    with pytest.raises(KvsqueezeError, match=r"gates=3: expected 2 layers"):
        tdms.export_checkpoint(base, DMSGates(cfg, 32, 3, 2), tmp_path / "three")
    # query-neuron gates: the config alone (no gate tensors), and the weights split with none expected
    q_cfg = DMSConfig(window=16, gate="query_neuron")
    q_out = tdms.export_checkpoint(base, DMSGates(q_cfg, 32, 2, 2), tmp_path / "q")
    assert DMSConfig(**json.loads((q_out / "config.json").read_text())[tdms.CONFIG_KEY]) == q_cfg
    assert not (q_out / "dms_gates.safetensors").exists()
    assert split_released(load_file(str(q_out / "model.safetensors")), 2, "query_neuron")[1] == {}
    # a Qwen3 base gets the Qwen3 architecture; another model type is refused naming the supported ones
    qwen = json.loads((base / "config.json").read_text())
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({**qwen, "model_type": "qwen3"}))
    got = tdms.export_checkpoint(tmp_path / "qwen", DMSGates(q_cfg, 32, 2, 2), tmp_path / "qwen-out")
    assert json.loads((got / "config.json").read_text())["architectures"] == ["KvsqueezeDMSQwen3ForCausalLM"]
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**qwen, "model_type": "gpt2"}))
    with pytest.raises(KvsqueezeError, match="model_type='gpt2'.*llama, qwen3"):
        tdms.export_checkpoint(tmp_path / "gpt2", gates, tmp_path / "gpt2-out")


@pytest.mark.skipif(HAS_TRTLLM, reason="checks the message given where TensorRT-LLM is absent")
def test_engine_classes_say_what_they_need_without_tensorrt_llm():
    with pytest.raises(KvsqueezeError, match="needs TensorRT-LLM"):
        tdms.register()
    ok, why = tdms.reclaim_support(None)
    assert not ok and "not installed" in why


@pytest.mark.skipif(not HAS_TRTLLM, reason="tensorrt_llm is not installed (CPU machine); "
                    "scripts/check_trtllm_gpu.sh runs the DMS model on a GPU machine")
def test_engine_classes_subclass_vanilla_attention():  # pragma: no cover - GPU machines
    from tensorrt_llm._torch.attention_backend.vanilla import VanillaAttention
    from tensorrt_llm._torch.models.modeling_utils import MODEL_CLASS_MAPPING

    tdms.register()
    assert issubclass(tdms.DMSVanillaAttention, VanillaAttention)
    for arch in tdms.ARCHITECTURES.values():
        assert MODEL_CLASS_MAPPING[arch] is getattr(tdms, arch)
