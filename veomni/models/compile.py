"""torch.compile of the decoder layers (train.compile=true), and the graph-break report.

Applied from outside the model, by `parallelize` (veomni/distributed/parallelism.py), in the
order torchtitan uses for per-block compile: activation checkpointing, then compile, then FSDP2.

    compile_decoder_layers(model)   compiles each block's `forward` in place.

Why each block's `forward` and not `torch.compile(block)` or `block.compile()`:
  - `torch.compile(block)` returns an OptimizedModule whose parameters are named `_orig_mod.*`:
    checkpoints and HF export would see different keys.
  - `block.compile()` compiles `_call_impl`, which runs the module's hooks, so FSDP2's
    all-gather/reshard hooks (registered later on the same module) would be traced too.
  Compiling the bound `forward` keeps the names, leaves the hooks (FSDP2, the checkpoint wrapper's
  state-dict hooks) eager around the graph, and, when the block is a CheckpointWrapper, traces
  torch.utils.checkpoint as one region whose recomputation the compiler partitions itself.

All decoder layers share one code object (DecoderLayer.forward), and parameters are graph inputs,
so identical layers reuse one compiled graph: a dense model compiles one graph per call shape,
a hybrid one per layer kind. Shapes that change (padding to the longest row) recompile once and
then run with dynamic sizes.

    layer_graph_breaks(model, **forward_kwargs)   runs dynamo's explain on every kind of layer.

The list of graph breaks that remain, and why, is in docs/training.md ("torch.compile").
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `.model.layers` ModuleList of decoder blocks; "
                        "compile_decoder_layers expects the DecoderForCausalLM layout.")
    return layers


def is_compiled(block: nn.Module) -> bool:
    return getattr(block, "_veomni_compiled", False)


def compile_decoder_layers(model: nn.Module, **compile_kwargs) -> int:
    """Compile each decoder block's forward in place (idempotent); returns how many blocks.

    compile_kwargs go to torch.compile (e.g. mode="max-autotune", fullgraph=True)."""
    n = 0
    for block in decoder_blocks(model):
        if not is_compiled(block):
            # An instance attribute shadows the class's forward; _call_impl (hooks) stays eager.
            block.forward = torch.compile(block.forward, **compile_kwargs)
            block._veomni_compiled = True
        n += 1
    return n


def _layer_kinds(model: nn.Module) -> Dict[str, int]:
    """One representative layer index per kind of block (mixer class + MLP class)."""
    kinds: Dict[str, int] = {}
    for i, block in enumerate(decoder_blocks(model)):
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        key = f"{type(inner.mixer).__name__}+{type(inner.mlp).__name__}"
        kinds.setdefault(key, i)
    return kinds


def layer_graph_breaks(model: nn.Module, grad: bool = True, **forward_kwargs) -> Dict[str, List[str]]:
    """{layer kind: [graph-break reasons]} for the layers of an eager `model` called with
    `forward_kwargs` (e.g. input_ids=..., attn_mode="bidirectional"). Runs the model once to capture
    each kind's real inputs, then torch._dynamo.explain on that layer alone (with autograd unless
    grad=False: flex attention has no CPU backward)."""
    kinds = _layer_kinds(model)
    blocks = decoder_blocks(model)
    captured = {}

    def grab(idx):
        def hook(module, args, kwargs):
            captured.setdefault(idx, (args, kwargs))
        return hook

    handles = [blocks[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in kinds.values()]
    try:
        with torch.no_grad():
            model(**forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for kind, i in kinds.items():
        args, kwargs = captured[i]
        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            report = torch._dynamo.explain(blocks[i])(*args, **kwargs)
        out[kind] = [_reason(b) for b in report.break_reasons]
    torch._dynamo.reset()
    return out


def _reason(brk) -> str:
    """One line: the reason and the innermost user frame it happened in."""
    reason = str(getattr(brk, "reason", brk)).strip().splitlines()[0]
    stack = getattr(brk, "user_stack", None) or []
    where = f" ({stack[-1].filename.split('veomni/')[-1]}:{stack[-1].lineno})" if stack else ""
    return reason + where
