"""DMS inside a real SGLang server (CPU, embedded model, shipped gates): the gates run in SGLang's model,
the ``dms`` attention backend obeys their decisions, and greedy outputs match the reference DMS
inference (``DMSMethod.greedy``: the Hugging Face model on the reference cache that really drops
tokens per head)."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest
import torch

from kvsqueeze import corpus
from kvsqueeze.backends.sglang.server import SGLangServer, free_port
from kvsqueeze.methods.dms import GATES_FILE, DMSMethod, load_gates, shipped_gates_dir
from kvsqueeze.model import resolve_model

pytestmark = pytest.mark.slow
NEW = 16
DMS_ARGS = ["--attention-backend", "dms", "--chunked-prefill-size", "-1", "--mem-fraction-static", "0.8"]


def post(url, payload, timeout=300):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def serve_outputs(tmp_path_factory, name, prompts, env=None, dms=False):
    log = tmp_path_factory.mktemp(name) / "server.log"
    args = ["--disable-radix-cache"] + (DMS_ARGS if dms else [])
    srv = SGLangServer(model=resolve_model(None), port=free_port(), log_path=log, env=env or {},
                       extra_args=args).start_and_wait(timeout=400)
    try:
        return [post(srv.url + "/generate", {"input_ids": p, "sampling_params": {
            "max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}})["text"] for p in prompts]
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def prompts(embedded):
    _, tok, _ = embedded
    segs = corpus.token_segments(corpus.heldout_documents(), tok, 400, 10, what="held-out text")
    return [list(w) for _, w in segs]  # 400 tokens: far past the 64-token window


@pytest.fixture(scope="module")
def vanilla(tmp_path_factory, prompts):
    return serve_outputs(tmp_path_factory, "vanilla", prompts)


@pytest.mark.parametrize("ratio", [4, 8])
def test_sglang_dms_matches_the_reference_dms_inference(tmp_path_factory, embedded, prompts, vanilla,
                                                        ratio):
    _, tok, model = embedded
    d = shipped_gates_dir(ratio)
    method = DMSMethod(checkpoint=str(d))
    ref = []
    for p in prompts:
        toks, _ = method.greedy(model, torch.tensor(p), NEW)
        ref.append(tok.decode(toks))
    method.unbind(model)
    got = serve_outputs(tmp_path_factory, f"dms{ratio}", prompts, {"KVSQUEEZE_DMS": str(d)}, dms=True)
    same = sum(a == b for a, b in zip(got, ref))
    differ = sum(a != b for a, b in zip(got, vanilla))
    print(f"DMS {ratio}x in SGLang: {same}/{len(got)} greedy outputs identical to the reference DMS "
          f"inference, {differ}/{len(got)} differ from vanilla SGLang")
    assert same >= 9, list(zip(got, ref))  # >= 90% token-identical
    # eviction is really applied: the dense model's continuations differ
    assert differ >= 5, list(zip(got, vanilla))


def test_gates_that_never_evict_give_the_vanilla_outputs(tmp_path_factory, embedded, prompts, vanilla):
    from safetensors.torch import save_file

    _, _, model = embedded
    d = tmp_path_factory.mktemp("zero-gates")
    src = shipped_gates_dir(4)
    shutil.copy(src / "dms_config.json", d / "dms_config.json")
    gates = load_gates(src, model)
    save_file({k: torch.zeros_like(v) if k.endswith("dms_proj_alpha.weight") else v.contiguous()
               for k, v in gates.state_dict().items()}, str(d / GATES_FILE))  # logit = -5: keep all
    got = serve_outputs(tmp_path_factory, "dms0", prompts, {"KVSQUEEZE_DMS": str(d)}, dms=True)
    assert got == vanilla
