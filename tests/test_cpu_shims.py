"""kvsqueeze's CPU shims for SGLang, against plain references."""

import torch

from kvsqueeze.backends.sglang.cpu_shims import transfer_kv_direct


def test_transfer_kv_direct_copies_the_indexed_rows_of_every_layer():
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(40, 3, 8, generator=g) for _ in range(4)]
    dst = [torch.zeros(64, 3, 8) for _ in range(4)]
    si = torch.tensor([5, 6, 7, 8, 20, 21, 22, 23])
    di = torch.tensor([32, 33, 34, 35, 0, 1, 2, 3])
    transfer_kv_direct(src, dst, si, di, page_size=4)
    for s, d in zip(src, dst):
        want = torch.zeros(64, 3, 8)
        for a, b in zip(si.tolist(), di.tolist()):  # the reference: one row at a time
            want[b] = s[a]
        assert torch.equal(d, want)


def test_transfer_kv_direct_rejects_mismatched_arguments():
    import pytest

    with pytest.raises(ValueError):
        transfer_kv_direct([torch.zeros(2, 1)], [], torch.tensor([0]), torch.tensor([0]), 1)
    with pytest.raises(ValueError):
        transfer_kv_direct([torch.zeros(2, 1)], [torch.zeros(2, 1)], torch.tensor([0, 1]), torch.tensor([0]), 1)
