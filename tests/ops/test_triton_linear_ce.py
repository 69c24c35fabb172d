"""model.ops.linear_ce: our Triton fused linear + CE (veomni/ops/triton/linear_ce.py) and the liger
choice equal the chunked torch CE (veomni/ops/chunked_ce.py): loss, dH and dW, with per-row
weights, rows that carry no loss, odd sizes, non-contiguous hidden; plus the dispatcher and the
registry. Triton runs under TRITON_INTERPRET=1 on CPU tensors (set by the fixture before any
kernel module is imported or, if one was imported without it, reloaded): tiny shapes, it is slow.

Tolerances: fp32 rtol 1e-5 / atol 1e-5 on the loss and 1e-4 / 1e-6 on the gradients (same
algorithm, only summation order differs: tiles vs torch's matmul blocking); bf16 inputs 2e-2
relative to the gradient scale (one bf16 rounding of g = w*(softmax - onehot) can land on either
side).
"""
import importlib.util

import pytest
import torch

from veomni.ops.chunked_ce import chunked_linear_cross_entropy, reference_linear_cross_entropy

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[kernels]')")


@pytest.fixture(scope="module", autouse=True)
def interpret(triton_interpreter):
    """TRITON_INTERPRET=1 for this module (tests/ops/_triton_interpreter.py)."""
    yield


def _inputs(n, h, v, *, dtype=torch.float32, weights=True, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # every other column of a wider tensor: stride (2h, 2)
        hidden = torch.randn(n, 2 * h, generator=g)[:, ::2]
    else:
        hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    targets = torch.randint(0, v, (n,), generator=g)
    tw = torch.rand(n, generator=g) * 4 if weights else None
    if weights and n > 2:
        tw[1] = 0.0  # a row with weight 0 must contribute nothing
    return hidden.to(dtype), weight.to(dtype), targets, tw


def _run(fn, hidden, weight, targets, tw, upstream=1.0, **kw):
    h = hidden.detach().clone().requires_grad_()
    if not hidden.is_contiguous():  # keep the caller's strides
        h = hidden.detach().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets, tw, **kw)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad


def _triton():
    from veomni.ops.triton.linear_ce import triton_linear_cross_entropy

    return triton_linear_cross_entropy


# (N, H, V, chunk): tiles are 64 rows x 128 vocab x 32 hidden, so these cover a partial tile in
# every dimension, several vocabulary tiles merged by the online logsumexp, several row tiles and
# chunks, H smaller than one k-step, a single row.
CASES = [(70, 40, 300, 32), (5, 17, 77, 1024), (1, 33, 129, 8), (130, 24, 50, 64)]


@pytest.mark.parametrize("n,h,v,chunk", CASES)
@pytest.mark.parametrize("weights,strided", [(True, False), (False, False), (True, True)])
def test_triton_equals_chunked_fp32(n, h, v, chunk, weights, strided):
    hidden, weight, targets, tw = _inputs(n, h, v, weights=weights, strided=strided)
    assert strided == (not hidden.is_contiguous())
    loss, dh, dw = _run(_triton(), hidden, weight, targets, tw, upstream=1.7, chunk_size=chunk)
    ref_loss, ref_dh, ref_dw = _run(chunked_linear_cross_entropy, hidden, weight, targets, tw, upstream=1.7,
                                    chunk_size=chunk)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh, ref_dh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, reference_linear_cross_entropy(hidden, weight, targets, tw), rtol=1e-5, atol=1e-5)
    if weights and n > 2:
        assert torch.all(dh[1] == 0)  # the zero-weight row


