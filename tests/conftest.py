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
