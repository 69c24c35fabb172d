"""Linear head + cross-entropy without materialising the full [N, V] logits.

The LM head of a small model is where training memory goes: for SmolLM2 (V = 49152) one
micro-batch of 8 x 2048 tokens has 16384 x 49152 fp32 logits = 3 GiB, and eager
``F.cross_entropy`` keeps that tensor, its log-softmax and its gradient alive at once.

``chunked_linear_cross_entropy`` walks over the rows in chunks of ``chunk_size``. For each chunk
it computes the logits in fp32, the per-row loss, and right away the gradient of the loss with
respect to that chunk's hidden rows and (accumulated) the head weight. Only ``grad_hidden``
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


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, chunk_size):
        n, _ = hidden.shape
        # fp32 math regardless of input dtype: bf16 logits lose ~3 significant digits, which is
        # visible in the loss of a 50k-way softmax. `.float()` is free when already fp32.
        w32 = weight.float()
        grad_weight = torch.zeros_like(w32)
        grad_hidden = torch.empty_like(hidden)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end].float()
            tgt = targets[start:end]
            tw = (
                torch.ones(end - start, dtype=torch.float32, device=hidden.device)
                if token_weights is None
                else token_weights[start:end].float()
            )
            logits = h @ w32.t()  # [c, V], the only O(chunk * V) tensor
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, tgt[:, None]).squeeze(1)
            loss += ((lse - target_logit) * tw).sum()
            # d(w * CE)/d logits = w * (softmax - onehot); reuse the logits buffer in place.
            probs = logits.sub_(lse[:, None]).exp_()
            probs.mul_(tw[:, None])
            rows = torch.arange(end - start, device=hidden.device)
            probs[rows, tgt] -= tw
            grad_hidden[start:end] = (probs @ w32).to(hidden.dtype)
            grad_weight.addmm_(probs.t(), h)
            del logits, probs
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The loss is linear in the cached gradients, so scaling by grad_output is exact. Always
        # multiply: testing `grad_output == 1` first would force a device sync every step.
        grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        grad_weight = grad_weight * grad_output.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """sum_i token_weights[i] * CE(hidden[i] @ weight.T, targets[i]), as a 0-d fp32 tensor.

    hidden [N, H] and weight [V, H] may be fp32 or bf16/fp16; the math is fp32 and the gradients
    come back in each input's dtype. N = 0 returns 0.0 with all-zero gradients that still reach
    ``hidden`` and ``weight`` (DDP/FSDP expect every parameter to get a gradient).
    Gradients are computed in the forward pass, so call backward at most once per call.
    """
    _check_inputs(hidden, weight, targets, token_weights, chunk_size)
    if token_weights is not None:
        token_weights = token_weights.detach()
    return _ChunkedLinearCE.apply(hidden, weight, targets, token_weights, chunk_size)


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager reference: full fp32 logits, per-row CE, weighted sum. For tests and benchmarks."""
    _check_inputs(hidden, weight, targets, token_weights, chunk_size=1)
    logits = hidden.float() @ weight.float().t()
    ce = F.cross_entropy(logits, targets, reduction="none")
    if token_weights is not None:
        ce = ce * token_weights.float()
    return ce.sum()
