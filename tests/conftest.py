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
