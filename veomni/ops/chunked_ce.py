"""Linear head + cross-entropy without materialising the full [N, V] logits.

The LM head of a small model is where training memory goes: for SmolLM2 (V = 49152) one
micro-batch of 8 x 2048 tokens has 16384 x 49152 fp32 logits = 3 GiB, and eager
``F.cross_entropy`` keeps that tensor, its log-softmax and its gradient alive at once.

``chunked_linear_cross_entropy`` walks over the rows in chunks of ``chunk_size``. For each chunk
it computes the logits in fp32 (fp32 accumulation also for bf16 inputs), the per-row loss, and
right away the gradient of the loss with respect to that chunk's hidden rows and (accumulated) the
head weight. Only ``grad_hidden``
[N, H] and ``grad_weight`` [V, H] survive the forward; backward merely scales them by the
incoming gradient. Peak extra memory is therefore O(chunk_size * V + V * H + N * H).

Contract with the caller (see veomni/diffusion/objective.py): pass only the rows that carry a
loss. There is no ``ignore_index``; a negative or out-of-range target raises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["chunked_linear_cross_entropy", "reference_linear_cross_entropy"]

DEFAULT_CHUNK_SIZE = 1024


def _check_inputs(hidden, weight, targets, token_weights, chunk_size):
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}. Gather the scored rows (hidden[b, i]) before calling."
        )
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"hidden and weight must be floating tensors, got {hidden.dtype} and {weight.dtype}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden has H={hidden.shape[1]}, weight has H={weight.shape[1]}")
    n = hidden.shape[0]
    if targets.shape != (n,) or targets.dtype != torch.long:
        raise ValueError(f"targets must be a long tensor of shape ({n},); got {targets.dtype} {tuple(targets.shape)}")
    if token_weights is not None:
        if token_weights.shape != (n,):
            raise ValueError(f"token_weights must have shape ({n},); got {tuple(token_weights.shape)}")
        if token_weights.requires_grad:
            # The fused backward has no gradient for the weights; silently dropping it would be wrong.
            raise ValueError("token_weights must not require grad (detach it): the fused CE has no gradient for it")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if n > 0:
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(
                f"targets must lie in [0, V={weight.shape[0]}); got min {lo}, max {hi}. There is no "
                "ignore_index: select the scored rows instead of marking them -100."
            )


# Recent torch (2.11 and 2.13 have it; older ones may not) offers mm(..., out_dtype=float32) for
# bf16/fp16 on CUDA: tensor cores with an fp32 result. Without it the upcast path below is used.
_HAS_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (same dtype) accumulated and returned in fp32.

    For bf16/fp16 the products of two low-precision numbers are exact in fp32, so the CUDA
    out_dtype kernel and "upcast, then fp32 matmul" compute the same thing; the former runs on
    tensor cores (measured 4x faster on an H100 than the upcast at V = 49152). Performance only.
    """
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _HAS_MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def cached_gradients_backward(ctx, grad_output, name: str):
    """The backward of the fused head + CE Functions (this one, the Triton one): the gradients were
    computed in forward and saved as (grad_hidden, grad_weight)."""
    if ctx.backward_done:
        # The cached gradients were scaled in place by the first backward; a second one
        # (retain_graph=True) would silently return grad_output**2-scaled gradients.
        raise RuntimeError(f"{name} supports a single backward per call; recompute the loss "
                           "instead of backward(retain_graph=True) twice")
    ctx.backward_done = True
    if not ctx.saved_tensors:
        raise RuntimeError(f"{name} was called with grad disabled; no gradients were computed")
    grad_hidden, grad_weight = ctx.saved_tensors
    # The loss is linear in the cached gradients, so scaling by grad_output is exact. In place:
    # an out-of-place multiply would hold a second [V, H] copy at the backward peak. Always
    # multiply: testing `grad_output == 1` first would force a device sync every step.
    grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
    grad_weight.mul_(grad_output.to(grad_weight.dtype))
    return grad_hidden, grad_weight, None, None, None, None, None


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, chunk_size, compute_dtype, needs_grad):
        # An ambient autocast would turn the fp32 matmuls below into bf16 ones (bf16 logits) and
        # fight the explicit casts; the wrapper already chose compute_dtype from it.
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedLinearCE._forward(ctx, hidden, weight, targets, token_weights, chunk_size,
                                             compute_dtype, needs_grad)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, token_weights, chunk_size, compute_dtype, needs_grad):
        n, _ = hidden.shape
        # Logits, softmax and loss are fp32 whatever the input dtype: bf16 logits keep only ~3
        # significant digits, visible in the loss of a 50k-way softmax. For bf16/fp16 matmul
        # inputs the gradient w.r.t. the logits is rounded to that dtype before the two gradient
        # matmuls (fp32 accumulation), as mixed-precision training does for every other layer.
        low_precision = compute_dtype != torch.float32
        w = weight.to(compute_dtype)  # no copy unless autocast asks for a cast
        if needs_grad:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            grad_hidden = torch.empty_like(hidden)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end].to(compute_dtype)
            tgt = targets[start:end]
            tw = (
                torch.ones(end - start, dtype=torch.float32, device=hidden.device)
                if token_weights is None
                else token_weights[start:end].float()
            )
            logits = _mm_fp32(h, w.t())  # [c, V] fp32, the only O(chunk * V) tensor
            target_logit = logits.gather(1, tgt[:, None]).squeeze(1)
            # logsumexp by hand, in place: torch.logsumexp would allocate another [c, V] temporary.
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # unnormalised softmax, reusing the logits buffer
            sum_exp = probs.sum(dim=-1, keepdim=True)
            lse = (row_max + sum_exp.log()).squeeze(1)
            loss += ((lse - target_logit) * tw).sum()
            if not needs_grad:  # eval under no_grad: skip the two gradient matmuls
                continue
            # d(w * CE)/d logits = w * (softmax - onehot)
            probs.mul_(tw[:, None] / sum_exp)
            rows = torch.arange(end - start, device=hidden.device)
            probs[rows, tgt] -= tw
            grad_logits = probs.to(compute_dtype) if low_precision else probs
            del logits, probs
            grad_hidden[start:end] = _mm_fp32(grad_logits, w)  # cast to hidden.dtype on store
            if low_precision:
                grad_weight += _mm_fp32(grad_logits.t(), h)
            else:
                grad_weight.addmm_(grad_logits.t(), h)  # in place: no [V, H] temporary per chunk
            del grad_logits
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return cached_gradients_backward(ctx, grad_output, "chunked_linear_cross_entropy")


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """sum_i token_weights[i] * CE(hidden[i] @ weight.T, targets[i]), as a 0-d fp32 tensor.

    Dtypes: hidden [N, H] and weight [V, H] in the same dtype (fp32, bf16 or fp16), or any dtypes
    inside an enabled ``torch.autocast`` region, where the matmul inputs are cast to the autocast
    dtype exactly as an eager ``lm_head`` would be. Logits, softmax and the loss are always fp32;
    gradients come back in each input's own dtype.
    N = 0 returns 0.0 with all-zero gradients that still reach ``hidden`` and ``weight``
    (DDP/FSDP expect every parameter to get a gradient). Gradients are computed in the forward
    (skipped when grad mode is off or no input requires grad) and handed out by the one allowed
    backward.
    """
    _check_inputs(hidden, weight, targets, token_weights, chunk_size)
    compute_dtype = _compute_dtype(hidden, weight)
    if token_weights is not None:
        token_weights = token_weights.detach()
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCE.apply(hidden, weight, targets, token_weights, chunk_size, compute_dtype, needs_grad)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul input dtype: the autocast dtype inside an enabled autocast, else the common
    dtype of hidden and weight (a mismatch is an error). Shared by every linear_ce choice."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden is {hidden.dtype} but weight is {weight.dtype}; pass both in the same dtype "
            "(under FSDP mixed precision both are the param dtype) or call inside torch.autocast"
        )
    return hidden.dtype


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager reference: full fp32 logits, per-row CE, weighted sum. For tests and benchmarks."""
    _check_inputs(hidden, weight, targets, token_weights, chunk_size=1)
    with torch.autocast(hidden.device.type, enabled=False):  # "full fp32" even inside autocast
        logits = hidden.float() @ weight.float().t()
    ce = F.cross_entropy(logits, targets, reduction="none")
    if token_weights is not None:
        ce = ce * token_weights.float()
    return ce.sum()
