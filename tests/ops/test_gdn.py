"""Gated DeltaNet kernels: chunked form == per-token recurrence == transformers' reference, and
packed documents never see each other (the hazard of transformers' torch path, shown below)."""
import importlib.util

import pytest
import torch

from veomni.ops import gdn
from veomni.ops.gdn import (
    GDN_IMPLS,
    causal_conv1d,
    causal_conv1d_step,
    check_gdn_impl,
    chunk_gated_delta_rule,
    conv_state_from_prefix,
    recurrent_gated_delta_rule,
    reverse_segments,
    segment_cu_seqlens,
)

hf = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

# Odd sizes: T=37 gives several chunks and a partial one for chunk sizes 8 and 16; Hv = 2 Hk
# exercises the grouped q/k heads; Dk != Dv catches a transposed state.
B, T, HK, HV, DK, DV = 2, 37, 2, 4, 6, 5
CONV_C, CONV_K = 7, 4

# Two packed rows: documents of lengths 10, 1, 20 then 6 padding; 16 (a whole number of 16-chunks),
# 1, 17 then 3 padding. Segment id 0 is padding.
ROWS = [[10, 1, 20, 6], [16, 1, 17, 3]]


def _segment_ids():
    ids = []
    for row in ROWS:
        r = []
        for i, n in enumerate(row):
            r += [0 if i == len(row) - 1 else i + 1] * n
        ids.append(r)
    return torch.tensor(ids)


def _inputs(dtype=torch.float64, seed=0, b=B, t=T, grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, HK, DK, generator=gen)
    k = torch.randn(b, t, HK, DK, generator=gen)
    v = torch.randn(b, t, HV, DV, generator=gen)
    # Decays in (e^-3, 1): strong enough that a wrong exponent shows, weak enough to keep memory.
    g = -3 * torch.rand(b, t, HV, generator=gen)
    beta = torch.rand(b, t, HV, generator=gen)
    out = [x.to(dtype) for x in (q, k, v, g, beta)]
    return [x.requires_grad_(grad) for x in out]


def _state(n, dtype=torch.float64, seed=5, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, HV, DK, DV, generator=gen).to(dtype).requires_grad_(grad)


def _loss_weights(o, s, seed=1):
    gen = torch.Generator().manual_seed(seed)
    # Non-uniform upstream gradients, so a permuted token or state cannot cancel out.
    loss = (o * torch.randn(o.shape, generator=gen).to(o.dtype)).sum()
    if s is not None:
        loss = loss + (s * torch.randn(s.shape, generator=gen).to(s.dtype)).sum()
    return loss


def _grads(fn, leaves, **kw):
    for x in leaves:
        x.grad = None
    o, s = fn(*leaves[:5], **kw)
    _loss_weights(o, s).backward()
    return o.detach(), (None if s is None else s.detach()), [x.grad.clone() for x in leaves]


# ------------------------------------------------------------------------------------------------
# chunked == recurrence, forward and backward, float64


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_h0", "h0"])
@pytest.mark.parametrize("chunk_size", [8, 16])
def test_chunk_equals_recurrence_fp64(chunk_size, with_h0, packed):
    leaves = _inputs(grad=True)
    cu = segment_cu_seqlens(_segment_ids()) if packed else None
    n = len(cu) - 1 if packed else B
    h0 = _state(n, grad=True) if with_h0 else None
    all_leaves = leaves + ([h0] if with_h0 else [])
    kw = {"initial_state": h0, "output_final_state": True, "cu_seqlens": cu}
    oc, sc, gc = _grads(chunk_gated_delta_rule, all_leaves, chunk_size=chunk_size, **kw)
    orr, sr, gr = _grads(recurrent_gated_delta_rule, all_leaves, **kw)
    assert oc.shape == (B, T, HV, DV) and sc.shape == (n, HV, DK, DV)
    torch.testing.assert_close(oc, orr, rtol=0, atol=1e-10)
    torch.testing.assert_close(sc, sr, rtol=0, atol=1e-10)
    for name, a, b in zip(["q", "k", "v", "g", "beta", "h0"], gc, gr):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"grad of {name}")


