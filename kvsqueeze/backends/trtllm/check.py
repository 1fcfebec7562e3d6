"""GPU check of the TensorRT-LLM adapter: each method against the dense engine on one small model.

Run on a CUDA machine with TensorRT-LLM installed (``scripts/check_trtllm_gpu.sh`` or the
``docker/trtllm-gpu.Dockerfile`` image)::

    python -m kvsqueeze.backends.trtllm.check [--model PATH] [--calibration FILE] [--ratio 8]

- dense: greedy outputs of the plain engine (the reference);
- kvtc (connector): a first engine with the KVTC connector stores the prompts' full blocks (its
  outputs must equal dense: storing changes nothing), a second engine restores them from the store
  (outputs compared token by token with dense; the restored share of prompt blocks is printed);
- dms: the shipped 4x gates exported for TensorRT-LLM (``dms.export_checkpoint``), served by the
  registered ``KvsqueezeDMSLlamaForCausalLM`` on the VANILLA backend; its greedy tokens are compared
  with kvsqueeze's reference DMS inference on Hugging Face (``DMSMethod.greedy``) on the same prompts
  (bf16 engine vs float32 reference: agreement, not identity, is printed; passes at >= 0.9);
- fusion: ``fusion.install()`` then the FLASHINFER backend; with threshold 1.0 (only exact duplicates
  fuse) outputs must equal dense; at 0.9 the token agreement with dense is printed.

Exit status 0 when every method passes; 1 otherwise; 2 when TensorRT-LLM or CUDA is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "A hash table stores key-value pairs. To look up a key, the table first",
    "Photosynthesis converts light energy into chemical energy. In the first stage,",
    "The passkey is 48213. Remember it. Some filler text follows here. What is the passkey? It is",
]


def main(argv=None) -> int:  # pragma: no cover - needs a GPU and TensorRT-LLM
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--ratio", type=float, default=8.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args(argv)
    from kvsqueeze.backends.trtllm import version
    from kvsqueeze.errors import KvsqueezeError

    try:
        import torch

        if version() is None or not torch.cuda.is_available():
            print("check_trtllm_gpu: needs TensorRT-LLM and a CUDA GPU; found "
                  f"tensorrt_llm={version()}, cuda={torch.cuda.is_available()}", file=sys.stderr)
            return 2
        from tensorrt_llm import LLM, SamplingParams
        from tensorrt_llm.llmapi.llm_args import KvCacheConfig, KvCacheConnectorConfig

        from kvsqueeze.model import resolve_model

        model = str(resolve_model(a.model))
        cal = a.calibration or _default_calibration(model)
        params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0)
        kv = KvCacheConfig(enable_block_reuse=False, free_gpu_memory_fraction=0.3)
        dense = _run(LLM(model=model, backend="pytorch", kv_cache_config=kv), PROMPTS, params)
        print(f"dense: {len(dense)} prompts")
        store = tempfile.mkdtemp(prefix="kvsqueeze-trtllm-kvtc-")
        os.environ.update(KVSQUEEZE_KVTC_CALIBRATION=cal, KVSQUEEZE_KVTC_DIR=store,
                          KVSQUEEZE_KVTC_RATIO=str(a.ratio))
        conn = KvCacheConnectorConfig(connector_module="kvsqueeze.backends.trtllm.kvtc_connector",
                                      connector_scheduler_class="KVTCConnectorLeader",
                                      connector_worker_class="KVTCConnectorWorker")
        first = _run(LLM(model=model, backend="pytorch", kv_cache_config=kv, cuda_graph_config=None,
                         kv_connector_config=conn), PROMPTS, params)
        second = _run(LLM(model=model, backend="pytorch", kv_cache_config=kv, cuda_graph_config=None,
                          kv_connector_config=conn), PROMPTS, params)
        ok = first == dense
        agree = [sum(x == y for x, y in zip(d, s)) / max(len(d), 1) for d, s in zip(dense, second)]
        stored = len([f for f in os.listdir(store) if f.endswith(".kvtc")])
        print(f"kvtc connector: storing run identical to dense: {ok}; restored run token agreement "
              f"with dense per prompt: {[round(x, 3) for x in agree]}; {stored} blocks stored "
              f"at ratio {a.ratio:g}")
        ok_dms = _check_dms(model, params, a.max_tokens)
        ok_fusion = _check_fusion(model, params, kv, dense)
        return 0 if ok and stored > 0 and ok_dms and ok_fusion else 1
    except KvsqueezeError as e:
        print(f"check_trtllm_gpu: {e}", file=sys.stderr)
        return 2


def _check_dms(model: str, params, max_tokens: int) -> bool:  # pragma: no cover
    import torch
    from tensorrt_llm import LLM
    from tensorrt_llm.llmapi.llm_args import KvCacheConfig

    from kvsqueeze.backends.trtllm import dms as tdms
    from kvsqueeze.methods.dms.checkpoint import load_gates
    from kvsqueeze.methods.dms.method import DMSMethod
    from kvsqueeze.model import load_hf

    tok, hf = load_hf(model)
    method = DMSMethod(ratio=4)
    out = tdms.export_checkpoint(model, load_gates(method.checkpoint, hf),
                                 tempfile.mkdtemp(prefix="kvsqueeze-trtllm-dms-") + "/ckpt")
    tdms.register()
    ok, why = tdms.reclaim_support(__import__("kvsqueeze.backends.trtllm", fromlist=["version"]).version())
    print(f"dms: memory reclaim {'available' if ok else 'not available'}: {why}")
    engine = _run(LLM(model=str(out), backend="pytorch", attn_backend="VANILLA", cuda_graph_config=None,
                      kv_cache_config=KvCacheConfig(enable_block_reuse=False, free_gpu_memory_fraction=0.3)),
                  PROMPTS, params)
    ref = [method.greedy(hf, torch.tensor(tok(p)["input_ids"]), max_tokens)[0] for p in PROMPTS]
    agree = [sum(x == y for x, y in zip(e, r)) / max(len(r), 1) for e, r in zip(engine, ref)]
    mean = sum(agree) / len(agree)
    print(f"dms (4x shipped gates, VANILLA): token agreement with the HF reference DMS per prompt "
          f"{[round(x, 3) for x in agree]}, mean {mean:.3f}")
    return mean >= 0.9


def _check_fusion(model: str, params, kv, dense) -> bool:  # pragma: no cover
    from tensorrt_llm import LLM

    from kvsqueeze.backends.trtllm import fusion as tf

    tf.install()
    results = {}
    for threshold in ("1.0", "0.9"):
        os.environ[tf.CONFIG_ENV] = tf.FusionConfig(threshold=float(threshold)).to_json()
        results[threshold] = _run(LLM(model=model, backend="pytorch", attn_backend="FLASHINFER",
                                      kv_cache_config=kv, cuda_graph_config=None), PROMPTS, params)
    same = results["1.0"] == dense
    agree = [sum(x == y for x, y in zip(d, f)) / max(len(d), 1) for d, f in zip(dense, results["0.9"])]
    print(f"fusion (FLASHINFER): threshold 1.0 identical to dense: {same}; threshold 0.9 token "
          f"agreement with dense per prompt {[round(x, 3) for x in agree]}")
    return same


def _run(llm, prompts, params):  # pragma: no cover
    outs = llm.generate(prompts, params)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    llm.shutdown()
    return tokens


def _default_calibration(model: str) -> str:  # pragma: no cover
    from kvsqueeze.methods.kvtc.calibrate import calibration_for
    from kvsqueeze.model import load_hf

    tok, hf = load_hf(model)
    return str(calibration_for(hf, tok))


if __name__ == "__main__":
    raise SystemExit(main())
