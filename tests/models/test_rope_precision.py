"""RoPE angles stay fp32 inside a bf16 autocast region (DDP / single-process bf16 training)."""
import math

import pytest
import torch

from tests.models.tiny import tiny_config
from veomni.models.transformers.dense_decoder import RotaryEmbedding


def _exact(inv_freq: torch.Tensor, positions: torch.Tensor):
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("device_type", ["cpu"])
def test_rope_angles_are_fp32_under_bf16_autocast(device_type):
    cfg = tiny_config("llama")
    rope = RotaryEmbedding(cfg, head_dim=8)
    positions = torch.arange(2048)
    x = torch.zeros(1, 2048, 48)  # fp32 activations, as under autocast with fp32 master weights
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        cos, sin = rope(x, positions[None])
    ref_cos, ref_sin = _exact(rope.inv_freq, positions)
    assert cos.dtype == torch.float32
    # fp32 angles at position 2047 carry ~2047 * 2^-24 rad of error; bf16 angles were off by ~2.
    err = max((cos[0].double() - ref_cos).abs().max().item(), (sin[0].double() - ref_sin).abs().max().item())
    assert err < 1e-3, f"cos/sin error {err} under autocast"
    assert math.isfinite(err)


def test_rope_matches_plain_fp32_outside_autocast():
    cfg = tiny_config("llama")
    rope = RotaryEmbedding(cfg, head_dim=8)
    positions = torch.arange(512)[None]
    x = torch.zeros(1, 512, 48)
    cos, sin = rope(x, positions)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        cos_ac, sin_ac = rope(x, positions)
    assert torch.equal(cos, cos_ac) and torch.equal(sin, sin_ac)
