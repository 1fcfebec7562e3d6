"""DMS gates, delayed eviction and training, against closed forms and independent references."""

import copy
import json

import pytest
import torch

from conftest import tiny_llama
from kvsqueeze.attention import AttentionState, attention_state
from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.methods.dms.config import DMSConfig
from kvsqueeze.methods.dms.gates import DMSGates, install, query_neuron_index
from kvsqueeze.methods.dms.run import HARD_MASK, DMSRun
from kvsqueeze.methods.dms.train import TrainConfig, compression_loss, kl_student_teacher, teacher_run


@pytest.fixture(scope="module")
def tiny():
    """A small random Llama with kvsqueeze's attention (independent of the embedded weights)."""
    return tiny_llama(layers=2, max_positions=256)


def _random_gates(model, cfg, seed, std=0.02):
    gates = DMSGates.for_model(model, cfg)
    torch.manual_seed(seed)
    for g in gates.layers:
        g.dms_proj_alpha.weight.data.normal_(0, std)
    return gates


def _save_checkpoint(model, directory, cfg, seed, std=0.05):
    """A DMS checkpoint directory with random gates; returns the gates."""
    from safetensors.torch import save_file

    gates = _random_gates(model, cfg, seed=seed, std=std)
    cfg.save(directory)
    save_file({k: v.contiguous() for k, v in gates.state_dict().items()},
              str(directory / "dms_gates.safetensors"))
    return gates


def _masked_logits(model, cfg, ids):
    """One teacher-forced pass under the DMS eviction mask (the reference for cache paths)."""
    with torch.no_grad(), attention_state(AttentionState(dms=DMSRun(cfg))):
        return model(ids).logits[0]


def test_window_semantics_and_shift_by_one():
    """Token j is flagged by the logit of token j+1; it stays visible while i - j <= w, then never."""
    w, n = 3, 10
    run = DMSRun(DMSConfig(window=w), mode="hard")
    logits = torch.full((1, n, 1), -1.0)
    logits[0, 5, 0] = 2.0  # token 5's logit flags token 4
    run.add_logits(0, logits)
    m = run.additive_mask(0, q_len=n, k_len=n, n_kv=2)  # [1, 2, q, k]
    for i in range(n):
        for j in range(n):
            hidden = (j == 4) and (i - j > w)
            assert (m[0, 1, i, j] == HARD_MASK) == hidden, (i, j)


def test_per_head_decisions_differ():
    run = DMSRun(DMSConfig(window=1, sinks=0), mode="hard")
    lg = torch.full((1, 4, 2), -1.0)
    lg[0, 2, 1] = 1.0  # head 1 flags token 1
    run.add_logits(0, lg)
    m = run.additive_mask(0, 4, 4, 2)
    assert m[0, 1, 3, 1] == HARD_MASK and m[0, 0, 3, 1] == 0


def test_sink_tokens_are_never_evicted():
    run = DMSRun(DMSConfig(window=1, sinks=2), mode="hard")
    run.add_logits(0, torch.full((1, 10, 1), 3.0))  # every token flagged
    m = run.additive_mask(0, 10, 10, 1)[0, 0]
    assert torch.all(m[:, :2] == 0)  # sinks stay
    assert m[9, 2] == HARD_MASK and m[9, 7] == HARD_MASK and m[9, 8] == 0  # the rest leave the window
    for fwd in ("soft", "straight_through"):
        train = DMSRun(DMSConfig(window=1, sinks=2), mode="train", noise=False, forward=fwd)
        train.add_logits(0, torch.full((1, 10, 1), 3.0))
        m = train.additive_mask(0, 10, 10, 1)[0, 0]
        assert torch.all(m[:, :2] == 0) and m[9, 8] == 0
        assert torch.all(m[9, 2:8] < -29)  # log(1 - sigmoid(30)) ~ -30, or the hard mask
        _, alpha = train.eviction(0, 10, 1)
        assert torch.all(alpha[..., :2] == 0) and torch.all(alpha[..., 2:9] == 1)