def test_output_dtype_and_no_final_state():
    q, k, v, g, beta = _inputs(torch.bfloat16)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16)
    assert o.dtype == torch.bfloat16 and s is None
    _, s = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16, output_final_state=True)
    assert s.dtype == torch.float32
    o32, _ = chunk_gated_delta_rule(*(x.float() for x in (q, k, v, g, beta)), chunk_size=16)
    torch.testing.assert_close(o.float(), o32, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------
# Same function as transformers (unpacked input, fp32)


@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_h0", "h0"])
def test_matches_transformers_unpacked(with_h0):
    q, k, v, g, beta = _inputs(torch.float32)
    h0 = _state(B, torch.float32) if with_h0 else None
    ours_c = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=16)
    ours_r = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    ref_c = hf.torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16, initial_state=h0,
                                            output_final_state=True, use_qk_l2norm_in_kernel=True)
    ref_r = hf.torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                                output_final_state=True, use_qk_l2norm_in_kernel=True)
    for ours in (ours_c, ours_r):
        for a, b in zip(ours, ref_c):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(ref_c, ref_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_conv_matches_transformers():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, CONV_C, generator=gen)
    w = torch.randn(CONV_C, CONV_K, generator=gen)
    ref = hf.causal_conv1d_fn(x.transpose(1, 2), w, None, activation="silu").transpose(1, 2)
    torch.testing.assert_close(causal_conv1d(x, w), ref, rtol=1e-6, atol=1e-6)
    # The packed path with one document per row is the same function.
    cu = torch.tensor([0, T, 2 * T])
    torch.testing.assert_close(causal_conv1d(x, w, cu_seqlens=cu), ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Packing: a packed row equals every document run alone


def _documents(cu):
    return [(a, b) for a, b in zip(cu.tolist(), cu.tolist()[1:])]


def _flat(x):
    return x.reshape(B * T, *x.shape[2:])


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, recurrent_gated_delta_rule], ids=["chunk", "recurrent"])
def test_packed_gdn_equals_documents_alone(fn):
    leaves = _inputs(grad=True)
    cu = segment_cu_seqlens(_segment_ids())
    n_docs = len(cu) - 1
    h0 = _state(n_docs, grad=True)
    kw = {"chunk_size": 8} if fn is chunk_gated_delta_rule else {}
    gen = torch.Generator().manual_seed(2)
    w_o = torch.randn(B * T, HV, DV, generator=gen, dtype=torch.float64)
    w_s = torch.randn(n_docs, HV, DK, DV, generator=gen, dtype=torch.float64)
    o, s = fn(*leaves, cu_seqlens=cu, initial_state=h0, output_final_state=True, **kw)
    ((_flat(o) * w_o).sum() + (s * w_s).sum()).backward()
    lens = [b - a for a, b in _documents(cu)]
    assert 1 in lens and max(lens) > 16  # a one-token document and a multi-chunk one
    for n, (a, b) in enumerate(_documents(cu)):
        doc = [_flat(x.detach())[a:b].unsqueeze(0).requires_grad_() for x in leaves]
        h0_n = h0.detach()[n:n + 1].clone().requires_grad_()
        o_n, s_n = fn(*doc, initial_state=h0_n, output_final_state=True, **kw)
        ((o_n[0] * w_o[a:b]).sum() + (s_n[0] * w_s[n]).sum()).backward()
        torch.testing.assert_close(_flat(o.detach())[a:b], o_n[0].detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(s.detach()[n], s_n[0].detach(), rtol=0, atol=1e-12)
        # The packed loss is the sum of the documents' own losses, so with no leak its gradient
        # restricted to a document is that document's gradient alone.
        for name, full, alone in zip(["q", "k", "v", "g", "beta"], leaves, doc):
            torch.testing.assert_close(_flat(full.grad)[a:b], alone.grad[0], rtol=0, atol=1e-10, msg=name)
        torch.testing.assert_close(h0.grad[n], h0_n.grad[0], rtol=0, atol=1e-10)


def test_packed_gdn_gradient_stays_inside_documents():
    """d(output of document n) / d(inputs of any other document) is exactly zero."""
    leaves = _inputs(grad=True)
    cu = segment_cu_seqlens(_segment_ids())
    docs = _documents(cu)
    for n in (0, 2, len(docs) - 1):
        a, b = docs[n]
        for x in leaves:
            x.grad = None
        o, _ = chunk_gated_delta_rule(*leaves, cu_seqlens=cu, chunk_size=8)
        _flat(o)[a:b].pow(2).sum().backward()
        for name, x in zip(["q", "k", "v", "g", "beta"], leaves):
            gf = _flat(x.grad)
            assert gf[a:b].abs().sum() > 0, name
            assert torch.cat([gf[:a], gf[b:]]).abs().max() == 0, name


def test_packed_conv_equals_documents_alone():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, CONV_C, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(CONV_C, CONV_K, generator=gen, dtype=torch.float64, requires_grad=True)
    cu = segment_cu_seqlens(_segment_ids())
    y = causal_conv1d(x, w, cu_seqlens=cu)
    upstream = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (y * upstream).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    gw_docs = torch.zeros_like(w)
    for a, b in _documents(cu):
        xd = _flat(x.detach())[a:b].unsqueeze(0).requires_grad_()
        wd = w.detach().clone().requires_grad_()
        yd = causal_conv1d(xd, wd)
        torch.testing.assert_close(_flat(y.detach())[a:b], yd[0], rtol=0, atol=1e-12)
        (yd[0] * _flat(upstream)[a:b]).sum().backward()
        torch.testing.assert_close(_flat(gx)[a:b], xd.grad[0], rtol=0, atol=1e-12)
        gw_docs += wd.grad
    torch.testing.assert_close(gw, gw_docs, rtol=0, atol=1e-10)


def test_transformers_torch_path_leaks_across_documents():
    """The hazard our kernels fix. transformers' torch GDN and conv have no document reset:
    transformers 5.25 refuses `cu_seqlens` / `seq_idx` on its torch path (earlier releases
    swallowed them silently), and a packed row run without them is one long sequence, so the
    second document reads the first ones."""
    q, k, v, g, beta = (_flat(x)[:31].unsqueeze(0) for x in _inputs(torch.float32))
    cu = torch.tensor([0, 10, 11, 31])
    ours, _ = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, chunk_size=16)
    alone, _ = chunk_gated_delta_rule(*(x[:, 11:31] for x in (q, k, v, g, beta)), chunk_size=16)
    torch.testing.assert_close(ours[:, 11:31], alone, rtol=1e-5, atol=1e-5)
    try:
        hf_o, _ = hf.torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16,
                                                  use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    except ValueError:  # refused: the caller has to pick another path
        hf_o = None
    if hf_o is not None:  # accepted, then it must have been ignored
        assert (hf_o[:, 11:31] - alone).abs().max() > 1e-2
    hf_o, _ = hf.torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16, use_qk_l2norm_in_kernel=True)
    assert (hf_o[:, 11:31] - alone).abs().max() > 1e-2  # leaked state from documents 1 and 2

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 31, CONV_C, generator=gen)
    w = torch.randn(CONV_C, CONV_K, generator=gen)
    hf_y = hf.causal_conv1d_fn(x.transpose(1, 2), w, None, activation="silu").transpose(1, 2)
    alone = causal_conv1d(x[:, 11:31], w)
    torch.testing.assert_close(causal_conv1d(x, w, cu_seqlens=cu)[:, 11:31], alone, rtol=1e-6, atol=1e-6)
    assert (hf_y[:, 11:14] - alone[:, :3]).abs().max() > 1e-2  # the first K-1 outputs see document 2
    torch.testing.assert_close(hf_y[:, 14:31], alone[:, 3:], rtol=1e-6, atol=1e-6)  # later ones do not


