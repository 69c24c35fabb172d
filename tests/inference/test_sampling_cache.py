"""WindowedKVCache: a row writes only inside its own window; storage is in place and sync-free."""
import pytest
import torch

from veomni.diffusion.sampling.cache import WindowedKVCache


def test_rows_write_only_inside_their_window():
    cache = WindowedKVCache(capacity=6)
    first = torch.randn(2, 1, 6, 3)
    cache.begin(0, 6, None, None)
    k, _ = cache.update(0, first, first, torch.arange(6))
    assert torch.equal(k, first) and cache.get_seq_length() == 6

    new = torch.randn(2, 1, 3, 3)
    cache.begin(2, 5, lo=torch.tensor([2, 4]), hi=torch.tensor([5, 5]))
    k, v = cache.update(0, new, new, torch.arange(2, 5))
    assert torch.equal(k[0, :, 2:5], new[0])  # row 0: whole slice inside its window
    assert torch.equal(k[1, :, 2:4], first[1, :, 2:4])  # row 1: outside its window, old kept
    assert torch.equal(k[1, :, 4], new[1, :, 2])
    assert torch.equal(k[:, :, :2], first[:, :, :2]) and torch.equal(k[:, :, 5], first[:, :, 5])


def test_growth_and_errors():
    cache = WindowedKVCache(capacity=8)
    a = torch.randn(1, 2, 3, 4)
    cache.begin(0, 3, None, None)
    cache.update(0, a, a, torch.arange(3))
    b = torch.randn(1, 2, 2, 4)
    # a row whose window excludes brand-new indices still gets them written (nothing old to keep)
    cache.begin(3, 5, lo=torch.tensor([9]), hi=torch.tensor([9]))
    k, _ = cache.update(0, b, b, torch.arange(3, 5))
    assert k.shape[2] == 5 and torch.equal(k[:, :, 3:], b)
    with pytest.raises(RuntimeError, match="gap"):
        cache.begin(6, 7, None, None)
    fresh = WindowedKVCache(capacity=4)
    with pytest.raises(RuntimeError, match="begin"):
        fresh.update(0, a, a, torch.arange(3))
