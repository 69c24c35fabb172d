"""RMSNorm behind `model.ops.rms_norm`: eager (the reference) | triton (ours) | liger.

    standard (Llama/Qwen2/Qwen3, HF's order): normalise in fp32, cast back to the input dtype,
        then times the weight;
    zero_centred (Qwen3.5): times (1 + w) in fp32, then the cast.
The eager path is the model's original code, op for op, so HF parity is bit-exact. The `triton` and
`liger` choices are checked when installed (veomni/ops/registry.py); here they just run.
"""
from __future__ import annotations

import torch

RMS_NORM_IMPLS = ("eager", "triton", "liger")


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool = False) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centred:
        return (h * (1.0 + weight.float())).type_as(x)
    return weight * h.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "eager",
             zero_centred: bool = False) -> torch.Tensor:
    if impl == "eager":
        return rms_norm_eager(x, weight, eps, zero_centred)
    if impl == "triton":
        from veomni.ops.triton.rms_norm import triton_rms_norm

        return triton_rms_norm(x, weight, eps, zero_centred)
    if impl == "liger":
        from veomni.ops.liger import liger_rms_norm

        return liger_rms_norm(x, weight, eps, zero_centred)
    raise ValueError(f"rms_norm impl={impl!r} is not one of {RMS_NORM_IMPLS}")
