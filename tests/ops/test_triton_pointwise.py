"""The pointwise ops behind model.ops.{rms_norm, rope, swiglu}: our Triton kernels and liger-kernel's
against the eager references, forward and backward, under TRITON_INTERPRET=1 on CPU; a tiny
model with every fused choice against eager; and the install-time errors of the registry.

The Triton interpreter runs kernels program by program in Python, so the shapes are tiny, but
odd (masks), non-contiguous (strides) and large enough for several programs per launch.
Everything is fp32; kernels do their math in fp32 too, so the only differences from eager are
reduction order and fused multiply-adds: tolerance 1e-5 (abs) / 1e-5 (rel) per kernel, 1e-4 on a
whole model's logits and gradients.
"""
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[kernels]')")

from tests.models.tiny import build_pair, build_qwen3_5_pair  # noqa: E402
from veomni.ops.registry import apply_ops  # noqa: E402
from veomni.ops.rms_norm import rms_norm  # noqa: E402
from veomni.ops.rope import apply_rope  # noqa: E402
from veomni.ops.swiglu import swiglu  # noqa: E402

KERNEL_TOL = dict(atol=1e-5, rtol=1e-5)
MODEL_TOL = dict(atol=1e-4, rtol=1e-4)


def _close_grads(grads, ref_grads):
    """Every parameter gradient within 1e-4 of the tensor's own scale: a random tiny model's
    gradients reach ~100 (Qwen3.5's in_proj_z: 86), where fp32 reordering alone moves small entries
    by ~2e-4 while a wrong kernel moves them by O(1)."""
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(grads[name], ref, atol=MODEL_TOL["atol"] * scale, rtol=MODEL_TOL["rtol"],
                                   msg=name)


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter(triton_interpreter):
    """TRITON_INTERPRET=1 for this module (tests/ops/_triton_interpreter.py)."""
    yield


def _liger_or_skip():
    liger = pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (pip install -e '.[kernels]')")
    from importlib.metadata import version

    from packaging.version import Version

    v = version("liger-kernel")
    if Version(v) >= Version("0.8.2"):
        pytest.skip(f"liger-kernel {v} calls .to() on scalar kernel arguments, which the Triton interpreter "
                    "passes as Python floats (\"'float' object has no attribute 'to'\"); 0.8.1, the version "
                    "setup.py pins, runs here")
    return liger


def _grads(out, inputs, seed=1):
    """Gradients of <out, g> for a fixed random g (a plain .sum() would hide sign/permutation errors)."""
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs)


def _close(a, b, tol=KERNEL_TOL):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(x, y, **tol)


# ---- RMSNorm ---------------------------------------------------------------------------------------

def _rms_inputs(shape, n, contiguous, seed=0):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        x = torch.randn(*shape, n, generator=g)
    else:  # a head slice of a fused projection: row stride 2n, as Qwen3.5's q is
        x = torch.randn(*shape, 2 * n, generator=g)[..., :n]
    w = 1.0 + 0.3 * torch.randn(n, generator=g)
    return x.requires_grad_(), w.requires_grad_()


@pytest.mark.parametrize("impl", ["triton", "liger"])
@pytest.mark.parametrize("zero_centred", [False, True], ids=["standard", "zero_centred"])
@pytest.mark.parametrize("shape,n,contiguous", [((2, 3), 13, False), ((37,), 8, True), ((1, 1), 1, True)],
                         ids=["odd-strided", "many-rows", "one-elem"])
def test_rms_norm_matches_eager(impl, zero_centred, shape, n, contiguous):
    if impl == "liger":
        _liger_or_skip()
    x, w = _rms_inputs(shape, n, contiguous)
    assert contiguous or not x.is_contiguous()
    y = rms_norm(x, w, 1e-6, impl, zero_centred)
    ref = rms_norm(x, w, 1e-6, "eager", zero_centred)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    _close(y, ref)
    # 37 rows: the backward's strips of rows (and their fp32 dw partial sums) do not divide evenly.
    _close(_grads(y, (x, w)), _grads(ref, (x, w)))


