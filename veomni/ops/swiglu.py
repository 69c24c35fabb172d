"""SwiGLU, silu(gate) * up, behind `model.ops.swiglu`: eager (the reference) | triton (ours) | liger.

Only the SiLU-gated MLP has a fused kernel. `gated_act(gate, up, act, impl)` is what the MLP calls:
with `eager` it is act(gate) * up for any activation (the model's original expression, op for op);
with `triton`/`liger` the activation must be SiLU, which the registry checks when it installs the
choice (it names the model's hidden_act otherwise) and which is checked here again.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

SWIGLU_IMPLS = ("eager", "triton", "liger")


def swiglu_eager(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "eager") -> torch.Tensor:
    if impl == "eager":
        return swiglu_eager(gate, up)
    if impl == "triton":
        from veomni.ops.triton.swiglu import triton_swiglu

        return triton_swiglu(gate, up)
    if impl == "liger":
        from veomni.ops.liger import liger_swiglu

        return liger_swiglu(gate, up)
    raise ValueError(f"swiglu impl={impl!r} is not one of {SWIGLU_IMPLS}")


def gated_act(gate: torch.Tensor, up: torch.Tensor, act: Callable, impl: str = "eager") -> torch.Tensor:
    """act(gate) * up; a fused kernel for SiLU when impl is not 'eager'."""
    if impl == "eager":
        return act(gate) * up
    if act is not F.silu:
        raise ValueError(f"model.ops.swiglu={impl} fuses SiLU only, and this MLP's activation is {act}; "
                         "use model.ops.swiglu=eager")
    return swiglu(gate, up, impl)
