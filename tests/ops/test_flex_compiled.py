"""flex_attention compiled by torch.compile (the fused kernel the GPU path runs) states the same
masks as sdpa's explicit mask: block_causal over packed documents with padding, and the two-stream block-diffusion rows. On CPU inductor compiles flex forward only, so
only the forward is compared.

Noticed on torch 2.13 CPU: with a 24-token row the compiled kernel returned wrong values and NaNs
(64- and 200-token rows are exact), one reason the CPU path runs flex uncompiled by default."""
import pytest
import torch

from veomni.ops.attention import AttnMeta, attention, flex_attention

S = 64


def _meta(mode, two_stream=False):
    b, idx = 2, torch.arange(S)
    clean = None
    if two_stream:  # [x_t ; x_0] of one 32-token document per row
        pos = (idx % (S // 2))[None].repeat(b, 1)
        seg = valid = None
        clean = (idx >= S // 2)[None].repeat(b, 1)
    else:  # two packed documents; the first row ends in 5 padding tokens
        seg = torch.ones(b, S, dtype=torch.long)
        seg[:, 27:] = 2
        seg[0, -5:] = 0
        pos = torch.where(seg == 2, idx - 27, idx)
        valid = seg > 0
    return AttnMeta(mode=mode, block_size=4, q_idx=idx, k_idx=idx, q_pos=pos, k_pos=pos, k_valid=valid,
                    q_seg=seg, k_seg=seg, q_clean=clean, k_clean=clean)


@pytest.mark.parametrize("mode,two_stream", [("block_causal", False), ("block_causal", True)])
def test_compiled_flex_equals_sdpa(mode, two_stream):
    torch.manual_seed(0)
    q = torch.randn(2, 4, S, 16)
    k, v = torch.randn(2, 2, S, 16), torch.randn(2, 2, S, 16)  # grouped-query: 2 kv heads
    meta = _meta(mode, two_stream)
    ref = attention(q, k, v, meta, "sdpa", 0.25)
    out = flex_attention(q, k, v, meta, 0.25, compiled=True)
    real = meta.q_seg > 0 if meta.q_seg is not None else torch.ones(2, S, dtype=torch.bool)
    # Padding queries see no key: sdpa's empty-row fix and flex's zeros differ there, and nobody reads them.
    torch.testing.assert_close(out.transpose(1, 2)[real], ref.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