# ---- SwiGLU ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["triton", "liger"])
@pytest.mark.parametrize("rows,n", [((3, 5), 11), ((2,), 1500)], ids=["odd", "several-col-blocks"])
def test_swiglu_matches_eager(impl, rows, n):
    if impl == "liger":
        _liger_or_skip()
    h = (3.0 * torch.randn(*rows, 2 * n, generator=torch.Generator().manual_seed(0))).requires_grad_()
    gate, up = h.chunk(2, dim=-1)  # the halves of one fused projection: non-contiguous
    assert not gate.is_contiguous()
    y, ref = swiglu(gate, up, impl), swiglu(gate, up, "eager")
    _close(y, ref)
    _close(_grads(y, h), _grads(ref, h))


@pytest.mark.parametrize("impl", ["triton", "liger"])
def test_gdn_gated_norm_matches_eager(impl, monkeypatch):
    """Qwen3.5's GDN output norm, RMSNorm(o) * silu(z) per head: the choice's RMSNorm kernel, then its
    SwiGLU kernel with z as the gate (a strided head view of in_proj_z's output), == eager."""
    if impl == "liger":
        _liger_or_skip()
    import veomni.models.transformers.gated_deltanet as gdn
    from veomni.models.transformers.gated_deltanet import GatedRMSNorm

    g = torch.Generator().manual_seed(0)
    norm = GatedRMSNorm(10, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(10, generator=g))
    o = torch.randn(2, 5, 3, 10, generator=g, requires_grad=True)
    z = torch.randn(2, 5, 40, generator=g)[..., 5:35].reshape(2, 5, 3, 10).requires_grad_()  # not contiguous
    ref = norm(o, z)
    ref_g = _grads(ref, (o, z, norm.weight))
    calls = []
    for name in ("rms_norm", "swiglu"):  # the two kernels run, each with the choice
        orig = getattr(gdn, name)
        monkeypatch.setattr(gdn, name, lambda *a, _o=orig, _n=name: calls.append((_n, a[-1])) or _o(*a))
    norm.impl = impl
    out = norm(o, z)
    assert calls == [("rms_norm", impl), ("swiglu", impl)]
    _close(out, ref)
    _close(_grads(out, (o, z, norm.weight)), ref_g)


# ---- RoPE ------------------------------------------------------------------------------------------

def _rope_inputs(bsz, heads, kv_heads, slen, dim, rot, cos_batch, seed=0, arbitrary=False):
    g = torch.Generator().manual_seed(seed)
    # [B, S, H, D] projections viewed as [B, H, S, D]: the model's (non-contiguous) layout.
    q = torch.randn(bsz, slen, heads, dim, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(bsz, slen, kv_heads, dim, generator=g).transpose(1, 2).requires_grad_()
    if arbitrary:  # cos/sin halves that differ: the kernel is the exact derivative of eager for any cos/sin
        cos, sin = torch.randn(cos_batch, slen, rot, generator=g), torch.randn(cos_batch, slen, rot, generator=g)
    else:
        pos = torch.arange(slen, dtype=torch.float32)[None, :, None] + 3 * torch.arange(cos_batch)[:, None, None]
        freqs = pos / 10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos(), emb.sin()
    return q, k, cos, sin


ROPE_CASES = {
    "full": dict(bsz=2, heads=3, kv_heads=1, slen=5, dim=10, rot=10, cos_batch=2),  # odd head count
    "many-heads": dict(bsz=1, heads=17, kv_heads=2, slen=3, dim=8, rot=8, cos_batch=1),  # 2 head blocks, broadcast cos
    "partial": dict(bsz=2, heads=2, kv_heads=2, slen=4, dim=11, rot=6, cos_batch=2),  # 5 odd pass-through dims
    "arbitrary-cos": dict(bsz=2, heads=2, kv_heads=1, slen=3, dim=8, rot=4, cos_batch=2, arbitrary=True),
}


# liger rotates whole heads and reads only the first half of cos/sin (= cat(freqs, freqs)): it gets
# the cases it supports; the registry refuses it for partial rotary (test_install_errors).
@pytest.mark.parametrize("impl,case", [("triton", c) for c in ROPE_CASES]
                         + [("liger", "full"), ("liger", "many-heads")])
def test_rope_matches_eager(impl, case):
    if impl == "liger":
        _liger_or_skip()
    q, k, cos, sin = _rope_inputs(**ROPE_CASES[case])
    out, ref = apply_rope(q, k, cos, sin, impl), apply_rope(q, k, cos, sin, "eager")
    _close(out, ref)
    _close(_grads(out, (q, k)), _grads(ref, (q, k)))


# ---- a whole model ---------------------------------------------------------------------------------

def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, attn_mode="bidirectional").logits
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * g).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,impl", [("llama", "triton"), ("qwen3", "triton"), ("qwen3_5", "triton"),
                                         ("llama", "liger")])