# ------------------------------------------------------------------------------------------------
# Decoding pieces


def test_conv_step_continues_prefix():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(B, T, CONV_C, generator=gen, dtype=torch.float64)
    w = torch.randn(CONV_C, CONV_K, generator=gen, dtype=torch.float64)
    full = causal_conv1d(x, w)
    for prefix in (0, 2, 11):  # 2 < K-1: the state is zero-padded on the left
        state = conv_state_from_prefix(x[:, :prefix], CONV_K)
        assert state.shape == (B, CONV_C, CONV_K - 1)
        ys = []
        for t in range(prefix, T):
            y, state = causal_conv1d_step(x[:, t], state, w)
            ys.append(y)
        torch.testing.assert_close(torch.stack(ys, 1), full[:, prefix:], rtol=0, atol=1e-12)
    # Same update as transformers' decode kernel (which updates its state in place).
    state = conv_state_from_prefix(x[:, :11], CONV_K)
    hf_state = state.clone()
    ref = hf.causal_conv1d_update(x[:, 11:12].transpose(1, 2), hf_state, w, None, activation="silu")
    y, new_state = causal_conv1d_step(x[:, 11], state, w)
    torch.testing.assert_close(y, ref[..., 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(new_state, hf_state, rtol=0, atol=0)


@pytest.mark.parametrize("split", [1, 16, 21])
def test_state_continues_prefix(split):
    q, k, v, g, beta = _inputs()
    full, s_full = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True, chunk_size=8)
    pre = [x[:, :split] for x in (q, k, v, g, beta)]
    post = [x[:, split:] for x in (q, k, v, g, beta)]
    o1, s1 = chunk_gated_delta_rule(*pre, output_final_state=True, chunk_size=8)
    o2, s2 = chunk_gated_delta_rule(*post, initial_state=s1, output_final_state=True, chunk_size=8)
    torch.testing.assert_close(torch.cat([o1, o2], 1), full, rtol=0, atol=1e-10)
    torch.testing.assert_close(s2, s_full, rtol=0, atol=1e-10)
    # One-token decode steps through the recurrence continue the same way.
    s = s1
    steps = []
    for t in range(split, min(split + 3, T)):
        o_t, s = recurrent_gated_delta_rule(*(x[:, t:t + 1] for x in (q, k, v, g, beta)),
                                            initial_state=s, output_final_state=True)
        steps.append(o_t)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, split:split + 3], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Boundaries and reversal


