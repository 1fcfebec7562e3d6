"""The DMS gates shipped in the package, on the embedded model."""

import pytest
import torch

from kvsqueeze.corpus import heldout_documents, token_segments


@pytest.mark.parametrize("ratio", [4, 8])
def test_shipped_dms_gates_reach_their_ratio(embedded, ratio):
    """The DMS gates shipped for the embedded model hold ~1/ratio of a 1024-token prefix."""
    from kvsqueeze.methods import create

    _, tok, model = embedded
    [(_, ids)] = token_segments(heldout_documents(), tok, 1024 + 9, 1)
    ids = torch.tensor(ids)
    method = create("dms", ratio)
    try:
        _, held, achieved, _ = method.run_segment(model, ids[:1024], ids[1024:-1])
    finally:
        method.unbind(model)
    assert achieved == pytest.approx(ratio, rel=0.10)
    assert held == pytest.approx(1 / achieved)