def test_model_with_fused_ops_matches_eager(family, impl, caplog):
    """Every norm, the RoPE of every attention layer and every MLP on the fused choice: same logits
    and parameter gradients as eager. Qwen3: q/k norms, head_dim 12; Qwen3.5: zero-centred norms,
    partial rotary (a quarter of head_dim), a GDN layer in between (its gated norm: RMSNorm + SwiGLU kernels)."""
    import logging

    if impl == "liger":
        _liger_or_skip()
    if family == "qwen3_5":
        _, model = build_qwen3_5_pair(layer_types=("linear_attention", "full_attention"))
    else:
        _, model = build_pair(family)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_grads = _logits_and_grads(model, ids)
    with caplog.at_level(logging.INFO, logger="veomni"):
        apply_ops(model, {"rms_norm": impl, "rope": impl, "swiglu": impl})
    n_layers = model.config.num_hidden_layers
    n_attn = 1 if family == "qwen3_5" else n_layers
    n_norms = 2 * n_layers + 1 + (2 * n_attn if family in ("qwen3", "qwen3_5") else 0)
    n_norms += n_layers - n_attn  # Qwen3.5's GDN layers: one gated norm each
    assert f"rms_norm={impl} ({n_norms} modules)" in caplog.text
    assert f"rope={impl} ({n_attn} modules)" in caplog.text and f"swiglu={impl} ({n_layers} modules)" in caplog.text
    logits, grads = _logits_and_grads(model, ids)
    torch.testing.assert_close(logits, ref_logits, **MODEL_TOL)
    _close_grads(grads, ref_grads)
    # ... and the fused choices really ran (a dispatch that ignored impl would also pass the above).
    apply_ops(model, {"rms_norm": "eager", "rope": "eager", "swiglu": "eager"})
    assert torch.equal(_logits_and_grads(model, ids)[0], ref_logits)


@pytest.mark.parametrize("experts_impl", ["grouped", "loop"])
def test_moe_experts_run_the_fused_swiglu(experts_impl, monkeypatch, caplog):
    """Qwen2-MoE: the routed experts' SwiGLU (between the two grouped matmuls, on the strided halves
    of the gate_up output) and the shared expert's MLP both follow model.ops.swiglu; same logits and
    gradients as eager, and the kernel runs once per routed block and once per shared MLP."""
    import logging

    import veomni.ops.triton.swiglu as tswi
    from tests.models.tiny import build_moe_pair

    _, model = build_moe_pair("qwen2_moe")
    apply_ops(model, {"moe_experts": experts_impl})
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_grads = _logits_and_grads(model, ids)
    calls = []
    orig = tswi.triton_swiglu
    monkeypatch.setattr(tswi, "triton_swiglu", lambda *a: calls.append(a[0].shape) or orig(*a))
    with caplog.at_level(logging.INFO, logger="veomni"):
        apply_ops(model, {"moe_experts": experts_impl, "swiglu": "triton"})
    n_layers = model.config.num_hidden_layers
    assert f"swiglu=triton ({2 * n_layers} modules)" in caplog.text  # per layer: shared MLP + experts
    logits, grads = _logits_and_grads(model, ids)
    torch.testing.assert_close(logits, ref_logits, **MODEL_TOL)
    _close_grads(grads, ref_grads)
    shared = [s for s in calls if s[-1] == model.config.shared_expert_intermediate_size]
    routed = [s for s in calls if s[-1] == model.config.moe_intermediate_size]
    assert len(shared) == n_layers and len(shared) + len(routed) == len(calls)
    if experts_impl == "grouped":  # one call over all the layer's sorted rows
        assert len(routed) == n_layers and all(s[0] == 2 * 7 * 2 for s in routed)  # tokens x top-2
    else:  # the loop reference: one call per expert that received rows
        assert len(routed) > n_layers


