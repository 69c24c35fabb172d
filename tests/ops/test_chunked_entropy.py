"""The chunked certainty term (veomni/ops/chunked_entropy.py) against d3LLM's eager formula."""
import pytest
import torch

from veomni.ops.chunked_entropy import chunked_linear_correct_entropy, reference_linear_correct_entropy


def _inputs(n=7, v=13, h=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::2] = (hidden @ weight.t()).argmax(-1)[::2]  # every other row predicted correctly
    weights = torch.rand(n, generator=g, dtype=torch.float32) + 0.5
    return hidden, weight, targets, weights


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_value_and_gradients_match_the_eager_term(chunk, temperature):
    hidden, weight, targets, weights = _inputs()
    a_h, a_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b_h, b_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = chunked_linear_correct_entropy(a_h.float(), a_w.float(), targets, weights, temperature, chunk)
    ref = reference_linear_correct_entropy(b_h, b_w, targets, weights, temperature)
    assert ref.item() > 0 and ours.item() == pytest.approx(ref.item(), rel=1e-5)
    (3.0 * ours).backward()
    (3.0 * ref).backward()
    assert torch.allclose(a_h.grad, b_h.grad, atol=1e-5) and torch.allclose(a_w.grad, b_w.grad, atol=1e-5)


def test_wrong_rows_and_empty_input_give_zero():
    hidden, weight, targets, weights = _inputs()
    wrong = (hidden @ weight.t()).argmin(-1)
    assert chunked_linear_correct_entropy(hidden.float(), weight.float(), wrong, weights).item() == 0.0
    h = torch.zeros(0, 5, requires_grad=True)
    w = torch.randn(13, 5, requires_grad=True)
    out = chunked_linear_correct_entropy(h, w, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    out.backward()
    assert out.item() == 0.0 and w.grad is not None and not bool(w.grad.any())