def test_soft_training_mask_is_log_one_minus_alpha():
    run = DMSRun(DMSConfig(window=1, sinks=0, tau=0.5), mode="train", noise=False)
    lg = torch.tensor([[[0.0], [0.3], [-0.2], [0.0]]])  # logits of tokens 0..3 -> decide keys 0..2
    run.add_logits(0, lg)
    m = run.additive_mask(0, 4, 4, 1)[0, 0]
    alpha = torch.sigmoid(torch.tensor([0.3, -0.2, 0.0]) / 0.5)
    torch.testing.assert_close(m[3, :2], torch.log(1 - alpha[:2]))
    assert m[3, 2] == 0 and m[3, 3] == 0  # within the window (distance <= 1)


def test_compression_loss_zero_once_target_met():
    assert compression_loss(torch.tensor(0.80), 4.0).item() == 0.0
    assert compression_loss(torch.tensor(0.75), 4.0).item() == 0.0
    assert compression_loss(torch.tensor(0.50), 4.0).item() == pytest.approx(0.25)
    # per sequence (the released code's): one sequence over the target does not pay for another
    assert compression_loss(torch.tensor([0.95, 0.50]), 4.0).item() == pytest.approx(0.125)
    assert compression_loss(torch.tensor([0.95, 0.50]).mean(), 4.0).item() == pytest.approx(0.025)


def test_the_teacher_of_query_neuron_gates_has_the_neuron_zeroed_by_default():
    zeroed = teacher_run(TrainConfig(gate="query_neuron"))
    assert zeroed is not None and not zeroed.evict and zeroed.config.gate == "query_neuron"
    assert teacher_run(TrainConfig(gate="query_neuron", teacher="intact")) is None
    assert teacher_run(TrainConfig()) is None  # projection gates: the original model
    with pytest.raises(KvsqueezeError, match="teacher='student'"):
        TrainConfig(teacher="student")
    with pytest.raises(KvsqueezeError, match="compression_loss='all'"):
        TrainConfig(compression_loss="all")


def test_evicted_fraction_per_sequence_against_a_written_out_mean():
    run = DMSRun(DMSConfig(), mode="train")
    g = torch.Generator().manual_seed(0)
    run.alphas = {0: torch.rand(2, 3, 9, generator=g), 1: torch.rand(2, 3, 9, generator=g)}
    per_seq = run.evicted_fraction(per_sequence=True)
    for b in range(2):
        expected = sum(run.alphas[layer][b].sum().item() / 27 for layer in (0, 1)) / 2
        assert per_seq[b].item() == pytest.approx(expected)
    legacy = sum(run.alphas[layer][..., :-1].mean().item() for layer in (0, 1)) / 2
    assert run.evicted_fraction().item() == pytest.approx(legacy)