def test_the_kernels_are_the_ones_that_run(monkeypatch):
    """The model-level parity above cannot tell a kernel from eager by value: count the calls."""
    import veomni.ops.triton.rms_norm as trms
    import veomni.ops.triton.rope as trope
    import veomni.ops.triton.swiglu as tswi

    calls = {"rms": 0, "rope": 0, "swiglu": 0}
    for mod, fn, key in ((trms, "triton_rms_norm", "rms"), (trope, "triton_rope", "rope"),
                         (tswi, "triton_swiglu", "swiglu")):
        orig = getattr(mod, fn)

        def counted(*a, _orig=orig, _key=key):
            calls[_key] += 1
            return _orig(*a)

        monkeypatch.setattr(mod, fn, counted)
    _, model = build_pair("llama")
    apply_ops(model, {"rms_norm": "triton", "rope": "triton", "swiglu": "triton"})
    model(torch.zeros(1, 3, dtype=torch.long), attn_mode="causal")
    assert calls == {"rms": 2 * 2 + 1, "rope": 2, "swiglu": 2}


# ---- install-time errors ---------------------------------------------------------------------------

def test_install_errors(monkeypatch):
    from tests.models.tiny import tiny_config, tiny_qwen3_5_config
    from veomni.models.registry import build_model
    from veomni.models.transformers.dense_decoder import RMSNorm

    _, llama = build_pair("llama")
    with pytest.raises(ValueError, match=r"model.ops.rope='fused' is not one of 'eager' .*'triton' .*'liger'"):
        apply_ops(llama, {"rope": "fused"})

    # No interpreter and no GPU: the Triton choices need one or the other.
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match=r"model.ops.rms_norm=triton runs Triton kernels, which need a CUDA "
                                             r"GPU; on CPU set TRITON_INTERPRET=1"):
            apply_ops(llama, {"rms_norm": "triton"})
        with pytest.raises(ValueError, match=r"model.ops.swiglu=liger runs Triton kernels"):
            apply_ops(llama, {"swiglu": "liger"})
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert all(m.impl == "eager" for m in llama.modules() if isinstance(m, RMSNorm))  # nothing half-installed

    # A package that is not installed (None in sys.modules makes its import fail).
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(ValueError, match=r"model.ops.rope=triton needs triton .*pip install -e '.\[kernels\]'"):
        apply_ops(llama, {"rope": "triton"})
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    with pytest.raises(ValueError, match=r"model.ops.rms_norm=liger needs liger-kernel .*pip install -e "
                                         r"'.\[kernels\]'"):
        apply_ops(llama, {"rms_norm": "liger"})
    monkeypatch.undo()

    # SwiGLU kernels fuse SiLU only: another activation is named.
    gelu = build_model(tiny_config("llama", hidden_act="gelu_pytorch_tanh"))
    with pytest.raises(ValueError, match=r"model.ops.swiglu=triton fuses silu\(gate\) \* up, and this model's MLP "
                                         r"activation is hidden_act='gelu_pytorch_tanh'; use model.ops.swiglu=eager"):
        apply_ops(gelu, {"swiglu": "triton"})
    apply_ops(gelu, {"swiglu": "eager", "rms_norm": "triton", "rope": "triton"})  # the others are fine

    # liger cannot rotate part of a head (Qwen3.5: a quarter of head_dim 8).
    qwen3_5 = build_model(tiny_qwen3_5_config(layer_types=("full_attention",)))
    with pytest.raises(ValueError, match=r"model.ops.rope=liger rotates whole heads, and this model rotates 2 of "
                                         r"its 8 head dims \(partial rotary\); use model.ops.rope=triton"):
        apply_ops(qwen3_5, {"rope": "liger"})
    apply_ops(qwen3_5, {"rope": "triton", "rms_norm": "triton"})
