"""4-bit NormalFloat (NF4) base weights for QLoRA, through bitsandbytes (the `quant` extra).

`quantize_nf4(model)` replaces every `nn.Linear` inside the decoder blocks by a
`bitsandbytes.nn.Linear4bit` holding the same weight in NF4 with double quantisation (the QLoRA
recipe: blocks of 64 weights, their fp32 scales quantised again). The embeddings and the LM head
stay in their dtype: the loss reads `lm_head.weight` directly (fused cross-entropy), and a tied head
is the embedding. The quantised weights are frozen; LoRA adapters (veomni/models/lora.py) train on
top of them. `dequantize(linear)` gives back the weight the forward actually used, which is what
the adapters were trained against and what a merge must start from.

Quantisation is deterministic (absmax scaling, nearest code), so a resumed run that re-loads the
base checkpoint and quantises it again gets the same NF4 weights bit for bit.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

logger = logging.getLogger("veomni")

INSTALL = 'pip install -e ".[quant]"  (bitsandbytes + peft)'


def import_bnb():
    """bitsandbytes, or an ImportError that says how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(f"model.quantize=nf4 needs bitsandbytes ({exc}): {INSTALL}") from None
    return bnb


def is_nf4(module: nn.Module) -> bool:
    """A quantised bitsandbytes Linear4bit. Its quantisation state (scales, shape) is kept on the
    module, which FSDP2 leaves alone while it shards the packed weight bytes like any parameter."""
    cls = type(module)
    return (cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")
            and getattr(module, "quant_state", None) is not None)


def linear_numel(module: nn.Module) -> int:
    """Elements of a Linear's weight matrix (a packed NF4 weight stores two per byte)."""
    if is_nf4(module):
        return module.quant_state.shape.numel()
    return module.weight.numel()


@torch.no_grad()
def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Turn every nn.Linear of model.model.layers into an NF4 Linear4bit, in place, on the weights'
    device. Returns how many. compute_dtype: the dtype the matmuls run in (the model's dtype)."""
    bnb = import_bnb()
    count, before, after = 0, 0, 0
    for parent in model.model.layers.modules():
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:  # exact type: never re-quantise, never wrap a subclass
                continue
            device = child.weight.device
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=q)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            # bitsandbytes repacks a CPU weight for an AVX512-BF16 kernel in eval mode and unpacks it in
            # every state_dict(): training and evaluation would run different kernels, and the weight
            # layout would flip with each checkpoint. One kernel, always.
            q.support_avx512bf16_for_cpu = False
            q = q.to(device)  # quantises here (Params4bit quantises when it is moved to a device)
            before += child.weight.numel() * child.weight.element_size()
            after += q.weight.numel() * q.weight.element_size()
            setattr(parent, name, q)
            count += 1
    if count:
        logger.info("NF4: %d Linear layers quantised, %.1f MB -> %.1f MB (+ scales)", count, before / 1e6,
                    after / 1e6)
    return count


@torch.no_grad()
def dequantize(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [out, in] weight a Linear (NF4 or not, not sharded) multiplies by, as `dtype`."""
    if not is_nf4(module):
        return module.weight.detach().to(dtype)
    return dequantize_packed(module.weight.data, module.quant_state, dtype)


@torch.no_grad()
def dequantize_packed(packed: torch.Tensor, quant_state, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight from its whole packed NF4 bytes and the module's quantisation state."""
    bnb = import_bnb()
    state = quant_state
    if packed.device != state.absmax.device:  # a gathered copy on CPU, the state on the GPU
        import copy

        state = copy.deepcopy(quant_state)
        state.to(packed.device)
    return bnb.functional.dequantize_4bit(packed, state).to(dtype)