def test_kl_student_teacher_zero_for_equal_and_positive_otherwise():
    a = torch.randn(5, 11)
    assert kl_student_teacher(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_student_teacher(a, a.flip(-1)).item() > 0


def test_training_forward_with_hard_decisions_equals_inference(tiny):
    """The straight-through forward pass applies exactly the inference (hard) eviction."""
    cfg = DMSConfig(window=4)
    handles = install(tiny, _random_gates(tiny, cfg, seed=1))  # some tokens evicted, some kept
    ids = torch.randint(0, 97, (1, 40))
    try:
        train_run = DMSRun(cfg, mode="train", noise=False, forward="straight_through")
        with attention_state(AttentionState(dms=train_run)):
            train_logits = tiny(ids).logits
        hard_run = DMSRun(cfg, mode="hard")
        with torch.no_grad(), attention_state(AttentionState(dms=hard_run)):
            hard_logits = tiny(ids).logits
        frac = train_run.evicted_fraction().item()
        assert 0.05 < frac < 0.95  # the test really exercises eviction
        torch.testing.assert_close(train_logits, hard_logits, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            dense = tiny(ids).logits
        assert not torch.allclose(dense, hard_logits, atol=1e-3)
    finally:
        for h in handles:
            h.remove()


def test_decode_after_prefill_equals_single_pass(tiny):
    cfg = DMSConfig(window=4)
    handles = install(tiny, _random_gates(tiny, cfg, seed=2))
    ids = torch.randint(0, 97, (1, 30))
    try:
        full = _masked_logits(tiny, cfg, ids)
        with torch.no_grad():
            run = DMSRun(cfg)
            steps = []
            with attention_state(AttentionState(dms=run)):
                out = tiny(ids[:, :20], use_cache=True)
                steps.append(out.logits[0])
                cache = out.past_key_values
                for t in range(20, 30):
                    out = tiny(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                    steps.append(out.logits[0])
        torch.testing.assert_close(torch.cat(steps), full, rtol=1e-4, atol=1e-5)
    finally:
        for h in handles:
            h.remove()


def _recording_queries(monkeypatch, zero_neuron_of_group: int | None = None):
    """Record the query every attention call scores (after RoPE); optionally zero the last dimension
    of every ``zero_neuron_of_group``-th query head first (a written-out post-RoPE zeroing)."""
    import kvsqueeze.attention as attention

    seen, original = [], attention.grouped_scores

    def record(query, key, scaling):
        if zero_neuron_of_group:
            query = query.clone()
            query[:, ::zero_neuron_of_group, :, -1] = 0.0
        seen.append(query.detach().clone())
        return original(query, key, scaling)

    monkeypatch.setattr(attention, "grouped_scores", record)
    return seen


def test_repurposed_query_neuron_is_zeroed_before_and_after_rope(tiny, monkeypatch):
    """With query_neuron gates and no eviction reachable: the query attention scores has the neuron
    zeroed after RoPE (RoPE rotates part of its pair, dimension d/2 - 1, back into it), the other
    dimensions are those of the model whose q_proj row is zeroed, and the logits equal that model's
    with the post-RoPE zero written out here."""
    cfg = DMSConfig(window=1000, gate="query_neuron")
    gates = DMSGates.for_model(tiny, cfg)
    ids = torch.randint(0, 97, (1, 25), generator=torch.Generator().manual_seed(0))
    idx = query_neuron_index(tiny)
    assert idx.tolist() == [15, 47]  # head_dim 16, 2 query heads per group: heads 0 and 2
    ref = copy.deepcopy(tiny)
    with torch.no_grad():
        original = tiny(ids).logits
        for layer in ref.model.layers:
            layer.self_attn.q_proj.weight[idx] = 0.0
        seen_pre = _recording_queries(monkeypatch)
        pre_only = ref(ids).logits  # zeroed before RoPE only
        rope_q = seen_pre[0]
        assert rope_q[:, ::2, :, -1].abs().max() > 1e-3  # RoPE put something back into the neuron
        seen_ref = _recording_queries(monkeypatch, zero_neuron_of_group=2)
        expected = ref(ids).logits
    handles = install(tiny, gates)
    try:
        for run in (DMSRun(cfg), DMSRun(cfg, evict=False)):
            seen = _recording_queries(monkeypatch)
            with torch.no_grad(), attention_state(AttentionState(dms=run)):
                got = tiny(ids).logits
            q0 = seen[0]
            assert torch.equal(q0[:, ::2, :, -1], torch.zeros_like(q0[:, ::2, :, -1]))
            keep = torch.ones(q0.shape[1], q0.shape[-1], dtype=torch.bool)
            keep[::2, -1] = False
            torch.testing.assert_close(q0.permute(0, 2, 1, 3)[..., keep], rope_q.permute(0, 2, 1, 3)[..., keep])
            torch.testing.assert_close(seen[1], seen_ref[1], rtol=1e-5, atol=1e-5)  # layer 1 too
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, original, atol=1e-4)
        # the post-RoPE zero matters: small on this tiny model (8.6e-6 for these seeded ids)
        assert (got - pre_only).abs().max() > 2e-6
    finally:
        for h in handles:
            h.remove()


def test_a_run_that_does_not_evict_masks_nothing(tiny):
    cfg = DMSConfig(window=2)
    handles = install(tiny, _random_gates(tiny, cfg, seed=1, std=1.0))  # most tokens flagged
    ids = torch.randint(0, 97, (1, 30))
    try:
        with torch.no_grad():
            dense = tiny(ids).logits
            with attention_state(AttentionState(dms=DMSRun(cfg, evict=False))):
                kept = tiny(ids).logits
            with attention_state(AttentionState(dms=DMSRun(cfg))):
                evicting = tiny(ids).logits
        torch.testing.assert_close(kept, dense)
        assert not torch.allclose(evicting, dense, atol=1e-3)
    finally:
        for h in handles:
            h.remove()


def test_bad_config_values():
    with pytest.raises(KvsqueezeError, match="target_ratio=0.5"):
        DMSConfig(target_ratio=0.5)
    with pytest.raises(KvsqueezeError, match="gate='mlp'"):
        DMSConfig(gate="mlp")
    with pytest.raises(KvsqueezeError, match="window=512: expected fewer tokens than seq_len=256"):
        TrainConfig(window=512, seq_len=256)
    with pytest.raises(KvsqueezeError, match="target_ratio=0.9"):
        TrainConfig(target_ratio=0.9)


def test_unsupported_architecture():
    class Fake:
        class config:
            model_type = "gpt2"
    with pytest.raises(KvsqueezeError, match="model_type='gpt2'"):
        DMSGates.for_model(Fake(), DMSConfig())


def test_checkpoint_missing_dms_parameters(tmp_path):
    from kvsqueeze.methods import create

    with pytest.raises(KvsqueezeError, match="dms_config.json is missing"):
        create("dms", 4, checkpoint=str(tmp_path))
    (tmp_path / "dms_config.json").write_text(json.dumps({"window": 16}))
    m = create("dms", None, checkpoint=str(tmp_path))
    assert m.ratio == 4.0
    with pytest.raises(KvsqueezeError, match="dms_gates.safetensors is missing"):
        m.bind(type("M", (), {"config": type("C", (), {"model_type": "llama", "hidden_size": 8,
                                                         "num_hidden_layers": 1,
                                                         "num_key_value_heads": 1})(),
                              "parameters": lambda self: iter([torch.zeros(1)])})())


def test_target_ratio_schedule_rises_linearly():
    cfg = TrainConfig(target_ratio=8, steps=100, ramp_steps=70)
    assert cfg.target_at(0) == 1.0
    assert cfg.target_at(35) == pytest.approx(4.5)
    assert cfg.target_at(70) == 8.0 and cfg.target_at(100) == 8.0



@pytest.mark.parametrize("window", [1, 3, 8])
def test_reference_cache_equals_masked_teacher_forcing(tiny, window):
    """Physically dropping tokens per head (ring buffer, in-place reuse) == the eviction mask."""
    from kvsqueeze.methods.dms.cache import DMSCache

    cfg = DMSConfig(window=window)
    handles = install(tiny, _random_gates(tiny, cfg, seed=3))
    ids = torch.randint(0, 97, (1, 48))
    n_prefill = 20
    try:
        full = _masked_logits(tiny, cfg, ids)
        with torch.no_grad():
            run = DMSRun(cfg)
            cache = DMSCache(run, n_layers=2, n_kv=2)
            steps = []
            with attention_state(AttentionState(dms=run)):
                steps.append(tiny(ids[:, :n_prefill], past_key_values=cache, use_cache=True).logits[0])
                for t in range(n_prefill, ids.shape[1]):
                    out = tiny(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                    steps.append(out.logits[0])
        torch.testing.assert_close(torch.cat(steps), full, rtol=1e-4, atol=1e-5)
        # What the cache holds is exactly the visible set: unflagged tokens + the last w + 1.
        n = ids.shape[1]
        for layer in range(2):
            flags = cache.layers[layer].flags(n)
            for head in range(2):
                held = sorted(p for p in cache.layers[layer].pos[head].tolist() if p >= 0)
                expected = [j for j in range(n) if not (flags[head, j] and n - 1 - j > window)]
                assert held == expected
        assert torch.equal(cache.slots(), cache.held())  # flagged slots were reused, never leaked
        evicted = n * 4 - int(cache.held().sum())
        assert evicted > 0  # eviction really happened
        assert len(cache.reads) == n - n_prefill
        assert cache.peak_total >= int(cache.held().sum())
    finally:
        for h in handles:
            h.remove()


def test_released_qwen3_dms_checkpoint_loads(tmp_path):
    """A tiny random Qwen3 written in the released Model-Optimizer DMS layout loads as kvsqueeze gates."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from kvsqueeze.methods import create
    from kvsqueeze.methods.dms.checkpoint import is_released_checkpoint, load_gates

    torch.manual_seed(4)
    cfg = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf.update(dms_alpha_scale=100.0, dms_initial_alpha_offset=5.0, dms_window_size=16,
                dms_paged_attention_block_size=8, dms_cr=8, dms_separate_alpha=True,
                dms_alpha_per="head", dms_tau=0.1)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    weights = load_file(str(tmp_path / "model.safetensors"))
    written = {}
    for i in range(2):
        written[i] = (torch.randn(2, 64), torch.rand(64) + 0.5)
        weights[f"model.layers.{i}.self_attn.dms_proj_alpha.weight"] = written[i][0]
        weights[f"model.layers.{i}.self_attn.dms_proj_alpha_norm.weight"] = written[i][1]
    save_file(weights, str(tmp_path / "model.safetensors"))

    assert is_released_checkpoint(tmp_path)
    method = create("dms", None, checkpoint=str(tmp_path))
    assert (method.ratio, method.config.window, method.config.gate) == (8.0, 16, "projection")
    assert method.config.logit_bias == -5.0
    from kvsqueeze.attention import ATTN_IMPL, register

    register()
    model = Qwen3ForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_IMPL).eval()
    gates = load_gates(tmp_path, model)
    for i in range(2):
        assert torch.equal(gates.layers[i].dms_proj_alpha.weight, written[i][0])
        assert torch.equal(gates.layers[i].dms_proj_alpha_norm.weight, written[i][1])
    ids = torch.randint(0, 97, (40,))
    logits, held, ratio, _ = method.run_segment(model, ids[:30], ids[30:])
    assert logits.shape == (10, 97) and 0 < held <= 1 and ratio >= 1
    # dms_disable_eviction: the same gates decide "keep" everywhere, in every engine (rule.gate_logits)
    conf["dms_disable_eviction"] = True
    (tmp_path / "config.json").write_text(json.dumps(conf))
    off = create("dms", None, checkpoint=str(tmp_path))
    assert off.config.evict is False
    assert bool((load_gates(tmp_path, model).logits(0, torch.randn(3, 64)) <= 0).all())
    _, held_off, ratio_off, _ = off.run_segment(model, ids[:30], ids[30:])
    assert (held_off, ratio_off) == (1.0, 1.0)


def test_released_query_neuron_config_maps(tmp_path):
    from kvsqueeze.methods.dms.checkpoint import released_config

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "qwen3", "dms_window_size": 512, "dms_separate_alpha": False,
         "dms_alpha_per": "layer", "dms_cr": 4}))
    cfg = released_config(tmp_path)
    assert (cfg.gate, cfg.granularity, cfg.window, cfg.target_ratio) == ("query_neuron", "layer", 512, 4.0)


def test_greedy_on_reference_cache_equals_greedy_by_full_recompute(tiny, tmp_path):
    """The dms method's decoding (DMSCache) == argmax of full masked passes over the growing text."""
    from kvsqueeze.methods import create

    cfg = DMSConfig(window=4, target_ratio=2)
    _save_checkpoint(tiny, tmp_path, cfg, seed=5)
    method = create("dms", None, checkpoint=str(tmp_path))
    ids = torch.randint(0, 97, (24,))
    try:
        toks, ratio = method.greedy(tiny, ids, max_new=6)
        seq = ids.clone()
        expected = []
        for _ in range(6):
            nxt = int(_masked_logits(tiny, cfg, seq[None])[-1].argmax())
            expected.append(nxt)
            seq = torch.cat([seq, torch.tensor([nxt])])
    finally:
        method.unbind(tiny)
    assert toks == expected
    assert ratio > 1.0


def test_prefix_only_protocol_holds_scored_tokens(tiny, tmp_path):
    """scored='keep': the prefix is evicted by its gates, the scored tokens are all held (as the other
    methods hold them) == a full pass through a fixed mask built from the prefix's flags alone;
    scored='evict' == the full DMS mask over prefix and scored tokens."""
    from kvsqueeze.methods import create

    cfg = DMSConfig(window=4, target_ratio=2)
    gates = _save_checkpoint(tiny, tmp_path, cfg, seed=6)
    keep = create("dms", None, checkpoint=str(tmp_path))
    evict = create("dms", None, checkpoint=str(tmp_path), scored="evict")
    assert keep.scored == "keep" and keep.segment_details() == {"evict_scored": 0.0}
    torch.manual_seed(7)
    ids = torch.randint(0, 97, (40,))
    P = 24
    handles = install(tiny, gates)
    try:
        full_evict = _masked_logits(tiny, cfg, ids[None])
        probe = DMSRun(cfg)  # flags of every key under the full DMS rule
        with torch.no_grad(), attention_state(AttentionState(dms=probe)):
            tiny(ids[None])
        flags = {layer: probe.eviction(layer, len(ids), 2)[0].clone() for layer in range(2)}
        assert any(f[..., P:-1].any() for f in flags.values())  # scored tokens would be evicted
        assert any(f[..., :P].any() for f in flags.values())  # and prefix tokens are

        class PrefixFlags(DMSRun):  # the reference: fixed flags, none on the scored tokens
            def eviction(self, layer, n_keys, n_kv):
                f = flags[layer][..., :n_keys].clone()
                f[..., P:] = False
                return f, None

        with torch.no_grad(), attention_state(AttentionState(dms=PrefixFlags(cfg))):
            full_keep = tiny(ids[None]).logits[0]
    finally:
        for h in handles:
            h.remove()
    try:  # one method's gates on the model at a time
        lk, held_k, ratio_k, _ = keep.run_segment(tiny, ids[:P], ids[P:])
    finally:
        keep.unbind(tiny)
    try:
        le, held_e, ratio_e, _ = evict.run_segment(tiny, ids[:P], ids[P:])
    finally:
        evict.unbind(tiny)
    torch.testing.assert_close(lk, full_keep[P:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(le, full_evict[P:], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(lk, le, atol=1e-3)  # the two protocols really differ
    assert (held_k, ratio_k) == (held_e, ratio_e)  # the ratio is the prefix's either way
    with pytest.raises(KvsqueezeError, match="scored='drop'"):
        create("dms", None, checkpoint=str(tmp_path), scored="drop")
    with pytest.raises(KvsqueezeError, match="keep_from=3"):
        DMSRun(cfg, mode="train", keep_from=3)


def test_two_gate_sets_on_one_model_do_not_mix(tiny, tmp_path):
    """Two DMS checkpoints bound to one model (as when evaluated side by side): each one's segment
    equals its result alone. (Before gate-owned runs, both sets of hooks fed every run and the
    second checkpoint was scored with the first one's decisions.)"""
    from kvsqueeze.methods import create

    dirs = []
    for seed in (8, 9):
        d = tmp_path / f"g{seed}"
        d.mkdir()
        _save_checkpoint(tiny, d, DMSConfig(window=4, target_ratio=2), seed=seed)
        dirs.append(d)
    torch.manual_seed(10)
    ids = torch.randint(0, 97, (40,))
    alone = []
    for d in dirs:
        m = create("dms", None, checkpoint=str(d), scored="evict")
        try:
            alone.append(m.run_segment(tiny, ids[:24], ids[24:]))
        finally:
            m.unbind(tiny)
    assert alone[0][2] != alone[1][2]  # the two gate sets really decide differently
    a, b = (create("dms", None, checkpoint=str(d), scored="evict") for d in dirs)
    try:
        got = [a.run_segment(tiny, ids[:24], ids[24:]), b.run_segment(tiny, ids[:24], ids[24:]),
               a.run_segment(tiny, ids[:24], ids[24:])]
        toks = b.greedy(tiny, ids[:24], max_new=4)[0]
    finally:
        a.unbind(tiny)
        b.unbind(tiny)
    for (lg, held, ratio, _), (lg0, held0, ratio0, _) in zip(got, [alone[0], alone[1], alone[0]]):
        torch.testing.assert_close(lg, lg0)
        assert (held, ratio) == (held0, ratio0)
    b2 = create("dms", None, checkpoint=str(dirs[1]))
    try:
        assert toks == b2.greedy(tiny, ids[:24], max_new=4)[0]
    finally:
        b2.unbind(tiny)


def test_gate_offset_shifts_every_logit_and_its_fit_reaches_the_target(tiny, tmp_path):
    """``offset`` adds to every gate logit (layer 0's logits, upstream of any eviction, move by exactly
    the offset; more offset, more evicted); calibrate_offset finds the offset that reaches a target
    ratio on the given prefills, and that offset reproduces the ratio it reports."""
    from kvsqueeze.methods.dms.method import DMSMethod
    from kvsqueeze.methods.dms.offset import calibrate_offset, prefill_ratio, save_with_offset

    cfg = DMSConfig(window=4, target_ratio=3)
    _save_checkpoint(tiny, tmp_path, cfg, seed=5, std=0.05)
    g = torch.Generator().manual_seed(2)
    segs = [torch.randint(0, 97, (64,), generator=g) for _ in range(3)]
    n_layer0 = (64 - 1 - cfg.sinks) * 2  # deciding logits of layer 0, 2 KV heads, one segment
    ratios = {}
    for off in (-0.5, 0.0, 0.5):
        m = DMSMethod(checkpoint=str(tmp_path), offset=off)
        ratios[off], logits = prefill_ratio(tiny, m, segs[:1])
        m.unbind(tiny)
        if off == 0.0:
            base = logits[:n_layer0]
        elif off == 0.5:
            torch.testing.assert_close(logits[:n_layer0], base + 0.5)
    assert ratios[-0.5] < ratios[0.0] < ratios[0.5]
    method = DMSMethod(checkpoint=str(tmp_path))
    fit = calibrate_offset(tiny, method, segs, target=2.0, iterations=6, tolerance=0.05)
    assert abs(fit["ratio"] / 2.0 - 1) <= 0.05
    for off, expected in ((0.0, fit["ratio_before"]), (fit["offset"], fit["ratio"])):
        m = DMSMethod(checkpoint=str(tmp_path), offset=off)
        try:
            assert prefill_ratio(tiny, m, segs)[0] == pytest.approx(expected)
        finally:
            m.unbind(tiny)
    # folded into a checkpoint of its own: dms:OUT reaches the same ratio with no offset given
    out = save_with_offset(DMSMethod(checkpoint=str(tmp_path)), fit["offset"], 2.0, tmp_path / "fitted", fit)
    m = DMSMethod(checkpoint=str(out))
    try:
        assert m.ratio == 2.0 and m.config.logit_bias == pytest.approx(cfg.logit_bias + fit["offset"])
        assert prefill_ratio(tiny, m, segs)[0] == pytest.approx(fit["ratio"])
    finally:
        m.unbind(tiny)
    with pytest.raises(KvsqueezeError, match="offset=nan"):
        DMSMethod(checkpoint=str(tmp_path), offset=float("nan"))
