"""Compiled decoding (infer.compile=true): torch.compile of the model's forward for the samplers.

    compile_for_decoding(model)     in place; every sampler then calls the compiled forward.

On CUDA it compiles with mode="reduce-overhead" (CUDA graphs: one replay per forward instead of
hundreds of kernel launches, the cost that made a 135M-0.5B forward ~22 ms at batch 1 whatever
its length); on CPU it compiles with inductor's default mode (fused C++ kernels).

Why the shapes stay static enough for CUDA graphs:
  - without a cache every step re-runs the whole fixed-length canvas [B, T]: one shape per call;
  - with a cache the samplers' WindowedKVCache (veomni/diffusion/sampling/cache.py) preallocates
    its storage for the whole row (capacity T) and writes in place. Prefix and dual caches refresh
    [0, T) at the first step of every block, so keys always span the whole row; the dual cache's
    other steps forward one decode block: two query shapes per generate call in all. (The prefix
    cache forwards [block_start, T), one shape per block; the block cache's key length grows per
    block: each new shape compiles once, dynamo then marks the size dynamic.)
  - the first forward of every cache runs eagerly: it allocates the cache's storage outside the
    compiled graph, so later forwards receive it as an input and write into it in place. (Storage
    allocated inside a CUDA graph would live in the graph's memory pool and be overwritten by the
    next replay.) On CUDA the storage is marked as a static address, so the graphs write into it
    instead of copying it in and out every replay.

Tokens equal eager decoding's whenever the logits' argmax/top choices do not hinge on the last
bits (tests/inference/test_sampling_compile.py checks exact tokens on a tiny model).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


def _cache_tensors(cache):
    tensors = [t for t in (cache.positions, cache.valid) if t is not None]
    tensors += [t for t in cache.keys + cache.values if t is not None]
    return tensors + list(cache.extra.values())


def compile_for_decoding(model: nn.Module, mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
    """Replace `model.forward` by a compiled one (idempotent); returns the model.

    mode None: "reduce-overhead" on CUDA, inductor's default elsewhere."""
    if getattr(model, "_veomni_decode_compiled", False):
        return model
    device = next(model.parameters()).device
    if mode is None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    eager = model.forward
    compiled = torch.compile(eager, mode=mode, **compile_kwargs)

    def forward(*args, past_key_values=None, **kwargs):
        if past_key_values is not None and not past_key_values.keys and not past_key_values.extra:
            out = eager(*args, past_key_values=past_key_values, **kwargs)  # allocates the storage
            if device.type == "cuda":
                for t in _cache_tensors(past_key_values):
                    torch._dynamo.mark_static_address(t)
            return out
        return compiled(*args, past_key_values=past_key_values, **kwargs)

    model.forward = forward
    model._veomni_decode_compiled = True
    model._veomni_eager_forward = eager
    logger.info("decoding: model forward compiled (torch.compile mode=%s); the first steps compile", mode)
    return model
