import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded():
    """The embedded model (materialised once) loaded with kvsqueeze's attention."""
    from kvsqueeze.model import load_hf, resolve_model

    path = resolve_model(None)
    tok, model = load_hf(path)
    return path, tok, model


@pytest.fixture(scope="session")
def small_model(tmp_path_factory, embedded):
    """A 3-layer random Llama (9 query and 3 KV heads of 16 dims, as the embedded model's head
    layout) with the embedded model's tokenizer, saved as a Hugging Face checkpoint: for tests of
    training and warm-start mechanics that do not depend on the trained weights (seconds instead
    of minutes per run on the 30-layer model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok, model = embedded
    c = model.config
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=144, intermediate_size=256,
                      num_hidden_layers=3, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=2048, bos_token_id=c.bos_token_id,
                      eos_token_id=c.eos_token_id, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("small-model")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def embedded_slice(tmp_path_factory, embedded):
    """The embedded model's first 6 layers (its own weights and tokenizer), saved as a Hugging Face
    checkpoint: real attention patterns at a fifth of the cost, for tests of training runs."""
    import copy

    import torch

    path, tok, model = embedded
    m = copy.deepcopy(model)
    m.model.layers = torch.nn.ModuleList(list(m.model.layers)[:6])
    m.config.num_hidden_layers = 6
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = m.config.layer_types[:6]
    d = tmp_path_factory.mktemp("embedded-slice")
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def embedded_kvtc_calibration(tmp_path_factory, embedded):
    """A quick KVTC calibration of the embedded model (about a minute), made once for the session
    and saved: ``(calibration, path)``."""
    from kvsqueeze import corpus
    from kvsqueeze.methods.kvtc import calibrate as kvtc

    _, tok, model = embedded
    cal = kvtc.calibrate(model, tok, corpus.calibration_documents(max_chars=300_000), seq_len=512,
                         segments=4, tune=False, sample_tokens=1024)
    path = tmp_path_factory.mktemp("kvtc-cal") / "cal.safetensors"
    cal.save(path)
    return cal, path


def tiny_llama(layers: int = 2, max_positions: int = 256, seed: int = 0):
    """A small random Llama (vocabulary 97, 4 query and 2 KV heads of 16 dims) with kvsqueeze's
    attention: independent of the embedded weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvsqueeze.attention import ATTN_IMPL, register

    register()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
    cfg._attn_implementation = ATTN_IMPL
    return LlamaForCausalLM(cfg).eval()


BAD_PROMPTS = (  # requests that used to stop the server (the scheduler's prefill of nothing)
    ({"text": ""}, "the prompt is empty"),
    ({"text": "  \n\t "}, "only whitespace"),
    ({"input_ids": []}, "empty"),  # SGLang's own check answers first: "input_ids cannot be empty."
    ({"input_ids": [1, 10 ** 8]}, "expected a token id in [0,"),
    ({"input_ids": [-4, 2]}, "expected a token id in [0,"),
)


def refuses_bad_prompts_and_answers_the_next(url: str) -> None:
    """Each request of BAD_PROMPTS gets HTTP 400 with the reason; the server then answers a normal one."""
    import json
    import urllib.error
    import urllib.request

    def post(payload):
        req = urllib.request.Request(url + "/generate", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    for body, reason in BAD_PROMPTS:
        status, text = post({**body, "sampling_params": {"max_new_tokens": 4}})
        assert status == 400 and reason in text, (body, status, text)
    status, text = post({"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4,
                                                                                  "temperature": 0}})
    assert status == 200 and json.loads(text)["meta_info"]["completion_tokens"] >= 1, text
