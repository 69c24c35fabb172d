"""FLOPs of a dense decoder, for MFU.

Matmul FLOPs per token for a forward+backward are 6 x (parameters touched by matmuls); attention
scores and the weighted sum add 12 x len^2 x head_dim x heads x layers per sequence (forward 4,
backward 8). Bidirectional attention computes the full square; a causal kernel skips half of it, so
causal counts half (PaLM's appendix counts the full square for both; we count what the kernel does).
The LM head is counted only for the positions that have a loss (the diffusion loss computes the
head at masked positions only), which is what makes the figure a *true* MFU.
"""
from __future__ import annotations

from typing import Iterable


def dense_decoder_dims(config) -> dict:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    attn = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
    mlp = 3 * h * i
    return dict(layers=layers, heads=heads, head_dim=head_dim, body_params=layers * (attn + mlp),
                head_params=h * config.vocab_size)


def dense_decoder_flops(config, seq_lens: Iterable[int], head_tokens: int | None = None,
                        attn_mode: str = "bidirectional", backward: bool = True) -> float:
    """FLOPs of one forward (+backward) over documents of lengths `seq_lens`.

    head_tokens: positions where the LM head runs (default: every token).
    """
    d = dense_decoder_dims(config)
    seq_lens = list(seq_lens)
    tokens = sum(seq_lens)
    head_tokens = tokens if head_tokens is None else head_tokens
    mult = 6 if backward else 2
    matmul = mult * d["body_params"] * tokens + mult * d["head_params"] * head_tokens
    attn_frac = 0.5 if attn_mode == "causal" else 1.0
    attn = (mult * 2) * sum(n * n for n in seq_lens) * d["head_dim"] * d["heads"] * d["layers"] * attn_frac
    return float(matmul + attn)
