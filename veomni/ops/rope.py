"""RoPE behind `model.ops.rope`: eager (the reference) | triton (ours) | liger.

q/k [B, H, S, D]; cos/sin [B, S, R] from the model's RotaryEmbedding (HF's rotate-half layout,
cos = cat(freqs, freqs)). R < D is partial rotary (Qwen3.5): the first R dims rotate, the rest pass
through. liger cannot rotate part of a head; the registry refuses that pairing at install.
"""
from __future__ import annotations

import torch

ROPE_IMPLS = ("eager", "triton", "liger")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_eager(q, k, cos, sin):
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    r = cos.shape[-1]
    if r < q.shape[-1]:
        (q, q_pass), (k, k_pass) = q.split([r, q.shape[-1] - r], -1), k.split([r, k.shape[-1] - r], -1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        return torch.cat([q, q_pass], -1), torch.cat([k, k_pass], -1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rope(q, k, cos, sin, impl: str = "eager"):
    """(q, k) rotated by cos/sin; see the module docstring for the shapes."""
    if impl == "eager":
        return apply_rope_eager(q, k, cos, sin)
    if impl == "triton":
        from veomni.ops.triton.rope import triton_rope

        return triton_rope(q, k, cos, sin)
    if impl == "liger":
        if cos.shape[-1] != q.shape[-1]:
            raise ValueError(f"model.ops.rope=liger rotates whole heads; this model rotates {cos.shape[-1]} of "
                             f"{q.shape[-1]} dims (partial rotary): use model.ops.rope=triton or eager")
        from veomni.ops.liger import liger_rope

        return liger_rope(q, k, cos, sin)
    raise ValueError(f"rope impl={impl!r} is not one of {ROPE_IMPLS}")