def test_segment_cu_seqlens():
    cu = segment_cu_seqlens(_segment_ids())
    assert cu.tolist() == [0, 10, 11, 31, 37, 53, 54, 71, 74]
    assert cu.dtype == torch.long
    # A row start always starts a document, even when the id continues from the previous row.
    assert segment_cu_seqlens(torch.tensor([[1, 1, 2], [2, 2, 0]])).tolist() == [0, 2, 3, 5, 6]
    assert segment_cu_seqlens(torch.tensor([[1, 1, 1]])).tolist() == [0, 3]


def test_reverse_segments():
    x = torch.arange(B * T).reshape(B, T, 1).expand(B, T, 3)
    cu = segment_cu_seqlens(_segment_ids())
    r = reverse_segments(x, cu)
    assert torch.equal(reverse_segments(r, cu), x)
    flat = _flat(r)[:, 0]
    for a, b in _documents(cu):
        assert flat[a:b].tolist() == list(range(b - 1, a - 1, -1))
    assert torch.equal(reverse_segments(x), x.flip(1))


def test_reverse_scan_of_packed_rows():
    """The anti-causal scan of bidirectional GDN on a packed row: reverse(GDN(reverse(x))) equals
    each document's own flipped scan."""
    q, k, v, g, beta = _inputs()
    cu = segment_cu_seqlens(_segment_ids())
    rev = [reverse_segments(x, cu) for x in (q, k, v, g, beta)]
    o = reverse_segments(chunk_gated_delta_rule(*rev, cu_seqlens=cu, chunk_size=8)[0], cu)
    for a, b in _documents(cu):
        doc = [_flat(x)[a:b].flip(0).unsqueeze(0) for x in (q, k, v, g, beta)]
        alone = chunk_gated_delta_rule(*doc, chunk_size=8)[0][0].flip(0)
        torch.testing.assert_close(_flat(o)[a:b], alone, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# The switch


def test_unknown_impl_names_choices():
    assert GDN_IMPLS == ("torch", "fla")
    assert check_gdn_impl("torch") == "torch"
    with pytest.raises(ValueError, match="torch.*fla"):
        check_gdn_impl("triton")
    q, k, v, g, beta = _inputs(torch.float32)
    with pytest.raises(ValueError, match="torch.*fla"):
        chunk_gated_delta_rule(q, k, v, g, beta, impl="cuda")
    with pytest.raises(ValueError, match="torch.*fla"):
        causal_conv1d(torch.zeros(1, 4, 3), torch.zeros(3, 4), impl="cuda")


@pytest.mark.skipif(importlib.util.find_spec("fla") is not None, reason="fla is installed here")
def test_fla_missing_is_a_clear_error():
    q, k, v, g, beta = _inputs(torch.float32)
    with pytest.raises(ImportError, match=r"pip install flash-linear-attention.*--model\.ops\.gdn=torch"):
        chunk_gated_delta_rule(q, k, v, g, beta, impl="fla")
    with pytest.raises(ImportError, match="pip install flash-linear-attention"):
        causal_conv1d(torch.zeros(1, 4, 3), torch.zeros(3, 4), impl="fla")


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("fla") is None,
                    reason="needs CUDA and flash-linear-attention")
