"""KVTC codec: allocation against brute force, RoPE against Hugging Face, lossless coding, corrupt blobs."""

import itertools
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.methods.kvtc import calibrate as kvtc
from kvsqueeze.methods.kvtc.method import KVTC
from kvsqueeze.methods.kvtc import codec
from kvsqueeze.cache import PrefixCache


def _tiny_llama(rope_scaling=None, layers=2, kv_heads=2, head_dim=16):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvsqueeze.attention import ATTN_IMPL, register

    register()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=4 * head_dim, intermediate_size=96,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, rope_scaling=rope_scaling)
    cfg._attn_implementation = ATTN_IMPL
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny():
    return _tiny_llama()


def _builder_for(model, n_caches=6, n=96, seed=0, **kw):
    from kvsqueeze.evaluate import dense_prefill

    inv, sc = kvtc.rope_params(model)
    cfg = model.config
    b = kvtc.CalibrationBuilder(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                cfg.hidden_size // cfg.num_attention_heads, inv, sc, **kw)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_caches):
        cache, _ = dense_prefill(model, torch.randint(0, 97, (n,), generator=g))
        b.add(cache)
    return b


@pytest.fixture(scope="module")
def tiny_cal(tiny):
    return _builder_for(tiny).build(kvtc.model_fingerprint(tiny))


# --- bit allocation ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_allocation_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, n_opt = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    cost = np.concatenate([np.zeros((n, 1), int), rng.integers(1, 6, (n, n_opt - 1))], axis=1)
    dist = rng.random((n, n_opt)) * 10
    budget = int(rng.integers(0, 4 * n))
    got = codec.allocate(dist, cost, budget)
    best = min((sum(dist[i, c[i]] for i in range(n)), c)
               for c in itertools.product(range(n_opt), repeat=n)
               if sum(cost[i, c[i]] for i in range(n)) <= budget)
    assert sum(cost[i, got[i]] for i in range(n)) <= budget
    assert sum(dist[i, got[i]] for i in range(n)) == pytest.approx(best[0])


def test_allocation_rejects_bad_tables():
    with pytest.raises(ValueError):
        codec.allocate(np.ones((2, 3)), np.ones((2, 3), int), 4)  # option 0 must be free
    with pytest.raises(KvsqueezeError, match="budget"):
        codec.allocate(np.ones((2, 3)), np.zeros((2, 3), int), -1)


def test_more_budget_never_hurts(tiny_cal):
    prev = math.inf
    for r in (16, 8, 4, 2):
        alloc = tiny_cal.allocation(r)
        d = sum(float((s.dist.double()[torch.arange(len(a)), torch.as_tensor(a)]
                       * s.sigma.double() ** 2).sum()) for key, s in tiny_cal.stats.items()
                for a in [alloc[key]])
        assert d <= prev + 1e-12
        prev = d


# --- RoPE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", [None,
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                     {"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 128}])
def test_rope_matches_hugging_face_and_removal_is_exact(scaling):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = _tiny_llama(scaling)
    inv, sc = kvtc.rope_params(model)
    pos = torch.arange(37, 37 + 50)
    k = torch.randn(1, 2, 50, 16)
    hf_cos, hf_sin = model.model.rotary_emb(k, pos[None])
    _, hf_k = apply_rotary_pos_emb(k, k, hf_cos, hf_sin)
    cos, sin = codec.rope_cos_sin(inv, sc, pos)
    ours = codec.apply_rope(k[0], cos, sin)
    torch.testing.assert_close(ours, hf_k[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(codec.remove_rope(ours, cos, sin), k[0], rtol=1e-5, atol=1e-5)


# --- entropy coding --------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), d=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_codes_round_trip_losslessly(m, d, seed):
    """Any codes within the quantizer limits decode to themselves, whatever the model fits."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, d, generator=g) * 3
    stats = kvtc.component_tables(torch.randn(64, d, generator=g), clips=(3.0, 9.0))
    s = codec.LayerKindStats(groups=[(0, d)], means=[torch.zeros(d)], bases=[torch.eye(d)],
                             synths=[torch.eye(d)], sigma=torch.ones(d), clips=(3.0, 9.0), **stats)
    cal = codec.Calibration(1, 1, d, "layer", 0.5, torch.ones(1), 1.0, "m", {(0, "k"): s})
    opts = np.array([int(x) for x in torch.randint(0, codec.N_OPTIONS, (d,), generator=g)])
    q = codec.quantize(z, opts, (3.0, 9.0))
    words = codec.encode_codes(q, cal, 0, "k", opts)
    back = codec.decode_codes(words, m, cal, 0, "k", opts)
    kept = torch.as_tensor(opts > 0)
    assert torch.equal(back[:, kept], q[:, kept])
    assert (back[:, ~kept] == 0).all()


def test_blob_size_tracks_the_entropy_estimate(tiny, tiny_cal):
    """On calibration-like data the coder's output is within a few % of the tables' estimate."""
    from kvsqueeze.evaluate import dense_prefill

    cache, _ = dense_prefill(tiny, torch.randint(0, 97, (400,), generator=torch.Generator().manual_seed(9)))
    ratio = 6.0
    alloc = tiny_cal.allocation(ratio)
    blob = codec.encode(tiny_cal, [k[:, 4:] for k in cache.keys], [v[:, 4:] for v in cache.values],
                        4, ratio, rate_control=False)
    est_bits = sum(float(s.rate[torch.arange(len(alloc[key])), torch.as_tensor(alloc[key])].sum())
                   for key, s in tiny_cal.stats.items()) * 396
    assert 0.9 < len(blob) * 8 / est_bits < 1.15


# --- the codec on real caches ---------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 120), position=st.integers(0, 300), ratio=st.floats(1.5, 20))
def test_round_trip_shapes_and_error_bound(tiny, tiny_cal, n, position, ratio):
    g = torch.Generator().manual_seed(n + position)
    keys = [torch.randn(2, n, 16, generator=g) for _ in range(2)]
    values = [torch.randn(2, n, 16, generator=g) for _ in range(2)]
    blob = codec.encode(tiny_cal, keys, values, position, ratio)
    assert codec.read_header(blob.data)["n_tokens"] == n
    dk, dv = codec.decode(tiny_cal, blob)
    for a, b in zip(dk + dv, keys + values):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.isfinite(a).all()
    # decoding equals the transform applied to the quantized coefficients, computed directly
    plan = codec.read_header(blob.data)["ratio"]
    alloc = tiny_cal.allocation(plan)
    cos, sin = codec.rope_cos_sin(tiny_cal.rope_inv_freq, tiny_cal.rope_scaling,
                                  torch.arange(position, position + n))
    s = tiny_cal.stats[(1, "k")]
    z = codec.project(s, codec.to_features(codec.remove_rope(keys[1], cos, sin)))
    zq = codec.dequantize(codec.quantize(z, alloc[(1, "k")], s.clips), alloc[(1, "k")])
    want = codec.apply_rope(codec.from_features(codec.unproject(s, zq), 2), cos, sin)
    torch.testing.assert_close(dk[1], want.float(), rtol=1e-4, atol=1e-4)


def test_higher_ratio_means_smaller_blob_and_larger_error(tiny, tiny_cal):
    from kvsqueeze.evaluate import dense_prefill

    cache, _ = dense_prefill(tiny, torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(3)))
    sizes, errs = [], []
    for r in (2, 4, 8, 16):
        blob = codec.encode(tiny_cal, cache.keys, cache.values, 0, r)
        dk, dv = codec.decode(tiny_cal, blob)
        dense = 2 * 2 * 200 * 2 * 16 * 2
        assert dense / len(blob) >= r * 0.999, (r, dense / len(blob))
        sizes.append(len(blob))
        errs.append(sum(float(((a - b) ** 2).sum()) for a, b in zip(dk + dv, cache.keys + cache.values)))
    assert sizes == sorted(sizes, reverse=True)
    assert errs == sorted(errs)


# --- corrupt and foreign blobs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def blob(tiny_cal):
    g = torch.Generator().manual_seed(1)
    keys = [torch.randn(2, 30, 16, generator=g) for _ in range(2)]
    values = [torch.randn(2, 30, 16, generator=g) for _ in range(2)]
    return codec.encode(tiny_cal, keys, values, 10, 4.0).data


def test_truncated_blobs_are_refused(tiny_cal, blob):
    for cut in [0, 3, 9, 13, len(blob) // 2, len(blob) - 5, len(blob) - 1]:
        with pytest.raises(codec.BlobError):
            codec.decode(tiny_cal, blob[:cut])


def test_every_single_bit_flip_is_refused(tiny_cal, blob):
    rng = random.Random(0)
    positions = sorted(set(rng.randrange(len(blob) * 8) for _ in range(200)) | {0, 33, len(blob) * 8 - 1})
    for bit in positions:
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(codec.BlobError):
            codec.decode(tiny_cal, bytes(bad))


def test_wrong_magic_version_and_extra_bytes(tiny_cal, blob):
    with pytest.raises(codec.BlobError, match="magic"):
        codec.decode(tiny_cal, b"ZIP!" + blob[4:])
    with pytest.raises(codec.BlobError, match="version"):
        codec.decode(tiny_cal, blob[:4] + b"\x09\x00" + blob[6:])
    with pytest.raises(codec.BlobError):
        codec.decode(tiny_cal, blob + b"\x00")
    with pytest.raises(codec.BlobError, match="expected bytes"):
        codec.decode(tiny_cal, "not bytes")


def test_blob_from_another_calibration_or_model_is_refused(tiny, tiny_cal, blob):
    other = _builder_for(tiny, seed=5).build(kvtc.model_fingerprint(tiny))
    assert other.fingerprint() != tiny_cal.fingerprint()
    with pytest.raises(codec.BlobError, match="calibration"):
        codec.decode(other, blob)
    foreign = _builder_for(tiny).build("0123456789abcdef")
    with pytest.raises(codec.BlobError, match="model"):
        codec.decode(foreign, blob)


# --- calibration artifact ----------------------------------------------------------------------------


def test_calibration_save_load_and_tamper_detection(tiny_cal, blob, tmp_path):
    path = tiny_cal.save(tmp_path / "cal.safetensors")
    back = codec.Calibration.load(path)
    assert back.fingerprint() == tiny_cal.fingerprint()
    dk, _ = codec.decode(back, blob)
    dk0, _ = codec.decode(tiny_cal, blob)
    assert all(torch.equal(a, b) for a, b in zip(dk, dk0))
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # inside the tensor data
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(KvsqueezeError, match="fingerprint"):
        codec.Calibration.load(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"nonsense")
    with pytest.raises(KvsqueezeError, match="unreadable"):
        codec.Calibration.load(tmp_path / "junk.safetensors")
    with pytest.raises(KvsqueezeError, match="calibration"):
        codec.Calibration.load(tmp_path / "missing.safetensors")


def test_method_refuses_a_calibration_of_another_model(tiny, tiny_cal):
    other = _tiny_llama(layers=2)
    with torch.no_grad():
        other.model.layers[0].self_attn.k_proj.weight.add_(1.0)
    m = KVTC(ratio=4, calibration=tiny_cal)
    m.prepare(tiny)
    with pytest.raises(KvsqueezeError, match="made for model"):
        m.prepare(other)


def test_head_grouping_builds_block_diagonal_bases(tiny):
    cal = _builder_for(tiny).build(kvtc.model_fingerprint(tiny), grouping="head")
    s = cal.stats[(0, "k")]
    assert s.groups == [(0, 16), (16, 16)] and all(b.shape == (16, 16) for b in s.bases)
    for b in s.bases:
        torch.testing.assert_close(b.T @ b, torch.eye(16), atol=1e-4, rtol=0)
    with pytest.raises(KvsqueezeError, match="grouping"):
        _builder_for(tiny).build("x", grouping="model")


def test_method_keeps_exempt_tokens_exact_and_reports_both_ratios(tiny, tiny_cal):
    from kvsqueeze.evaluate import dense_prefill

    cache, _ = dense_prefill(tiny, torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(4)))
    m = KVTC(ratio=8, sinks=4, recent=20, calibration=tiny_cal)
    comp = m.compress(cache)
    for a, b in zip(comp.keys + comp.values, cache.keys + cache.values):
        assert torch.equal(a[:, :4], b[:, :4]) and torch.equal(a[:, -20:], b[:, -20:])
        assert not torch.equal(a[:, 4:-20], b[:, 4:-20])
    assert comp.details["ratio_compressed"] >= 8 * 0.999
    per_token = 2 * 2 * 16 * 2 * 2
    assert comp.bytes_held == comp.details["blob_bytes"] + 24 * per_token
    assert comp.ratio < comp.details["ratio_compressed"]
    with pytest.raises(KvsqueezeError, match="prefix_tokens"):
        m.compress(PrefixCache([k[:, :10] for k in cache.keys], [v[:, :10] for v in cache.values]))


def test_kvtc_on_the_embedded_model_quality_falls_with_ratio(embedded, embedded_kvtc_calibration):
    """A quick calibration on the embedded model (shared with the SGLang storage-tier tests): KL grows
    with the ratio and stays small at 8x (planning a 4x allocation costs twice the time of an 8x one)."""
    from kvsqueeze import corpus
    from kvsqueeze.evaluate import evaluate_kl

    _, tok, model = embedded
    cal = embedded_kvtc_calibration[0]
    segs = corpus.token_segments(corpus.heldout_documents(), tok, 256 + 64 + 1, 2)
    methods = [KVTC(ratio=r, calibration=cal) for r in (8, 16)]
    recs = evaluate_kl(model, [s for _, s in segs], methods, 256, 64, "smollm2")
    assert recs[0].kl_mean < 0.05
    assert recs[0].kl_mean < recs[1].kl_mean
    for r in recs:
        assert r.details["ratio_compressed"] >= r.ratio_target * 0.999


def test_attention_metric_pca_is_invertible_and_measures_output_error(tiny):
    """Component-space error equals |T df|^2, and the value metric is the output projection's."""
    from kvsqueeze.evaluate import dense_prefill

    energy = kvtc.QueryEnergy(tiny)
    with energy:
        dense_prefill(tiny, torch.randint(0, 97, (64,), generator=torch.Generator().manual_seed(2)))
    metrics = kvtc.attention_metrics(tiny, energy)
    b = _builder_for(tiny)
    pca = b.fit_pca("layer", metrics)
    cal = b.build("fp", pca=pca)
    g = torch.Generator().manual_seed(0)
    for key in [(0, "k"), (1, "v")]:
        s, T = cal.stats[key], metrics[key].double()
        f = torch.randn(20, 32, generator=g, dtype=torch.float64)
        z = codec.project(s, f)
        torch.testing.assert_close(codec.unproject(s, z), f, rtol=1e-4, atol=1e-4)
        dz = torch.randn(20, 32, generator=g, dtype=torch.float64) * 0.01
        df = codec.unproject(s, z + dz) - codec.unproject(s, z)
        torch.testing.assert_close(((dz * s.sigma.double()) ** 2).sum(1), ((df @ T.T) ** 2).sum(1),
                                   rtol=1e-3, atol=1e-9)
    # values: |T dv|^2 is proportional to sum over the group's query heads of |W_o,h dv|^2
    wo = tiny.model.layers[1].self_attn.o_proj.weight.detach().double()
    T = metrics[(1, "v")].double()
    ratios = []
    for _ in range(5):
        dv = torch.randn(16, generator=g, dtype=torch.float64)
        direct = sum(float((wo[:, h * 16:(h + 1) * 16] @ dv).pow(2).sum()) for h in (0, 1))  # group 0
        full = torch.zeros(32, dtype=torch.float64)
        full[:16] = dv
        ratios.append(float((T @ full).pow(2).sum()) / direct)
    assert max(ratios) / min(ratios) < 1.01


# --- the page store behind the storage tier -----------------------------------------------------


def _page(seed, n=24):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(2, n, 16, generator=g) for _ in range(2)],
            [torch.randn(2, n, 16, generator=g) for _ in range(2)])


@pytest.mark.parametrize("on_disk", [False, True])
def test_store_concurrent_put_and_get_lose_nothing(tiny_cal, tmp_path, on_disk):
    import threading

    from kvsqueeze.methods.kvtc.store import KVTCStore, pack_page, unpack_page

    store = KVTCStore(tiny_cal, 4.0, directory=tmp_path / "s" if on_disk else None)
    # what each page must decode to: the page codec on its own, single-threaded
    want = {}
    for i in range(24):
        k, v = _page(i)
        want[f"p{i}"] = unpack_page(tiny_cal, pack_page(tiny_cal, k, v, 24 * i, 4.0))
    errors = []

    def worker(ids):
        try:
            for i in ids:
                k, v = _page(i)
                assert store.put(f"p{i}", k, v, 24 * i)
                got = store.get(f"p{i}")
                assert got is not None and got[2] == 24 * i
                for a, b in zip(got[0] + got[1], want[f"p{i}"][0] + want[f"p{i}"][1]):
                    assert torch.equal(a, b)
        except Exception as exc:  # collected: assertion errors in threads do not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=([j for j in range(24) if j % 3 == t] * 2,))
               for t in range(3)] + [threading.Thread(target=worker, args=(list(range(24)),))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    s = store.snapshot()
    assert s["pages_stored"] == 24 and s["pages_held"] == 24 and s["misses"] == 0
    assert s["hits"] == 24 * 2 + 24 and s["ratio"] >= 3.8  # page 0 holds 4 exact sink tokens
    assert store.get("absent") is None and store.snapshot()["misses"] == 1
    if on_disk:  # a restart adopts the files and finds every page again
        again = KVTCStore(tiny_cal, 4.0, directory=tmp_path / "s")
        assert again.snapshot()["pages_held"] == 24 and again.exists("p5")
        got = again.get("p5")
        assert torch.equal(got[0][0], want["p5"][0][0])


def test_store_drops_a_corrupted_page_and_bounds_its_size(tiny_cal, tmp_path):
    from kvsqueeze.methods.kvtc.store import KVTCStore, pack_page

    store = KVTCStore(tiny_cal, 4.0, directory=tmp_path)
    k, v = _page(1)
    store.put("a", k, v, 0)
    path = store._path("a")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    assert store.get("a") is None
    s = store.snapshot()
    assert s["corrupt"] == 1 and s["pages_held"] == 0 and not path.exists()
    one = len(pack_page(tiny_cal, k, v, 0, 4.0))
    small = KVTCStore(tiny_cal, 4.0, capacity_bytes=int(one * 2.5))
    for i in range(5):
        small.put(f"p{i}", *_page(i), position=0)
    s = small.snapshot()
    assert s["pages_held"] == 2 and s["evicted"] == 3 and s["bytes_after"] <= one * 2.5 * 1.1
    assert small.exists("p4") and not small.exists("p0")


def test_a_full_or_read_only_store_directory_stores_nothing_and_keeps_serving(tiny_cal, tmp_path, monkeypatch):
    """A write the directory refuses — really full (its temporary file on /dev/full) or read-only
    (EROFS) — stores nothing, leaves no partial file, is counted, and the store goes on: other pages
    are stored and read back, a refused page is a miss (the engine recomputes it)."""
    import errno
    from pathlib import Path

    from kvsqueeze.methods.kvtc.store import KVTCStore

    store = KVTCStore(tiny_cal, 4.0, directory=tmp_path / "s")
    k, v = _page(2)
    if Path("/dev/full").exists():
        tmp = store._tmp_path(store._path("full"))
        tmp.symlink_to("/dev/full")
        assert store.put("full", k, v, 0) is False
        assert not tmp.exists() and not store._path("full").exists() and not store.exists("full")
        assert store.get("full") is None
    real = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(store._path("ro").name):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    assert store.put_many([("ro", k, v, 0), ("ok", k, v, 16)]) == [False, True]
    ref = KVTCStore(tiny_cal, 4.0)  # the same page through an in-memory store: the same decoded values
    ref.put("ok", k, v, 16)
    assert store.get("ro") is None and torch.equal(store.get("ok")[0][0], ref.get("ok")[0][0])
    s = store.snapshot()
    assert s["write_errors"] == (2 if Path("/dev/full").exists() else 1)
    assert s["pages_held"] == 1 and s["corrupt"] == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [store._path("ok").name]


def test_store_workers_code_what_the_store_codes_in_process_and_survive_their_death(tiny_cal, tmp_path):
    """Pages put and got through two codec processes: the records are the in-process records byte for
    byte, the decoded pages the in-process pages exactly; a corrupted record is a miss, never
    garbage; with the workers killed the store codes in its own process and loses nothing."""
    import os
    import signal

    from kvsqueeze.methods.kvtc.store import KVTCStore

    path = tiny_cal.save(tmp_path / "cal.safetensors")
    pages = [(f"p{i}", *_page(i), 24 * i) for i in range(6)]
    local = KVTCStore(tiny_cal, 4.0)
    assert local.put_many(pages) == [True] * 6
    want = local.get_many([p[0] for p in pages])
    store = KVTCStore(codec.Calibration.load(path), 4.0, workers=2, calibration_path=path,
                      allocation_dir=tmp_path / "alloc")
    try:
        assert store.workers == 2
        store.wait_ready(timeout=300)
        assert store._ready.value == 2  # both processes started and planned before any page
        assert len(list((tmp_path / "alloc").rglob("*"))) > 0  # their plans are cached for the next start
        assert store.put_many(pages) == [True] * 6
        for key, *_ in pages:
            assert store._index[key][2] == local._index[key][2]
        got = store.get_many([p[0] for p in pages] + ["absent"])
        assert got[-1] is None
        for g, w in zip(got, want):
            assert g[2] == w[2] and all(torch.equal(a, b) for a, b in zip(g[0] + g[1], w[0] + w[1]))
        before, after, record = store._index["p3"]
        bad = bytearray(record)
        bad[len(bad) // 2] ^= 0x10
        store._index["p3"] = (before, after, bytes(bad))
        got = store.get_many(["p2", "p3", "p4"])
        assert got[1] is None and got[0] is not None and got[2] is not None
        s = store.snapshot()
        assert s["corrupt"] == 1 and s["hits"] == 6 + 2 and s["misses"] == 2 and not store.exists("p3")
        for pid in list(store._pool._processes):
            os.kill(pid, signal.SIGKILL)
        got = store.get_many(["p1", "p5"])  # the pool is found dead: decoded here instead
        assert store.workers == 0
        assert all(torch.equal(a, b) for a, b in zip(got[1][0], want[5][0]))
        assert store.put_many([pages[3]]) == [True] and store.get("p3") is not None
    finally:
        store.close()
    with pytest.raises(KvsqueezeError, match="calibration_path"):
        KVTCStore(tiny_cal, 4.0, workers=1)
    with pytest.raises(KvsqueezeError, match="workers"):
        KVTCStore(tiny_cal, 4.0, workers=-1)


def test_allocation_cache_reuses_plans_and_ignores_a_damaged_file(tiny_cal, tmp_path):
    """A plan is solved once and loaded by another process's calibration; a cache file that does not
    verify (damaged) is solved again, giving the same plan as solving from scratch."""
    fresh = _same_calibration(tiny_cal, tmp_path)
    fresh.use_allocation_cache(tmp_path / "alloc")
    plan = fresh.allocation(4.3)
    (file,) = list((tmp_path / "alloc").rglob("*.npz"))
    other = _same_calibration(tiny_cal, tmp_path)
    other.use_allocation_cache(tmp_path / "alloc")
    assert other._load_allocation(4.3) is not None
    assert codec.allocation_id(other.allocation(4.3)) == codec.allocation_id(plan)
    with np.load(file) as f:
        arrays = {n: f[n] for n in f.files}
    name = next(n for n in arrays if n != "id")
    arrays[name] = (arrays[name] + 1) % codec.N_OPTIONS  # a different plan under the old id
    np.savez(file, **arrays)
    third = _same_calibration(tiny_cal, tmp_path)
    third.use_allocation_cache(tmp_path / "alloc")
    assert third._load_allocation(4.3) is None
    assert codec.allocation_id(third.allocation(4.3)) == codec.allocation_id(plan)
    file.write_bytes(b"not an npz")
    fourth = _same_calibration(tiny_cal, tmp_path)
    fourth.use_allocation_cache(tmp_path / "alloc")
    assert fourth._load_allocation(4.3) is None
    assert codec.allocation_id(fourth.allocation(4.3)) == codec.allocation_id(plan)


def _same_calibration(cal, tmp_path):
    """A new Calibration object with the same content (nothing planned yet)."""
    return codec.Calibration.load(cal.save(tmp_path / "same.safetensors"))


def test_batched_float32_synthesis_equals_the_per_layer_float64_path(tiny_cal):
    """decode's one batched float32 product over all layers gives what from_coefficients gives
    layer by layer in float64 (to float32 rounding), keys with their RoPE back."""
    assert codec._stacked_synthesis(tiny_cal) is not None  # one PCA group per (layer, kind)
    k, v = _page(3, n=40)
    blob = codec.encode(tiny_cal, k, v, 17, 4.0)
    keys, values = codec.decode(tiny_cal, blob)
    header, offset = codec._parse(blob.data)
    alloc = tiny_cal.allocation(header["ratio"])
    cos, sin = codec.rope_cos_sin(tiny_cal.rope_inv_freq, tiny_cal.rope_scaling, torch.arange(17, 57))
    words = np.frombuffer(blob.data, dtype="<u4", offset=offset, count=sum(header["streams"]))
    at, idx = 0, 0
    for layer in range(tiny_cal.n_layers):
        for kind, got in (("k", keys[layer]), ("v", values[layer])):
            n = header["streams"][idx]
            q = codec.decode_codes(words[at:at + n].astype(np.uint32), 40, tiny_cal, layer, kind,
                                   alloc[(layer, kind)])
            at, idx = at + n, idx + 1
            want = codec.from_coefficients(tiny_cal, layer, kind, codec.dequantize(q, alloc[(layer, kind)]),
                                           cos, sin)
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_encoding_is_deterministic_whatever_was_encoded_before(tiny_cal):
    k, v = _page(7)
    first = codec.encode(tiny_cal, k, v, 3, 5.0).data
    for i in range(3):  # other pages, other ratios: warm caches must not change the result
        codec.encode(tiny_cal, *_page(100 + i), 0, 5.0 + i)
    assert codec.encode(tiny_cal, k, v, 3, 5.0).data == first


def test_page_records_keep_the_sinks_exact_and_reject_damage(tiny_cal):
    from kvsqueeze.methods.kvtc.store import pack_page, unpack_page

    k, v = _page(3)
    rec = pack_page(tiny_cal, k, v, 0, 6.0, sinks=4)
    dk, dv, pos = unpack_page(tiny_cal, rec)
    assert pos == 0
    for a, b in zip(dk + dv, k + v):
        assert a.shape == b.shape and torch.equal(a[:, :4], b[:, :4]) and not torch.equal(a[:, 4:], b[:, 4:])
    later = unpack_page(tiny_cal, pack_page(tiny_cal, k, v, 40, 6.0, sinks=4))
    assert later[2] == 40 and not torch.equal(later[0][0][:, :4], k[0][:, :4])  # no sinks past position 4
    for bad in (rec[:10], rec[:-1], rec[:30] + bytes([rec[30] ^ 1]) + rec[31:], b"XXXX" + rec[4:]):
        with pytest.raises(codec.BlobError):
            unpack_page(tiny_cal, bad)


def test_sensitivity_split_follows_the_weights_and_respects_the_total():
    rng = np.random.default_rng(0)
    n, n_opt = 20, 8
    cost = np.concatenate([np.zeros((n, 1), int), np.cumsum(rng.integers(1, 4, (n, n_opt - 1)), 1)], 1)
    dist = np.sort(rng.random((n, n_opt)) * 10, axis=1)[:, ::-1].copy()
    dist[:, 0] = 12.0
    tables = {"light": (dist * 1.0, cost), "heavy": (dist * 50.0, cost), "dead": (dist * 0.0, cost)}
    total = int(cost[:, -1].sum() * 1.3)  # room for all of heavy and part of light
    budgets = codec.split_budget(tables, total)
    assert sum(budgets.values()) <= total
    assert budgets["heavy"] > budgets["light"] > budgets["dead"]
    assert budgets["dead"] == 0


def test_a_store_without_workers_plans_its_allocations_when_asked_to_be_ready(tiny_cal):
    """wait_ready without worker processes plans, in this process, every plan rate control visits
    first (the same list the workers plan as they start)."""
    from kvsqueeze.methods.kvtc.store import KVTCStore, warm_plans

    store = KVTCStore(tiny_cal, 4.0)
    asked = []
    real = store.cal.allocation
    store.cal.allocation = lambda plan: asked.append(plan) or real(plan)
    try:
        assert store.wait_ready() >= 0.0
    finally:
        del store.cal.allocation
    assert asked == warm_plans(4.0) and len(asked) > 1
