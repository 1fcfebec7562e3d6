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