def test_fla_matches_torch_bf16_cuda():
    """fla's kernels against ours on packed rows, bf16 inputs. Tolerance: the relative RMS error
    of the outputs, states and gradients stays under 2e-2 (bf16 has 8 mantissa bits; fla
    keeps bf16 intermediates where ours is fp32)."""
    dev = "cuda"
    cu = segment_cu_seqlens(_segment_ids()).to(dev)
    base = [x.to(dev) for x in _inputs(torch.float32)]
    h0 = _state(len(cu) - 1, torch.float32).to(dev)

    def run(impl):
        leaves = [x.to(torch.bfloat16).requires_grad_() for x in base[:3]] + \
                 [base[3].clone().requires_grad_(), base[4].to(torch.bfloat16).requires_grad_()]
        h = h0.clone().requires_grad_()
        o, s = chunk_gated_delta_rule(*leaves, cu_seqlens=cu, initial_state=h, output_final_state=True,
                                      chunk_size=16 if impl == "torch" else 64, impl=impl)
        _loss_weights(o.float(), s).backward()
        return [o.float(), s] + [x.grad.float() for x in leaves + [h]]

    def rel(a, b):
        return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-6)).item()

    for name, a, b in zip(["o", "state", "dq", "dk", "dv", "dg", "dbeta", "dh0"], run("fla"), run("torch")):
        assert rel(a, b) < 2e-2, name

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(B, T, 64, generator=gen).to(dev, torch.bfloat16)
    w = torch.randn(64, CONV_K, generator=gen).to(dev, torch.bfloat16)
    ya = causal_conv1d(x, w, cu_seqlens=cu, impl="fla").float()
    yb = causal_conv1d(x.float(), w.float(), cu_seqlens=cu).float()
    assert rel(ya, yb) < 2e-2


def test_module_imports_only_torch():
    assert "fla" not in vars(gdn)
