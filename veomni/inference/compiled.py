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
    next replay.) The storage is then swapped for pooled tensors reused by later generate calls
    (`_StoragePool`); on CUDA they are marked as static addresses, so the graphs write into them
    in place (a mutated non-static input would turn CUDA graphs off for that graph) and the same
    addresses come back every call (a new address would make the graphs record again).

Tokens equal eager decoding's whenever the logits' argmax/top choices do not hinge on the last
bits (tests/inference/test_sampling_compile.py checks exact tokens on a tiny model).
"""
from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


class _StoragePool:
    """Cache storage reused across generate calls, so CUDA graphs see the same addresses.

    A static-address input whose address changes makes the CUDA-graph tree record its graphs again;
    every generate call builds a fresh cache. After a cache's first (eager) forward, its tensors are
    copied into pooled ones of the same shapes, taken from a pool entry whose previous owner cache
    is gone (classifier-free guidance keeps two caches alive at once: they get two entries)."""

    def __init__(self):
        self.entries = []  # [weakref to the owning cache, {slot: tensor}]

    @staticmethod
    def _slots(cache):
        slots = {("positions",): cache.positions, ("valid",): cache.valid}
        slots.update({("keys", i): t for i, t in enumerate(cache.keys)})
        slots.update({("values", i): t for i, t in enumerate(cache.values)})
        slots.update({("extra", k): t for k, t in cache.extra.items()})
        return {k: t for k, t in slots.items() if t is not None}

    def adopt(self, cache, static: bool) -> None:
        slots = self._slots(cache)
        spec = {k: (t.shape, t.dtype, t.device) for k, t in slots.items()}
        entry = next((e for e in self.entries if e[0]() is None and
                      {k: (t.shape, t.dtype, t.device) for k, t in e[1].items()} == spec), None)
        if entry is None:
            entry = [None, {k: torch.empty_like(t) for k, t in slots.items()}]
            if static:
                for t in entry[1].values():
                    # guard=False: no dynamo guard on the address (one compiled graph for all entries).
                    torch._dynamo.mark_static_address(t, guard=False)
            self.entries.append(entry)
        entry[0] = weakref.ref(cache)
        for (kind, *key), t in slots.items():
            pooled = entry[1][(kind, *key)].copy_(t)
            if kind in ("positions", "valid"):
                setattr(cache, kind, pooled)
            elif kind == "extra":
                cache.extra[key[0]] = pooled
            else:
                getattr(cache, kind)[key[0]] = pooled


# Graphs one decoding session may need: the forward's structural variants (no cache / a cache refresh
# / one block; batch 1, which dynamo specialises, or more; a mask over the whole row or over the new
# tokens), plus the static first graphs before dynamo marks sizes dynamic. A session that mixed
# batch 1 and 4 with and without a cache needed 9; past dynamo's default limit of 8 it runs every
# new variant eagerly with only a log warning, so compiled decoding quietly became eager decoding.
DECODE_RECOMPILE_LIMIT = 64


def compile_for_decoding(model: nn.Module, mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
    """Replace `model.forward` by a compiled one (idempotent); returns the model.

    mode None: "reduce-overhead" on CUDA, inductor's default elsewhere. Raises dynamo's per-function
    recompile limit to DECODE_RECOMPILE_LIMIT (a process-wide setting; never lowers it)."""
    if getattr(model, "_veomni_decode_compiled", False):
        return model
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, DECODE_RECOMPILE_LIMIT)
    device = next(model.parameters()).device
    if mode is None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    eager = model.forward
    compiled = torch.compile(eager, mode=mode, **compile_kwargs)

    pool = _StoragePool()
    cuda_graphs = device.type == "cuda" and mode == "reduce-overhead"

    def forward(*args, past_key_values=None, **kwargs):
        if past_key_values is not None and not past_key_values.keys and not past_key_values.extra:
            out = eager(*args, past_key_values=past_key_values, **kwargs)  # allocates the storage
            pool.adopt(past_key_values, static=cuda_graphs)
            return out
        out = compiled(*args, past_key_values=past_key_values, **kwargs)
        if cuda_graphs and out.logits is not None:
            # The graph's outputs live in its memory pool and the next replay overwrites them; the
            # samplers keep logits across calls (classifier-free guidance combines two).
            out.logits = out.logits.clone()
        return out

    model.forward = forward
    model._veomni_decode_compiled = True
    model._veomni_eager_forward = eager
    model._veomni_decode_pool = pool
    logger.info("decoding: model forward compiled (torch.compile mode=%s); the first steps compile", mode)
    return model
