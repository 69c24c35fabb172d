"""Linear head + "certainty" term (entropy of correctly predicted rows) without the full [N, V] logits.

    chunked_linear_correct_entropy(hidden [N, H], weight [V, H], targets [N], token_weights [N],
                                   temperature, chunk_size)
      = sum_i token_weights[i] * [argmax(z_i) == targets[i]] * H(softmax(z_i / temperature)),
        z_i = hidden[i] @ weight.T,  H(q) = -sum_v q_v log(q_v + 1e-12)

This is d3LLM's (and dParallel's certainty-forcing) entropy term: minimising it sharpens the
predictions the model already gets right. Same chunked scheme and dtype rules as
veomni/ops/chunked_ce.py: per chunk of rows the fp32 logits, the term, and right away the gradients
w.r.t. the hidden rows and the head weight; backward only scales them. The argmax mask carries no
gradient (as in d3LLM). Gradient w.r.t. z of H(softmax(z / T)), with g_v = dH/dq_v =
-(log(q_v + eps) + q_v / (q_v + eps)):  dH/dz = q * (g - sum_v q_v g_v) / T.
"""
from __future__ import annotations

import torch

from veomni.ops.chunked_ce import DEFAULT_CHUNK_SIZE, _check_inputs, _mm_fp32

__all__ = ["chunked_linear_correct_entropy", "reference_linear_correct_entropy"]

ENTROPY_EPS = 1e-12  # d3LLM: torch.log(probs + 1e-12)


class _ChunkedCorrectEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, temperature, chunk_size, compute_dtype, needs_grad):
        with torch.autocast(hidden.device.type, enabled=False):  # see _ChunkedLinearCE.forward
            n = hidden.shape[0]
            low_precision = compute_dtype != torch.float32
            w = weight.to(compute_dtype)
            if needs_grad:
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                grad_hidden = torch.empty_like(hidden)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                h = hidden[start:end].to(compute_dtype)
                logits = _mm_fp32(h, w.t())  # [c, V] fp32
                correct = logits.argmax(-1) == targets[start:end]
                tw = token_weights[start:end].float() * correct
                q = torch.softmax(logits.div_(temperature), dim=-1)
                del logits
                log_q = torch.log(q + ENTROPY_EPS)
                total += (-(q * log_q).sum(-1) * tw).sum()
                if not needs_grad:
                    continue
                g = log_q.add_(q / (q + ENTROPY_EPS)).neg_()  # dH/dq, in the log buffer
                grad_logits = q.mul_(g - (q * g).sum(-1, keepdim=True)).mul_(tw[:, None] / temperature)
                del g
                grad_logits = grad_logits.to(compute_dtype) if low_precision else grad_logits
                grad_hidden[start:end] = _mm_fp32(grad_logits, w)
                if low_precision:
                    grad_weight += _mm_fp32(grad_logits.t(), h)
                else:
                    grad_weight.addmm_(grad_logits.t(), h)
                del grad_logits
            if needs_grad:
                ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
            ctx.backward_done = False
            return total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.backward_done:
            raise RuntimeError("chunked_linear_correct_entropy supports a single backward per call")
        ctx.backward_done = True
        if not ctx.saved_tensors:
            raise RuntimeError("chunked_linear_correct_entropy was called with grad disabled; no gradients were "
                               "computed")
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_linear_correct_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   token_weights: torch.Tensor, temperature: float = 1.0,
                                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """See the module docstring. Dtype rules, N = 0 and the single backward as chunked_linear_cross_entropy."""
    _check_inputs(hidden, weight, targets, token_weights, chunk_size)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    elif hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; pass both in the same dtype "
                         "or call inside torch.autocast")
    else:
        compute_dtype = hidden.dtype
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedCorrectEntropy.apply(hidden, weight, targets, token_weights.detach(), float(temperature),
                                        chunk_size, compute_dtype, needs_grad)


def reference_linear_correct_entropy(hidden, weight, targets, token_weights, temperature=1.0) -> torch.Tensor:
    """Eager reference (full fp32 logits, autograd), written as d3LLM writes the term."""
    logits = hidden.float() @ weight.float().t()
    probs = torch.softmax(logits / temperature, dim=-1)
    h_tok = -(probs * torch.log(probs + ENTROPY_EPS)).sum(dim=-1)
    correct = logits.argmax(dim=-1) == targets
    return (h_tok * correct * token_weights.float()).sum()