def test_rows_without_loss_get_no_gradient_through_the_objective_gather():
    """The objective's contract: hidden [B, S, H], only the loss positions are gathered; the other
    positions (padding, unmasked tokens) get exactly zero gradient, and the result equals eager."""
    from veomni.diffusion.objective import ScoredRows, _HeadObjective
    from veomni.ops.linear_ce import use_linear_ce

    g = torch.Generator().manual_seed(1)
    b, s, h, v = 2, 9, 20, 90
    hidden = torch.randn(b, s, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    pos = torch.tensor([[0, 1], [0, 4], [1, 0], [1, 7], [1, 8]])
    rows = ScoredRows(pos, torch.randint(0, v, (5,), generator=g), 1.0 / (torch.rand(5, generator=g) + 0.1), (b, s))
    obj = _HeadObjective()
    obj.chunk_size = 2
    out = {}
    for impl in ("eager", "triton"):
        hd, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with use_linear_ce(impl):
            loss = obj.loss_fn(None, 7.0, rows=rows)(hd, w)
        loss.backward()
        out[impl] = (loss.detach(), hd.grad, w.grad)
    scored = torch.zeros(b, s, dtype=torch.bool)
    scored[pos[:, 0], pos[:, 1]] = True
    assert torch.all(out["triton"][1][~scored] == 0) and torch.all(out["triton"][1][scored].abs().sum(-1) > 0)
    for a, e in zip(out["triton"], out["eager"]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_zero_rows_give_zero_loss_and_zero_gradients_for_both_inputs():
    hidden, weight, targets, tw = _inputs(0, 12, 40)
    loss, dh, dw = _run(_triton(), hidden, weight, targets, tw)
    assert loss.item() == 0.0 and dh.shape == (0, 12) and dw is not None and torch.all(dw == 0)


def test_single_backward_and_no_grad():
    tri = _triton()
    hidden, weight, targets, tw = _inputs(6, 16, 40)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = tri(h, w, targets, tw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()
    with torch.no_grad():  # eval: the loss only, equal to the reference
        torch.testing.assert_close(tri(h, w, targets, tw), reference_linear_cross_entropy(hidden, weight, targets, tw))
    with pytest.raises(ValueError, match="no ignore_index"):
        tri(h, w, torch.full((6,), -100), tw)


@pytest.mark.parametrize("mode", ["bf16", "fp16", "autocast"])
def test_low_precision_matches_chunked(mode):
    """bf16 / fp16 matmul inputs, fp32 logits and loss, gradients in each input's dtype. (Under the
    interpreter the bf16 dots are upcast to fp32 first, see _linear_ce_kernels._dot; fp16 runs
    tl.dot on fp16 operands as on a GPU.)"""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "autocast": torch.float32}[mode]
    hidden, weight, targets, tw = _inputs(40, 48, 200, dtype=dtype)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else torch.autocast("cpu", enabled=False)
    with ctx:
        loss, dh, dw = _run(_triton(), hidden, weight, targets, tw, chunk_size=16)
        ref_loss, ref_dh, ref_dw = _run(chunked_linear_cross_entropy, hidden, weight, targets, tw, chunk_size=16)
    assert dh.dtype == dw.dtype == dtype and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-3)
    for a, e in ((dh, ref_dh), (dw, ref_dw)):
        assert (a.float() - e.float()).abs().max() <= 2e-2 * e.float().abs().max()


# ------------------------------------------------------------------ the dispatcher and the registry
def test_dispatcher_follows_the_context_and_rejects_unknown_choices(monkeypatch):
    from veomni.ops import linear_ce as lce

    hidden, weight, targets, tw = _inputs(5, 16, 40)
    seen = []
    monkeypatch.setattr(lce, "chunked_linear_cross_entropy", lambda *a, **k: seen.append("eager"))
    import veomni.ops.triton.linear_ce as tri_mod

    monkeypatch.setattr(tri_mod, "triton_linear_cross_entropy", lambda *a, **k: seen.append("triton"))
    lce.linear_cross_entropy(hidden, weight, targets, tw)
    with lce.use_linear_ce("triton"):
        lce.linear_cross_entropy(hidden, weight, targets, tw)
        lce.linear_cross_entropy(hidden, weight, targets, tw, impl="eager")  # an explicit impl wins
    lce.linear_cross_entropy(hidden, weight, targets, tw)
    assert seen == ["eager", "triton", "eager", "eager"] and lce.current_linear_ce() == "eager"
    with pytest.raises(ValueError, match=r"unknown linear_ce implementation 'fused'.*'eager', 'triton', 'liger'"):
        lce.linear_cross_entropy(hidden, weight, targets, tw, impl="fused")


def _tiny_model():
    from transformers import LlamaConfig

    from veomni.models.registry import build_model

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    return build_model(cfg)


def test_model_forward_runs_the_installed_choice(monkeypatch):
    """apply_ops sets the choice on the model; its forward makes it current for the loss_fn, so
    an objective's head + CE runs it; a second model keeps its own."""
    from veomni.ops.linear_ce import current_linear_ce
    from veomni.ops.registry import apply_ops

    model, other = _tiny_model(), _tiny_model()
    assert apply_ops(model, {"linear_ce": "triton"})["linear_ce"] == "triton"
    ids = torch.randint(0, 64, (1, 5))
    seen = []

    def loss_fn(hidden, head_weight):
        seen.append(current_linear_ce())
        return hidden.sum() * 0

    model(input_ids=ids, attn_mode="bidirectional", loss_fn=loss_fn)
    other(input_ids=ids, attn_mode="bidirectional", loss_fn=loss_fn)
    assert seen == ["triton", "eager"] and current_linear_ce() == "eager"


def test_unavailable_choices_fail_at_install(monkeypatch):
    import builtins

    from veomni.ops.registry import apply_ops

    model = _tiny_model()
    monkeypatch.delenv("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"model.ops.linear_ce=triton runs Triton kernels, which need a CUDA GPU"):
            apply_ops(model, {"linear_ce": "triton"})
    real_import = builtins.__import__

    def no_liger(name, *a, **k):
        if name.startswith("liger_kernel"):
            raise ImportError("No module named 'liger_kernel'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_liger)
    with pytest.raises(ValueError, match=r"linear_ce=liger needs liger-kernel .*pip install -e '.\[kernels\]'"):
        apply_ops(model, {"linear_ce": "liger"})
    assert model.linear_ce_impl == "eager"  # nothing installed by a failed apply


# ------------------------------------------------------------------ liger
def _liger():
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (pip install -e '.[kernels]')")
    from veomni.ops import linear_ce

    return linear_ce


@pytest.mark.parametrize("n,h,v", [(19, 24, 150), (8, 16, 33)])
def test_liger_equals_chunked_with_uniform_weights(n, h, v):
    """AR / loss_weighting=none: every row has the same weight (1/denominator)."""
    lce = _liger()
    hidden, weight, targets, _ = _inputs(n, h, v, strided=True)
    tw = torch.full((n,), 0.25)
    for token_weights in (tw, None):
        loss, dh, dw = _run(lce.liger_linear_cross_entropy, hidden, weight, targets, token_weights, upstream=1.7)
        ref = _run(chunked_linear_cross_entropy, hidden, weight, targets, token_weights, upstream=1.7)
        torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dh, ref[1], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(dw, ref[2], rtol=1e-4, atol=1e-6)
    empty = _run(lce.liger_linear_cross_entropy, *_inputs(0, h, v))
    assert empty[0].item() == 0.0 and torch.all(empty[2] == 0)


def test_liger_per_row_weights_are_exact_or_refused():
    """1/t weights: exact where liger's backward takes per-row upstream gradients, otherwise a
    clear error at start-up and at the call -- never the weights silently dropped."""
    lce = _liger()
    hidden, weight, targets, tw = _inputs(37, 24, 150)
    if lce.liger_supports_token_weights():
        loss, dh, dw = _run(lce.liger_linear_cross_entropy, hidden, weight, targets, tw, upstream=1.7)
        ref = _run(chunked_linear_cross_entropy, hidden, weight, targets, tw, upstream=1.7)
        torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dh, ref[1], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(dw, ref[2], rtol=1e-4, atol=1e-6)
        lce.check_linear_ce_objective("liger", "inv_t")
    else:
        with pytest.raises(ValueError, match=r"liger-kernel .* cannot weight rows.*loss_weighting=inv_t"):
            lce.liger_linear_cross_entropy(hidden.requires_grad_(), weight, targets, tw)
        with pytest.raises(ValueError, match="cannot weight rows"):
            lce.check_linear_ce_objective("liger", "inv_t")
    lce.check_linear_ce_objective("liger", "none")  # uniform weights: fine with any liger
    lce.check_linear_ce_objective("triton", "inv_t")


# ------------------------------------------------------------------ through the trainer
def test_trainer_mdm_steps_with_triton_equal_eager(tmp_path, monkeypatch):
    """Two MDM steps (1/t weights, 2 micro-batches accumulated) of a tiny model with
    model.ops.linear_ce=triton: the same loss and the same gradients as eager. A 300-token
    tokenizer keeps the interpreter fast (the SmolLM2 vocabulary would take ~20 s per call)."""
    import json
    from pathlib import Path

    import veomni.distributed as dist_mod
    from tests.inference.test_dropin import CORPUS, make_model_dir
    from veomni.config.parser import parse_args
    from veomni.trainer.trainer import Trainer

    model_dir = make_model_dir(tmp_path / "model")
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": t * 3}) + "\n" for t in CORPUS * 3))
    config = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart" / "smollm2_mdm.yaml")
    grads = []
    clip = dist_mod.clip_grad_norm_

    def recording_clip(model, max_norm):
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return clip(model, max_norm)

    monkeypatch.setattr(dist_mod, "clip_grad_norm_", recording_clip)
    import veomni.ops.triton.linear_ce as tri_mod

    triton_calls = []
    real = tri_mod.triton_linear_cross_entropy
    monkeypatch.setattr(tri_mod, "triton_linear_cross_entropy",
                        lambda *a, **k: triton_calls.append(a[0].shape[0]) or real(*a, **k))
    runs = {}
    liger_runs = False
    if importlib.util.find_spec("liger_kernel") is not None:
        from veomni.ops.linear_ce import liger_supports_token_weights

        liger_runs = liger_supports_token_weights()
    for impl in ("eager", "triton", "liger"):
        argv = [config, f"--model.model_path={model_dir}", f"--data.train_path={corpus}",
                f"--train.output_dir={tmp_path / impl}", f"--data.cache_dir={tmp_path / 'cache'}",
                "--data.max_seq_len=32", "--train.micro_batch_size=2", "--train.global_batch_size=4",
                "--train.progress_bar=false", "--train.export_hf=false", "--train.warmup_steps=0",
                "--data.eval_split_ratio=0", "--train.eval_steps=0", "--train.lr=1e-3", "--train.data_parallel=none",
                "--train.save_steps=0", "--train.max_grad_norm=0", "--train.ce_chunk_size=16",
                "--train.loss_weighting=inv_t", f"--model.ops.linear_ce={impl}"]
        if impl == "liger" and not liger_runs:  # refused at start-up, before any step
            if importlib.util.find_spec("liger_kernel") is not None:
                with pytest.raises(ValueError, match="cannot weight rows"):
                    Trainer(parse_args(argv=argv))
            continue
        trainer = Trainer(parse_args(argv=argv))
        try:
            assert trainer.model.linear_ce_impl == impl
            grads.clear()
            runs[impl] = ([trainer.train_step()["loss"] for _ in range(2)], list(grads))
        finally:
            trainer.close()
    (eager_loss, eager_grads), (tri_loss, tri_grads) = runs["eager"], runs["triton"]
    assert eager_loss[0] > 0 and len(eager_grads) == len(tri_grads) == 2
    assert len(triton_calls) == 4 and all(n > 0 for n in triton_calls)  # 2 steps x 2 micro-batches, all triton
    if liger_runs:  # liger: logits in the matmul dtype (fp32 here), its own chunking
        torch.testing.assert_close(runs["liger"][0], eager_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tri_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for step_e, step_t in zip(eager_grads, tri_grads):
        assert step_e.keys() == step_t.keys() and len(step_e) > 5
        for name in step_e:  # fp32, only the summation order differs: 1e-5 of each gradient's scale
            err = (step_t[name] - step_e[name]).abs().max()
            assert err <= 1e-5 * step_e[name].abs().max() + 1e-8, (name, err.item())
