"""The LM head + cross-entropy behind `model.ops.linear_ce`: one entry point for every objective.

    linear_cross_entropy(hidden [N, H], weight [V, H], targets [N], token_weights [N] | None,
                         chunk_size, impl=None) -> sum_i token_weights[i] * CE_i   (0-d fp32)

The rows are the loss positions only (the objective gathers them; there is no ignore_index), the
weights carry 1/t and the global 1/denominator. Choices (LINEAR_CE_IMPLS):

  eager   veomni.ops.chunked_ce.chunked_linear_cross_entropy: plain torch, chunked over rows, fp32
          logits; the reference.
  triton  veomni.ops.triton.linear_ce: the same algorithm in our Triton kernels.
  liger   liger-kernel's LigerFusedLinearCrossEntropyFunction on the same rows. It has no per-row
          weight (its ce_weight is per class), so: uniform weights (AR, loss_weighting=none) use
          reduction="sum" times the weight; per-row weights (1/t) use reduction="none" and sum the
          weighted per-row losses, which is exact only where liger's backward folds the per-row
          upstream gradient in before its dW sum (liger-kernel 0.8.5 does; 0.8.1 silently scales
          by the first row's gradient only). Where it does not, a weighted call is an error, never
          a silent drop of the weights. With per-row weights liger recomputes the logits in its
          backward (4 head matmuls instead of 3).

Which choice runs: `impl=` if given, else the one the model installed (model.ops.linear_ce, set
by veomni/ops/registry.py on DecoderForCausalLM and made current by its forward around the
loss_fn call, `use_linear_ce`). So every objective that calls `linear_cross_entropy` inside the
model's loss_fn follows the config without knowing about it.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect

import torch

from veomni.ops.chunked_ce import DEFAULT_CHUNK_SIZE, _check_inputs, _compute_dtype, chunked_linear_cross_entropy

__all__ = ["LINEAR_CE_IMPLS", "linear_cross_entropy", "liger_linear_cross_entropy", "use_linear_ce",
           "current_linear_ce", "liger_supports_token_weights", "check_linear_ce_objective"]

LINEAR_CE_IMPLS = ("eager", "triton", "liger")

_CURRENT = contextvars.ContextVar("veomni_linear_ce", default="eager")


def _check_impl(impl: str) -> None:
    if impl not in LINEAR_CE_IMPLS:
        raise ValueError(f"unknown linear_ce implementation {impl!r}; choose one of {list(LINEAR_CE_IMPLS)}")


@contextlib.contextmanager
def use_linear_ce(impl: str):
    """Within the block, linear_cross_entropy(impl=None) runs `impl` (the model's forward wraps
    its loss_fn call in this). A context variable, so threads and nested models keep their own."""
    _check_impl(impl)
    token = _CURRENT.set(impl)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_linear_ce() -> str:
    return _CURRENT.get()


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    impl: str | None = None,
) -> torch.Tensor:
    """sum_i token_weights[i] * CE(hidden[i] @ weight.T, targets[i]) by the chosen implementation
    (see the module docstring); the contract is chunked_linear_cross_entropy's."""
    impl = _CURRENT.get() if impl is None else impl
    _check_impl(impl)
    if impl == "eager":
        return chunked_linear_cross_entropy(hidden, weight, targets, token_weights, chunk_size=chunk_size)
    if impl == "triton":
        from veomni.ops.triton.linear_ce import triton_linear_cross_entropy

        return triton_linear_cross_entropy(hidden, weight, targets, token_weights, chunk_size=chunk_size)
    return liger_linear_cross_entropy(hidden, weight, targets, token_weights)


def liger_supports_token_weights() -> bool:
    """Whether the installed liger-kernel computes exact gradients for per-row weighted losses
    (reduction="none": its backward folds the per-token upstream gradient into the logits gradient
    before summing dW). Detected from the function signature, not the version number."""
    from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

    return "token_grad_output" in inspect.signature(fused_linear_cross_entropy_forward).parameters


def _liger_weights_error() -> ValueError:
    from importlib.metadata import version

    return ValueError(
        f"model.ops.linear_ce=liger: liger-kernel {version('liger-kernel')} cannot weight rows (its fused "
        "linear CE with reduction='none' scales the gradients by one upstream value, not per row), and "
        "this loss weights tokens (1/t: train.loss_weighting=inv_t). Use model.ops.linear_ce=triton or "
        "eager, train.loss_weighting=none, or a liger-kernel whose fused linear CE takes token_grad_output "
        "(0.8.5 does).")


def check_linear_ce_objective(impl: str, weighting: str) -> None:
    """Start-up check (the trainer calls it once the objective is built): liger with per-token
    weights needs a liger-kernel that supports them. The call itself checks again on the data."""
    if impl == "liger" and weighting != "none" and not liger_supports_token_weights():
        raise _liger_weights_error()


def liger_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The linear_cross_entropy contract through liger-kernel's fused linear CE (chunking is
    liger's own). Matmul inputs in the compute dtype (the autocast dtype, as for eager), liger's
    logits in that dtype with fp32 softmax/loss, dW accumulated in fp32 (accum_dtype)."""
    _check_inputs(hidden, weight, targets, token_weights, chunk_size=1)
    if hidden.shape[0] == 0:
        # liger cannot size its chunks for zero rows; the contract (loss 0, zero gradients that
        # reach both inputs) is the eager path's, which launches nothing for N = 0.
        return chunked_linear_cross_entropy(hidden, weight, targets, token_weights)
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    compute_dtype = _compute_dtype(hidden, weight)
    flce = LigerFusedLinearCrossEntropyFunction.apply
    with torch.autocast(hidden.device.type, enabled=False):
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)  # autograd casts gradients back
        # Positional arguments (names changed across liger versions): bias, ce_weight, ignore_index,
        # lse_square_scale, label_smoothing, reduction, softcap, return_z_loss, accum_dtype.
        if token_weights is None:
            return flce(h, w, targets, None, None, -100, 0.0, 0.0, "sum", None, False, torch.float32)[0]
        tw = token_weights.detach().float()
        # One host sync (liger itself syncs on its count of non-ignored targets).
        if bool((tw == tw[0]).all()):
            return flce(h, w, targets, None, None, -100, 0.0, 0.0, "sum", None, False, torch.float32)[0] * tw[0]
        if not liger_supports_token_weights():
            raise _liger_weights_error()
        per_row = flce(h, w, targets, None, None, -100, 0.0, 0.0, "none", None, False, torch.float32)[0]
        return (per_row.float() * tw).sum()
