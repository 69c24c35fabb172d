"""The `liger` choice of the pointwise ops: thin calls into liger-kernel.

Imported lazily (by veomni/ops/{rms_norm,rope,swiglu}.py when the choice runs), like our Triton
kernels, so the module imports triton at its top.

Tested with liger-kernel 0.8.1 (setup.py's `kernels` extra). Later releases (0.8.2 to 0.8.5) call
`.to()` on scalar kernel arguments, which the Triton interpreter passes as Python floats, so their
RMSNorm and SwiGLU kernels fail under TRITON_INTERPRET=1 ("'float' object has no attribute 'to'");
on a GPU they would run.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETER_SHIM_DONE = False


@triton.jit
def _rsqrt(x):
    return tl.rsqrt(x)


def _rms_norm_function():
    """LigerRMSNormFunction, made runnable under TRITON_INTERPRET=1.

    liger's RMSNorm kernel calls `rsqrt` from triton.language.extra.libdevice. The Triton
    interpreter (triton 3.9) gives that module no implementation: the call returns None and the
    kernel fails with "cannot convert None of type <class 'NoneType'> to tensor". Under the
    interpreter only, we rebind liger's module-level `rsqrt` to a jit function calling tl.rsqrt
    (the same math); compiled (GPU) runs keep liger's kernel untouched."""
    global _INTERPRETER_SHIM_DONE
    import liger_kernel.ops.rms_norm as lrn

    if os.environ.get("TRITON_INTERPRET") == "1" and not _INTERPRETER_SHIM_DONE:
        lrn.rsqrt = _rsqrt
        _INTERPRETER_SHIM_DONE = True
    return lrn.LigerRMSNormFunction


def liger_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool = False) -> torch.Tensor:
    fn = _rms_norm_function()
    # casting modes as HF's: 'llama' casts the normalised row back before the weight; 'gemma' takes
    # x_hat * (offset + w) in fp32 and casts after, which with offset 1 is the zero-centred norm.
    # in_place=False: liger would otherwise write dx into dy, and dy of a pre-norm block is also
    # the residual stream's gradient (the corruption liger's docs describe for Gemma2).
    if zero_centred:
        return fn.apply(x, weight, eps, 1.0, "gemma", False)
    return fn.apply(x, weight, eps, 0.0, "llama", False)


def liger_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up)


def liger_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, H, S, D], k [B, Hkv, S, D], cos/sin [B, S, D] (full rotary only: liger rotates the whole
    head and reads the first half of cos/sin, so it needs cos = cat(freqs, freqs), as ours is;
    the registry refuses liger for partial rotary).

    liger rotates in place, in q.transpose(1, 2).contiguous(), which IS q's storage when q is the
    transposed [B, S, H, D] projection output (our layout). A tensor that autograd or a caller
    still holds would be overwritten behind autograd's back (no version bump: wrong gradients,
    no error), so liger gets clones: one extra copy of q and k."""
    from liger_kernel.ops.rope import LigerRopeFunction

    return LigerRopeFunction.apply(q.clone(), k.clone(), cos, sin)
